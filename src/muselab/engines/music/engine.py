"""Text to music with MusicGen (transformers): load once, then generate with progress and cancel."""

from __future__ import annotations

import dataclasses
import logging
import math
import secrets
import time
from pathlib import Path
from typing import Any

import torch

from muselab.config import model_label
from muselab.devices import Placement, choose_placement
from muselab.engines.base import (
    Cancelled,
    CancelToken,
    GenerationResult,
    MusicOutput,
    ProgressCallback,
    ProgressClock,
    engine_result,
    load_or_explain,
    locate_model,
)
from muselab.engines.music.sampler import MusicgenSampler
from muselab.schemas import MAX_SEED, MusicRequest


class MusicEngine:
    kind = "music"

    def __init__(
        self,
        network: Any,
        processor: Any,
        model: str,
        placement: Placement,
        *,
        quantize: str = "none",
        backend: str = "torch",
        source: Path | None = None,
        openvino_cache: Path | None = None,
        cuda_graphs: bool = True,
        on_progress: ProgressCallback | None = None,
    ):
        """Wrap a loaded MusicGen model and its processor; see `MusicEngine.load`.

        `quantize="int8"` stores the text encoder's and the decoder's linear layers as int8: the
        decoder reads all its weights once per token, so a quarter of the bytes is most of the
        speed on a CPU. `"int8-dynamic"` also quantizes each token's activations (fbgemm, x86).
        EnCodec (convolutions and an LSTM) stays as it is.

        `backend` ("torch", "openvino" or "auto", see `music_backend`) says what runs the decoder
        steps. OpenVINO converts the decoder once, cached under `openvino_cache` when the model came
        from the folder `source`, and reports that work through `on_progress`. `cuda_graphs`: on a
        CUDA GPU, each token replays a captured graph of the decoder step (`CudaGraphStep`).
        """
        self.network = network.to(placement.device).eval()
        chosen = music_backend(backend, model, placement.device, quantize)
        self.sampler = MusicgenSampler(self.network, cuda_graphs=cuda_graphs)
        self.load_timings: dict[str, float] = {}
        if chosen == "openvino":
            automatic = backend == "auto"
            chosen = self._use_openvino(model, quantize, placement, automatic, source, openvino_cache, on_progress)
            placement = dataclasses.replace(placement, backend=chosen)
        if quantize in ("int8", "int8-dynamic"):
            from muselab.quantize import quantize_linears

            dynamic = quantize == "int8-dynamic"
            quantize_linears(self.network.text_encoder, dynamic=dynamic)
            if chosen == "torch":  # OpenVINO made its own int8 decoder (NNCF)
                quantize_linears(self.network.decoder, dynamic=dynamic)
            placement = dataclasses.replace(placement, quantize=quantize)
        self.processor = processor
        self.model = model
        self.placement = placement
        audio_config = network.config.audio_encoder
        self.sample_rate: int = int(audio_config.sampling_rate)
        self.frame_rate: float = float(audio_config.frame_rate)
        self.num_codebooks: int = int(network.decoder.num_codebooks)

    def _use_openvino(
        self,
        model: str,
        quantize: str,
        placement: Placement,
        automatic: bool,
        source: Path | None,
        openvino_cache: Path | None,
        on_progress: ProgressCallback | None,
    ) -> str:
        """Move the decoder steps to OpenVINO; "openvino", or "torch" where `auto` chose it and the
        conversion failed (a warning says why; music keeps working on PyTorch)."""
        from muselab.engines.image.openvino import OpenVinoUnavailable
        from muselab.engines.music.openvino import load_music_decoder

        try:
            self.load_timings = load_music_decoder(
                self.sampler, quantize, placement.dtype, source, openvino_cache, on_progress
            )
        except Cancelled:
            raise
        except Exception as exc:
            if not automatic:
                raise OpenVinoUnavailable(
                    f"'{model}' could not be converted for the OpenVINO backend ({type(exc).__name__}: {exc}). "
                    "Use --backend torch."
                ) from exc
            logging.getLogger(__name__).warning("OpenVINO failed for '%s' (%s); music runs on PyTorch", model, exc)
            return "torch"
        return "openvino"

    @classmethod
    def load(
        cls,
        model: str,
        placement: Placement | None = None,
        *,
        offline: bool = False,
        quantize: str = "none",
        backend: str = "torch",
        openvino_cache: Path | None = None,
        cuda_graphs: bool = True,
        on_progress: ProgressCallback | None = None,
    ) -> MusicEngine:
        """Load a hub id or local folder (safetensors only) through transformers' `from_pretrained`."""
        from transformers import AutoProcessor, MusicgenForConditionalGeneration

        placement = placement or choose_placement()
        source = locate_model(model, offline, "music")

        def load() -> tuple[Any, Any]:
            processor = AutoProcessor.from_pretrained(source, local_files_only=True)
            network = MusicgenForConditionalGeneration.from_pretrained(
                source, dtype=placement.dtype, use_safetensors=True, local_files_only=True
            )
            return processor, network

        processor, network = load_or_explain(load, model, "music")
        if openvino_cache is None:
            from muselab.config import Settings

            openvino_cache = Settings().openvino_cache
        return cls(
            network,
            processor,
            model,
            placement,
            quantize=quantize,
            backend=backend,
            source=Path(source),
            openvino_cache=openvino_cache,
            cuda_graphs=cuda_graphs,
            on_progress=on_progress,
        )

    @property
    def model_name(self) -> str:
        return Path(self.model.rstrip("/")).name

    def resolve(self, request: MusicRequest) -> MusicRequest:
        seed = request.seed if request.seed is not None else secrets.randbelow(MAX_SEED + 1)
        return request.model_copy(update={"model": model_label(self.model), "seed": seed})

    def tokens_for(self, duration: float) -> int:
        """New decoder steps for `duration` seconds: one per frame, the codebook delay pattern, and
        one spare frame, since the codec's output can come out a few samples short of whole frames;
        the audio is then cut to the exact length."""
        return math.ceil(duration * self.frame_rate) + self.num_codebooks

    def generate(
        self,
        request: MusicRequest,
        on_progress: ProgressCallback | None = None,
        cancel: CancelToken | None = None,
    ) -> GenerationResult:
        request = self.resolve(request)
        assert request.seed is not None
        cancel = cancel or CancelToken()
        tokens = self.tokens_for(request.duration)
        samples = round(request.duration * self.sample_rate)
        clock = ProgressClock(tokens * request.num_clips, on_progress, items=request.num_clips)
        started = time.perf_counter()
        outputs: list[MusicOutput] = []

        inputs = self.processor(text=[request.prompt], padding=True, return_tensors="pt").to(self.placement.device)
        for index in range(request.num_clips):
            cancel.raise_if_cancelled()
            seed = (request.seed + index) % (MAX_SEED + 1)

            def on_token(index: int = index) -> None:
                """Runs after every new token: report progress, stop on cancel."""
                if cancel.cancelled:
                    raise Cancelled()
                clock.advance(index)

            try:
                audio = self._sample(inputs, request, tokens, seed, on_token)
            except Cancelled:
                raise Cancelled(completed=outputs) from None
            clock.emit("decoding", index, eta=None)
            outputs.append(MusicOutput(audio=audio[:samples], sample_rate=self.sample_rate, seed=seed))
        return engine_result(self, request, outputs, started)

    def _sample(self, inputs: Any, request: MusicRequest, tokens: int, seed: int, on_token: Any) -> Any:
        devices = [torch.cuda.current_device()] if self.placement.device == "cuda" else []
        # Sampling draws from the global RNG; fork it so a seed here never disturbs other code.
        with torch.random.fork_rng(devices=devices), torch.inference_mode():
            torch.manual_seed(seed)
            values = self.sampler.generate(
                inputs["input_ids"],
                inputs["attention_mask"],
                max_new_tokens=tokens,
                guidance_scale=request.guidance,
                temperature=request.temperature,
                top_k=request.top_k,
                top_p=request.top_p if request.top_p > 0 else 1.0,
                on_token=on_token,
            )
        # (batch, channels, samples) -> (samples, channels), float32 for encoding.
        return values[0].float().cpu().numpy().T


def music_backend(backend: str, model: str, device: str, quantize: str) -> str:
    """What runs MusicGen's decoder steps: "torch" or "openvino". `auto` means OpenVINO on a CPU
    for int8 weights (the CPU default), where it is installed: faster tokens at the same error. With
    float32 weights it keeps PyTorch, which would otherwise hold a second float32 copy while
    converting. An explicit "openvino" that cannot work here is an error that says why."""
    from muselab.engines.image import openvino as ov

    if backend == "torch":
        return "torch"
    usable = ov.openvino_available() and (quantize == "none" or ov.nncf_available())
    if backend == "auto":
        return "openvino" if device == "cpu" and quantize != "none" and usable else "torch"
    if device != "cpu":
        raise ov.OpenVinoUnavailable(
            f"'{model}' cannot use the OpenVINO backend: it runs on CPUs, and this engine is placed on "
            f"{device} (use --device cpu, or --backend torch)."
        )
    if not usable:
        ov.require_openvino("none" if quantize == "none" else "int8")
    return "openvino"
