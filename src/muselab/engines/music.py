"""Text to music with MusicGen (transformers): load once, then generate with progress and cancel."""

from __future__ import annotations

import math
import secrets
import time
from pathlib import Path
from typing import Any

import torch

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
from muselab.schemas import MAX_SEED, MusicRequest


class MusicEngine:
    kind = "music"

    def __init__(self, network: Any, processor: Any, model: str, placement: Placement):
        """Wrap a loaded MusicGen model and its processor; see `MusicEngine.load`."""
        self.network = network.to(placement.device).eval()
        self.processor = processor
        self.model = model
        self.placement = placement
        audio_config = network.config.audio_encoder
        self.sample_rate: int = int(audio_config.sampling_rate)
        self.frame_rate: float = float(audio_config.frame_rate)
        self.num_codebooks: int = int(network.decoder.num_codebooks)

    @classmethod
    def load(cls, model: str, placement: Placement | None = None, *, offline: bool = False) -> MusicEngine:
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
        return cls(network, processor, model, placement)

    @property
    def model_name(self) -> str:
        return Path(self.model.rstrip("/")).name

    def resolve(self, request: MusicRequest) -> MusicRequest:
        seed = request.seed if request.seed is not None else secrets.randbelow(MAX_SEED + 1)
        return request.model_copy(update={"model": self.model, "seed": seed})

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
        from transformers import StoppingCriteria, StoppingCriteriaList

        request = self.resolve(request)
        assert request.seed is not None
        cancel = cancel or CancelToken()
        tokens = self.tokens_for(request.duration)
        samples = round(request.duration * self.sample_rate)
        clock = ProgressClock(tokens * request.num_clips, on_progress, items=request.num_clips)
        started = time.perf_counter()
        outputs: list[MusicOutput] = []

        class StepWatcher(StoppingCriteria):
            """Called by `generate` after every new token: report progress, stop on cancel."""

            item = 0

            def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs: Any) -> torch.Tensor:
                if cancel.cancelled:
                    raise Cancelled()
                clock.advance(self.item)
                return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)

        watcher = StepWatcher()
        inputs = self.processor(text=[request.prompt], padding=True, return_tensors="pt").to(self.placement.device)
        for index in range(request.num_clips):
            cancel.raise_if_cancelled()
            seed = (request.seed + index) % (MAX_SEED + 1)
            watcher.item = index
            try:
                audio = self._sample(inputs, request, tokens, seed, StoppingCriteriaList([watcher]))
            except Cancelled:
                raise Cancelled(completed=outputs) from None
            clock.emit("decoding", index, eta=None)
            outputs.append(MusicOutput(audio=audio[:samples], sample_rate=self.sample_rate, seed=seed))
        return engine_result(self, request, outputs, started)

    def _sample(self, inputs: Any, request: MusicRequest, tokens: int, seed: int, stopping: Any) -> Any:
        devices = [torch.cuda.current_device()] if self.placement.device == "cuda" else []
        # Sampling draws from the global RNG; fork it so a seed here never disturbs other code.
        with torch.random.fork_rng(devices=devices), torch.inference_mode():
            torch.manual_seed(seed)
            values = self.network.generate(
                **inputs,
                do_sample=True,
                max_new_tokens=tokens,
                temperature=request.temperature,
                # Explicit "off" values: None would fall back to the checkpoint's own defaults.
                top_k=request.top_k,
                top_p=request.top_p if request.top_p > 0 else 1.0,
                guidance_scale=max(request.guidance, 1.0),
                stopping_criteria=stopping,
            )
        # (batch, channels, samples) -> (samples, channels), float32 for encoding.
        return values[0].float().cpu().numpy().T
