"""Text to music with MusicGen (transformers): load once, then generate with progress and cancel."""

from __future__ import annotations

import dataclasses
import logging
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
from muselab.engines.music.continuation import fitted, prompt_codes
from muselab.engines.music.longform import (
    DECODE_FRAMES_A_STEP,
    Window,
    piece_frames,
    plan_steps,
    window_steps,
    windows,
)
from muselab.engines.music.sampler import MusicgenSampler
from muselab.engines.runtime import RuntimePlan, engine_plan
from muselab.quantize import Int8Linear, quantize_linears
from muselab.schemas import MAX_SEED, MusicRequest, RequestError

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
    #: The token loop for this family's network (`melody.MelodySampler` for the melody models).
    sampler_class: type[MusicgenSampler] = MusicgenSampler
    #: Whether a request's `melody` conditions it (the melody models).
    follows_melody = False

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
        self.sampler = self.sampler_class(self.network, cuda_graphs=plan.cuda_graphs)
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
        plan = engine_plan("music", model, plan, options)
        plan.require()  # before a download: what cannot run here is not fetched either
        source = locate_model(model, plan.offline, "music")

        processor, network = load_or_explain(lambda: cls.load_parts(source, plan.dtype), model, "music")
        return cls(network, processor, model, plan, source=Path(source), on_progress=on_progress)

    @classmethod
    def load_parts(cls, source: str, dtype: torch.dtype) -> tuple[Any, Any]:
        """The processor and the network in `source` (a folder, or a hub id in the cache)."""
        from transformers import AutoProcessor, MusicgenForConditionalGeneration

        processor = AutoProcessor.from_pretrained(source, local_files_only=True)
        network = MusicgenForConditionalGeneration.from_pretrained(
            source, dtype=dtype, use_safetensors=True, local_files_only=True
        )
        return processor, network

    @property
    def model_name(self) -> str:
        return Path(self.model.rstrip("/")).name

    def resolve(self, request: MusicRequest) -> MusicRequest:
        seed = request.seed if request.seed is not None else secrets.randbelow(MAX_SEED + 1)
        return request.model_copy(update={"model": model_label(self.model), "seed": seed})

    def steps(self, request: MusicRequest, given: int = 0) -> int:
        """The progress steps `request` takes: each clip's decoder steps, in every window, and the
        decoding of a long piece, with `given` frames of a clip to continue (before it is loaded,
        its length is not known: counted as none)."""
        return plan_steps(self.windows(request, given), self.frames(request), self.num_codebooks) * request.num_clips

    def tokens_for(self, duration: float) -> int:
        """Decoder steps for a piece of `duration` seconds that fits one window."""
        return window_steps(Window(0, piece_frames(duration, self.frame_rate)), self.num_codebooks)

    @property
    def context(self) -> int:
        """The most frames one window holds: the model's trained length (`generation_config.max_length`,
        1500 frames or 30 s on the real checkpoints) and the spare frame (`piece_frames`), within its
        position embeddings. A 30 s piece is one window."""
        trained = int(self.network.generation_config.max_length or 1500) + 1
        return min(trained, int(self.network.decoder.config.max_position_embeddings) - self.num_codebooks - 1)

    def frames(self, request: MusicRequest) -> int:
        return piece_frames(request.duration, self.frame_rate)

    def windows(self, request: MusicRequest, given: int = 0) -> list[Window]:
        """The windows that make `request`'s piece, `given` frames (a clip to continue) known."""
        stride = round(request.extend_stride * self.frame_rate)
        frames = self.frames(request)
        if frames > self.context and stride >= self.context:
            raise RequestError(
                f"extend_stride: {request.extend_stride:g} s is this model's whole window "
                f"({self.context / self.frame_rate:g} s); a long piece needs some of it for the audio it continues"
            )
        return windows(frames, given, self.context, stride)

    def generate(
        self,
        request: MusicRequest,
        on_progress: ProgressCallback | None = None,
        cancel: CancelToken | None = None,
    ) -> GenerationResult:
        """The request's clips, sampled together in batches (`clips_per_batch`): each token reads
        the decoder's weights once for a whole batch. Clip i has seed + i and draws from a
        generator of its own, so it is the clip that seed makes alone (`--from` re-runs one clip).
        A piece longer than the model's context is made in windows (`longform.py`); stopped, the
        windows it finished are kept."""
        request = self.resolve(request)
        assert request.seed is not None
        cancel = cancel or CancelToken()
        samples = round(request.duration * self.sample_rate)
        given, kept_from = None, 0
        if request.audio_prompt is not None:
            # The clip's frames are the piece's first: the first window continues them.
            given, prompt_samples = prompt_codes(self, request)
            kept_from = prompt_samples if request.new_only else 0
        melody = self.load_melody(request)
        known = 0 if given is None else given.shape[1]
        plan = self.windows(request, known)
        clock = ProgressClock(self.steps(request, known), on_progress, items=request.num_clips)
        started = time.perf_counter()
        outputs: list[MusicOutput] = []
        seeds = [(request.seed + index) % (MAX_SEED + 1) for index in range(request.num_clips)]
        size = self.clips_per_batch(request, max(window_steps(window, self.num_codebooks) for window in plan))

        inputs = self.processor(text=[request.prompt], padding=True, return_tensors="pt").to(self.placement.device)
        for first in range(0, len(seeds), size):
            cancel.raise_if_cancelled()
            batch = seeds[first : first + size]

            def on_token(first: int = first, clips: int = len(batch)) -> None:
                """Runs after every new token (one for each clip of the batch): report progress, stop on cancel."""
                if cancel.cancelled:
                    raise Cancelled()
                clock.advance(first, steps=clips)

            # One generator per clip (not the global RNG), through all its windows: a clip's draws
            # depend on its seed only, and no other code's random numbers are disturbed.
            generators = [torch.Generator(self.placement.device).manual_seed(seed) for seed in batch]
            piece = None if given is None else given.repeat(len(batch), 1)  # (clips * codebooks, frames)
            finished = 0
            try:
                for window in plan:
                    prompt = None if piece is None or not window.prompt else piece[:, piece.shape[1] - window.prompt :]
                    # The melody's part from where this window starts in the piece.
                    begins = 0 if piece is None else (piece.shape[1] - window.prompt) / self.frame_rate
                    chroma = None if melody is None else self.melody_chroma(melody, begins)
                    drawn = self._sample(inputs, request, window, generators, on_token, prompt, chroma)
                    made = self.sampler.codes(drawn)[:, window.prompt :]
                    piece = made if piece is None else torch.cat([piece, made], dim=1)
                    finished += 1
                for clip, seed in enumerate(batch):
                    clock.emit("decoding", first + clip, eta=None)
                    audio = self._decode(piece, clip, clock, first + clip, cancel)[kept_from:samples]
                    outputs.append(MusicOutput(audio=audio, sample_rate=self.sample_rate, seed=seed))
            except Cancelled:
                if finished and piece is not None and len(outputs) < first + len(batch):
                    outputs += self._stopped(piece, batch[len(outputs) - first :], len(outputs) - first, kept_from)
                raise Cancelled(completed=outputs) from None
            except Exception as exc:
                if outputs and not getattr(exc, "completed", None):  # the job service keeps earlier batches' clips
                    exc.completed = list(outputs)  # type: ignore[attr-defined]
                raise
        return engine_result(self, request, outputs, started)

    def load_melody(self, request: MusicRequest) -> Any:
        """The request's melody clip from the inputs folder, mono at the model's rate (once for
        every window); refused by a model that cannot follow one (the job service refuses it
        before it queues where it can tell)."""
        if request.melody is None:
            return None
        if not self.follows_melody:
            raise RequestError(
                f"melody: {self.model_name} cannot follow a melody; use a melody model (facebook/musicgen-melody)"
            )
        from muselab.uploads import InputStore

        assert self.plan.inputs_dir is not None
        samples, rate = InputStore(self.plan.inputs_dir).load_audio(request.melody, "melody")
        return fitted(samples, rate, self.sample_rate, 1)[0]

    def melody_chroma(self, melody: Any, offset: float) -> Any:
        raise NotImplementedError  # only the melody engine follows one (`follows_melody`)

    def _stopped(self, piece: Any, seeds: list[int], clip: int, kept_from: int) -> list[MusicOutput]:
        """What a stopped long piece keeps: the windows finished, each clip's decoded as it is."""
        kept = []
        for offset, seed in enumerate(seeds):
            audio = self._decode(piece, clip + offset)[kept_from:]
            stopped_at = audio.shape[0] / self.sample_rate
            kept.append(MusicOutput(audio=audio, sample_rate=self.sample_rate, seed=seed, stopped_at=stopped_at))
        return kept

    def clips_per_batch(self, request: MusicRequest, tokens: int) -> int:
        """How many clips sample together: up to MAX_BATCH_CLIPS, as long as their KV cache stays
        within BATCH_CACHE_BYTES (one at least; always one where `batches_clips` is False)."""
        if not self.batches_clips:
            return 1
        rows = 2 if request.guidance > 1 else 1
        per_clip = self.sampler.cache_bytes(rows, 1 + tokens)
        return max(1, min(MAX_BATCH_CLIPS, request.num_clips, BATCH_CACHE_BYTES // per_clip))

    def _sample(
        self,
        inputs: Any,
        request: MusicRequest,
        window: Window,
        generators: list,
        on_token: Any,
        prompt: Any,
        chroma: Any = None,
    ) -> Any:
        """Codes for one clip per generator, in one batch (`MusicgenSampler.sample`): the window's
        new frames after the `prompt` codes (the clip continued, or the piece so far's end)."""
        return self.sampler.sample(
            inputs["input_ids"],
            inputs["attention_mask"],
            max_new_tokens=window.new + self.num_codebooks - 1,
            prompt_codes=prompt,
            chroma=chroma,
            guidance_scale=request.guidance,
            temperature=request.temperature,
            top_k=request.top_k,
            top_p=request.top_p if request.top_p > 0 else 1.0,
            on_token=on_token,
            generators=generators,
        )

    def _decode(
        self, piece: Any, clip: int, clock: ProgressClock | None = None, item: int = 0, cancel: Any = None
    ) -> Any:
        """Clip `clip`'s codes of `piece` as audio (samples, channels), float32 for encoding; a
        long piece's decoding counts on `clock` and stops on `cancel` between its chunks."""

        def on_chunk(frames: int) -> None:
            if cancel is not None and cancel.cancelled:
                raise Cancelled()
            if clock is not None:
                clock.advance(item, stage="decoding", steps=frames // DECODE_FRAMES_A_STEP)

        rows = piece[clip * self.num_codebooks : (clip + 1) * self.num_codebooks]
        # (1, channels, samples) -> (samples, channels)
        return self.sampler.decode_codes(rows, on_chunk)[0].float().cpu().numpy().T
