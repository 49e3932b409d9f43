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
from muselab.devices import Placement
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
from muselab.engines.music.continuation import prompt_codes
from muselab.engines.music.sampler import MusicgenSampler
from muselab.engines.runtime import RuntimePlan, engine_plan
from muselab.quantize import Int8Linear, quantize_linears
from muselab.schemas import MAX_SEED, MusicRequest

#: Clips of one request sampled together at most. A token's step reads every decoder weight once
#: for the whole batch, so on a CPU (bound by reading weights) or a GPU (bound by launches) four
#: clips cost little more than one; but each clip adds its own KV cache, read in full every token,
#: and beyond about 8 rows (4 guided clips) those reads and the per-row maths stop being small.
MAX_BATCH_CLIPS = 4
#: The KV cache one batch may hold (PyTorch's loop; OpenVINO's u8 cache is smaller). 30 s guided
#: clips in float32 take 0.55 GiB each with musicgen-small, 1.7 GiB with medium, 2.2 GiB with
#: large: four, two and one clip a batch, so batching never asks for much beyond the model itself.
BATCH_CACHE_BYTES = 4 * 2**30


class MusicEngine:
    kind = "music"

    def __init__(
        self,
        network: Any,
        processor: Any,
        model: str,
        plan: RuntimePlan | Placement | None = None,
        *,
        source: Path | None = None,
        on_progress: ProgressCallback | None = None,
        **options: Any,
    ):
        """Wrap a loaded MusicGen model and its processor to run as `plan` says; see
        `MusicEngine.load`. With a placement (or nothing) instead of a plan, `options` make one
        (`runtime.engine_plan`: PyTorch and float weights unless they say otherwise).

        int8 (`plan.quantize`) stores the text encoder's and the decoder's linear layers as int8:
        the decoder reads all its weights once per token, so a quarter of the bytes is most of the
        speed on a CPU. "int8-dynamic" also quantizes each token's activations (fbgemm, x86).
        EnCodec (convolutions and an LSTM) stays as it is.

        On OpenVINO (`plan.backend`) the decoder step is converted once, cached under
        `plan.openvino_cache` when the model came from the folder `source`, and that work is
        reported through `on_progress`. `plan.cuda_graphs`: on a CUDA GPU, each token replays a
        captured graph of the decoder step (`CudaGraphStep`).
        """
        plan = engine_plan("music", model, plan, options)
        plan.require()
        self.network = network.to(plan.device).eval()
        self.sampler = MusicgenSampler(self.network, cuda_graphs=plan.cuda_graphs)
        self.load_timings: dict[str, float] = {}
        if plan.backend == "openvino":
            plan = self._use_openvino(plan, source, on_progress)
        if plan.quantize in ("int8", "int8-dynamic"):
            dynamic = plan.quantize == "int8-dynamic"
            quantize_linears(self.network.text_encoder, dynamic=dynamic)
            if plan.backend == "torch":  # OpenVINO made its own int8 decoder (NNCF)
                quantize_linears(self.network.decoder, dynamic=dynamic)
        #: Whether a request's clips may sample in one batch. PyTorch's int8-dynamic (fbgemm)
        #: quantizes a layer's input with one scale for all its rows: batched, a clip's numbers
        #: would depend on the other clips, and it would not be the clip its seed makes alone
        #: (OpenVINO's dynamic quantization is per row and batches exactly). There, one at a time.
        self.batches_clips = not any(isinstance(m, Int8Linear) and m.dynamic for m in self.sampler.decoder.modules())
        self.processor = processor
        self.model = model
        self.plan = plan
        self.placement = dataclasses.replace(plan.placement, quantize=plan.quantize, backend=plan.backend)
        audio_config = network.config.audio_encoder
        self.sample_rate: int = int(audio_config.sampling_rate)
        self.frame_rate: float = float(audio_config.frame_rate)
        self.num_codebooks: int = int(network.decoder.num_codebooks)

    def _use_openvino(
        self, plan: RuntimePlan, source: Path | None, on_progress: ProgressCallback | None
    ) -> RuntimePlan:
        """Move the decoder steps to OpenVINO. Should the conversion fail, the plan becomes what
        `without_openvino` makes of that: PyTorch where `auto` chose OpenVINO (a warning says why;
        music keeps working), else an error."""
        from muselab.engines.music.openvino import load_music_decoder

        try:
            self.load_timings = load_music_decoder(
                self.sampler, plan.quantize, plan.dtype, source, plan.openvino_cache, on_progress
            )
        except Cancelled:
            raise
        except Exception as exc:
            on_torch = plan.without_openvino(f"its decoder could not be converted ({type(exc).__name__}: {exc})")
            logging.getLogger(__name__).warning("OpenVINO failed for '%s' (%s); music runs on PyTorch", plan.model, exc)
            return on_torch
        return plan

    @classmethod
    def load(
        cls,
        model: str,
        plan: RuntimePlan | Placement | None = None,
        *,
        on_progress: ProgressCallback | None = None,
        **options: Any,
    ) -> MusicEngine:
        """Load a hub id or local folder (safetensors only) through transformers' `from_pretrained`,
        to run as `plan` says (`runtime.music_plan`; with a placement or nothing, `options` make it)."""
        from transformers import AutoProcessor, MusicgenForConditionalGeneration

        plan = engine_plan("music", model, plan, options)
        plan.require()  # before a download: what cannot run here is not fetched either
        source = locate_model(model, plan.offline, "music")

        def load() -> tuple[Any, Any]:
            processor = AutoProcessor.from_pretrained(source, local_files_only=True)
            network = MusicgenForConditionalGeneration.from_pretrained(
                source, dtype=plan.dtype, use_safetensors=True, local_files_only=True
            )
            return processor, network

        processor, network = load_or_explain(load, model, "music")
        return cls(network, processor, model, plan, source=Path(source), on_progress=on_progress)

    @property
    def model_name(self) -> str:
        return Path(self.model.rstrip("/")).name

    def resolve(self, request: MusicRequest) -> MusicRequest:
        seed = request.seed if request.seed is not None else secrets.randbelow(MAX_SEED + 1)
        return request.model_copy(update={"model": model_label(self.model), "seed": seed})

    def steps(self, request: MusicRequest) -> int:
        """The progress steps `request` takes: its decoder steps for each clip."""
        return self.tokens_for(request.duration) * request.num_clips

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
        """The request's clips, sampled together in batches (`clips_per_batch`): each token reads
        the decoder's weights once for a whole batch. Clip i has seed + i and draws from a
        generator of its own, so it is the clip that seed makes alone (`--from` re-runs one clip)."""
        request = self.resolve(request)
        assert request.seed is not None
        cancel = cancel or CancelToken()
        tokens = self.tokens_for(request.duration)
        samples = round(request.duration * self.sample_rate)
        codes, kept_from = None, 0
        if request.audio_prompt is not None:
            # The clip's frames are the piece's first positions: the steps left are drawn.
            codes, prompt_samples = prompt_codes(self, request)
            tokens = codes.shape[1] + max(tokens - codes.shape[1], self.num_codebooks + 1)
            kept_from = prompt_samples if request.new_only else 0
        clock = ProgressClock(tokens * request.num_clips, on_progress, items=request.num_clips)
        started = time.perf_counter()
        outputs: list[MusicOutput] = []
        seeds = [(request.seed + index) % (MAX_SEED + 1) for index in range(request.num_clips)]
        size = self.clips_per_batch(request, tokens)

        inputs = self.processor(text=[request.prompt], padding=True, return_tensors="pt").to(self.placement.device)
        for first in range(0, len(seeds), size):
            cancel.raise_if_cancelled()
            batch = seeds[first : first + size]

            def on_token(first: int = first, clips: int = len(batch)) -> None:
                """Runs after every new token (one for each clip of the batch): report progress, stop on cancel."""
                if cancel.cancelled:
                    raise Cancelled()
                clock.advance(first, steps=clips)

            try:
                drawn = self._sample(inputs, request, tokens, batch, on_token, codes)
                for clip, seed in enumerate(batch):
                    clock.emit("decoding", first + clip, eta=None)
                    audio = self._decode(drawn, clip)[kept_from:samples]
                    outputs.append(MusicOutput(audio=audio, sample_rate=self.sample_rate, seed=seed))
            except Cancelled:
                raise Cancelled(completed=outputs) from None
            except Exception as exc:
                if outputs and not getattr(exc, "completed", None):  # the job service keeps earlier batches' clips
                    exc.completed = list(outputs)  # type: ignore[attr-defined]
                raise
        return engine_result(self, request, outputs, started)

    def clips_per_batch(self, request: MusicRequest, tokens: int) -> int:
        """How many clips sample together: up to MAX_BATCH_CLIPS, as long as their KV cache stays
        within BATCH_CACHE_BYTES (one at least; always one where `batches_clips` is False)."""
        if not self.batches_clips:
            return 1
        rows = 2 if request.guidance > 1 else 1
        per_clip = self.sampler.cache_bytes(rows, 1 + tokens)
        return max(1, min(MAX_BATCH_CLIPS, request.num_clips, BATCH_CACHE_BYTES // per_clip))

    def _sample(
        self, inputs: Any, request: MusicRequest, tokens: int, seeds: list[int], on_token: Any, codes: Any = None
    ) -> Any:
        """Codes for one clip per seed, in one batch (`MusicgenSampler.sample`): `tokens` positions
        in all, the first `codes` (a clip to continue) given."""
        # One generator per clip (not the global RNG): a clip's draws depend on its seed only, and
        # no other code's random numbers are disturbed.
        generators = [torch.Generator(self.placement.device).manual_seed(seed) for seed in seeds]
        return self.sampler.sample(
            inputs["input_ids"],
            inputs["attention_mask"],
            max_new_tokens=tokens - (0 if codes is None else codes.shape[1]),
            prompt_codes=codes,
            guidance_scale=request.guidance,
            temperature=request.temperature,
            top_k=request.top_k,
            top_p=request.top_p if request.top_p > 0 else 1.0,
            on_token=on_token,
            generators=generators,
        )

    def _decode(self, codes: Any, clip: int) -> Any:
        # (1, channels, samples) -> (samples, channels), float32 for encoding.
        return self.sampler.decode(codes, clip)[0].float().cpu().numpy().T
