"""The music part: musicgen-small's plain `generate` (float32) against muselab's engine with its
defaults, the same settings on PyTorch, int8 weights and int8 activations (CPU) or eager tokens (GPU)."""

from __future__ import annotations

import copy
import math
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from muselab.bench.isolation import Say
from muselab.bench.measure import PeakMemory, StepTimes, alternated_speedups, cpu_seconds
from muselab.bench.quality import SEED, snr
from muselab.devices import Placement, choose_placement, synchronize
from muselab.engines.runtime import music_quantize
from muselab.schemas import MusicRequest

MUSIC_PROMPT = "lo-fi beat with warm piano"


def bench_music(seconds: float, say: Say) -> dict[str, Any]:
    """Baseline `generate` vs muselab's engine (default, the default on PyTorch, int8) on
    musicgen-small's architecture."""
    with tempfile.TemporaryDirectory(prefix="muselab-bench-music-") as scratch:
        return _bench_music(seconds, say, Path(scratch))


def _bench_music(seconds: float, say: Say, scratch: Path) -> dict[str, Any]:
    from muselab.bench import architectures
    from muselab.engines.music.engine import MusicEngine

    placement = choose_placement()
    device = placement.device
    memory = PeakMemory(device)
    network, processor = architectures.build_musicgen_small_random(torch.float32, verbose=False)
    network = network.to(device)
    frame_rate = float(network.config.audio_encoder.frame_rate)
    sample_rate = int(network.config.audio_encoder.sampling_rate)
    # As MusicEngine.tokens_for: one per frame, the delay pattern, one spare frame.
    tokens = math.ceil(seconds * frame_rate) + int(network.decoder.num_codebooks)
    inputs = processor(text=[MUSIC_PROMPT], padding=True, return_tensors="pt").to(device)
    say(f"music baseline: float32 generate(), {seconds:g} s of audio ({tokens} tokens), guidance 3")
    with torch.inference_mode():
        if device == "cuda":  # as muselab's engines get: the whole clip once, untimed (GPU start-up,
            # kernel loading, the first clip of a length's plans and allocations)
            network.generate(**inputs, do_sample=True, max_new_tokens=tokens, guidance_scale=3.0)
        torch.manual_seed(SEED)
        synchronize(device)
        started, cpu = time.perf_counter(), cpu_seconds()
        reference = network.generate(**inputs, do_sample=True, max_new_tokens=tokens, guidance_scale=3.0)
        synchronize(device)
        baseline_s = time.perf_counter() - started
    samples = round(seconds * sample_rate)
    reference_audio = reference[0, 0, :samples].float().cpu().numpy()
    figures: dict[str, Any] = {
        "audio_seconds": seconds,
        "tokens": tokens,
        "baseline_s": baseline_s,
        "baseline_rtf": baseline_s / seconds,
        "baseline_ms_per_token": 1000 * baseline_s / tokens,
        "baseline_cpu_share": (cpu_seconds() - cpu) / (baseline_s * torch.get_num_threads()),
        "baseline_peak_rss_gb": memory.gib(),
    }
    say(f"music baseline: {baseline_s:.1f} s, RTF {figures['baseline_rtf']:.2f}")
    codes = _teacher_forcing_codes(network).to(device)
    logits_reference = _teacher_forced_logits(network, inputs, codes)
    # Saved like a user's model, so an OpenVINO conversion is cached once and shared by the
    # configurations that use the same converted decoder (int8 and int8-dynamic do).
    folder, cache = scratch / "musicgen", scratch / "openvino-cache"
    network.save_pretrained(folder)

    request = MusicRequest(prompt=MUSIC_PROMPT, duration=seconds, seed=SEED)
    default_quantize = default_music_quantize(placement)
    # (quantize, backend): the default; the same settings on PyTorch, side by side; int8 weights
    # with float activations; int8-dynamic where the default is something else.
    variants = {
        "default": (default_quantize, "auto", True),
        "torch": (default_quantize, "torch", True),
        "int8": ("int8", "auto", True),
    }
    if device == "cuda":
        # The default without its CUDA graph: each token's ~600 kernels launched one by one.
        variants["eager"] = (default_quantize, "torch", False)
    else:  # int8 activations use fbgemm, a CPU library
        variants["int8_dynamic"] = ("int8-dynamic", "auto", True)
    kept: dict[str, Any] = {}
    for label, (quantize, backend, cuda_graphs) in variants.items():
        if label != "default" and (quantize, backend, cuda_graphs) == variants["default"]:
            copied = {f"{label}_{key[8:]}": value for key, value in figures.items() if key.startswith("default_")}
            figures.update(copied)
            continue
        engine = MusicEngine(
            copy.deepcopy(network).to(placement.dtype),
            processor,
            "musicgen-small-random",
            placement,
            quantize=quantize,
            backend=backend,
            source=folder,
            openvino_cache=cache,
            cuda_graphs=cuda_graphs,
            data_dir=scratch,  # where a clip to continue is kept
        )
        # Warm-up: thread pools, kernel choice; on a GPU the whole clip (a second's work), since the
        # first clip of a length also pays for the GPU memory its cache and graph take.
        engine.generate(request if device == "cuda" else request.model_copy(update={"duration": 0.5}))
        clock = StepTimes(synchronize_gpu=False)
        synchronize(device)
        result = engine.generate(request, on_progress=clock.on_progress)
        synchronize(device)
        total = time.perf_counter() - clock.start
        audio = result.outputs[0].audio[:, 0]
        figures[f"{label}_weights"] = engine.placement.dtype_name
        figures[f"{label}_backend"] = engine.placement.backend
        figures[f"{label}_s"] = total
        figures[f"{label}_rtf"] = total / seconds
        figures[f"{label}_ms_per_token"] = 1000 * clock.step_seconds()
        figures[f"{label}_snr_db"] = snr(reference_audio, audio)
        logits = engine.sampler.teacher_forced_logits(inputs["input_ids"], inputs["attention_mask"], codes)
        figures[f"{label}_logits_snr_db"] = snr(logits_reference, logits.float().cpu().numpy())
        figures[f"{label}_ratio"] = figures["baseline_rtf"] / figures[f"{label}_rtf"]
        if engine.load_timings:
            figures[f"{label}_convert_s"] = engine.load_timings["convert_s"] + engine.load_timings["compile_s"]
        say(
            f"music {label} ({engine.placement.dtype_name}): {total:.1f} s, RTF {total / seconds:.2f} "
            f"({figures[f'{label}_ratio']:.2f}x the baseline), {figures[f'{label}_ms_per_token']:.0f} ms/token, "
            f"logits SNR {figures[f'{label}_logits_snr_db']:.1f} dB"
        )
        if label in ("default", "torch"):
            kept[label] = engine
        del engine
    if kept["default"].placement.backend != "torch":
        figures.update(token_speedup(kept["default"], kept["torch"], request, say))
    figures.update(batch_of_clips(kept["default"], request, say))
    figures.update(continuation(kept["default"], network, processor, request, figures["default_rtf"], say))
    figures.update(long_form(kept["default"], request, figures["default_rtf"], say))
    return figures


#: The clip a continuation starts from, and the long piece's length (two windows of 30 s context).
PROMPT_SECONDS, LONG_FORM_SECONDS = 2.0, 60.0


def continuation(
    engine: Any, network: Any, processor: Any, request: MusicRequest, default_rtf: float, say: Say
) -> dict[str, Any]:
    """A piece of `request.duration` seconds continuing a PROMPT_SECONDS clip (at most half of it): muselab's engine
    against transformers' `generate` with the same audio prompt (float32, as the baseline), timed
    in turn in this process. The real-time factors count the new audio only."""
    from muselab.uploads import InputStore

    prompt_seconds = min(PROMPT_SECONDS, request.duration / 2)
    made = engine.generate(request.model_copy(update={"duration": prompt_seconds})).outputs[0].audio
    clip = InputStore(engine.plan.inputs_dir).keep_audio(made.T, engine.sample_rate)
    piece = request.model_copy(update={"audio_prompt": clip})
    new_seconds = request.duration - prompt_seconds
    prompt_frames = math.ceil(prompt_seconds * engine.frame_rate)
    tokens = engine.tokens_for(request.duration) - prompt_frames
    inputs = processor(audio=made[:, 0], sampling_rate=engine.sample_rate, text=[MUSIC_PROMPT], return_tensors="pt")
    inputs = inputs.to(engine.placement.device)

    def ours() -> float:
        started = time.perf_counter()
        engine.generate(piece)
        return time.perf_counter() - started

    def theirs() -> float:
        with torch.inference_mode():
            started = time.perf_counter()
            network.generate(**inputs, do_sample=True, max_new_tokens=tokens, guidance_scale=3.0)
            return time.perf_counter() - started

    ours()  # warm-up: the prompt's shapes
    speedup = alternated_speedups(theirs, ours, rounds=1)[0]
    ours_s = ours()
    figures = {
        "continuation_prompt_seconds": prompt_seconds,
        "continuation_new_seconds": new_seconds,
        "continuation_s": ours_s,
        "continuation_rtf": ours_s / new_seconds,
        "continuation_over_default_rtf": ours_s / new_seconds / default_rtf,
        "continuation_vs_generate": speedup,
    }
    say(
        f"music continuation ({prompt_seconds:g} s clip, {new_seconds:g} s new): {ours_s:.1f} s, RTF "
        f"{figures['continuation_rtf']:.2f} ({figures['continuation_over_default_rtf']:.2f}x the default's), "
        f"{speedup:.2f}x transformers' generate with the same audio prompt"
    )
    return figures


def long_form(engine: Any, request: MusicRequest, default_rtf: float, say: Say) -> dict[str, Any]:
    """A LONG_FORM_SECONDS piece in windows (30 s context, 18 s stride): its real-time factor
    against the default clip's, the decoding and the windows' prompts included."""
    piece = request.model_copy(update={"duration": LONG_FORM_SECONDS})
    clock = StepTimes(synchronize_gpu=False)
    engine.generate(piece, on_progress=clock.on_progress)
    total = time.perf_counter() - clock.start
    windows = len(engine.windows(piece))
    figures = {
        "long_form_seconds": LONG_FORM_SECONDS,
        "long_form_windows": windows,
        "long_form_s": total,
        "long_form_rtf": total / LONG_FORM_SECONDS,
        "long_form_over_default_rtf": total / LONG_FORM_SECONDS / default_rtf,
        "long_form_ms_per_token": 1000 * clock.step_seconds(),
    }
    say(
        f"music long form ({LONG_FORM_SECONDS:g} s in {windows} windows): {total:.1f} s, RTF "
        f"{figures['long_form_rtf']:.2f} ({figures['long_form_over_default_rtf']:.2f}x the "
        f"{request.duration:g} s default's), {figures['long_form_ms_per_token']:.0f} ms a token"
    )
    return figures


#: The clips' length for `batch_of_clips` at most: short, so the quick run stays quick (four clips
#: are timed twice); the ratio grows a little with length, as each clip's KV cache gets longer.
CLIPS_SECONDS = 2.0


def batch_of_clips(engine: Any, request: MusicRequest, say: Say) -> dict[str, Any]:
    """Four clips of one request (sampled as one batch) against one clip of the same length, on
    the same engine, timed in turn (four, one, four): `clips4_over_one` is the mean of the two
    four-clip times over the one-clip time; 4 would mean batching gained nothing. Beside it, the
    median token of each (`clips4_ms_per_token`: one step of the batch, all its rows), which is
    most of either time; the rest is mostly EnCodec, run once per clip."""
    one = request.model_copy(update={"duration": min(request.duration, CLIPS_SECONDS), "num_clips": 1})
    four = one.model_copy(update={"num_clips": 4})
    # Warm-up for the batch's shapes (8 rows where guided): kernel choice, OpenVINO's plans.
    engine.generate(four.model_copy(update={"duration": 0.5}))

    tokens: dict[int, list[float]] = {1: [], 4: []}

    def seconds(clips: MusicRequest) -> float:
        clock = StepTimes(synchronize_gpu=False)
        engine.generate(clips, on_progress=clock.on_progress)  # ends with the audio on the CPU
        tokens[clips.num_clips].append(clock.step_seconds())
        return time.perf_counter() - clock.start

    times: dict[int, list[float]] = {1: [], 4: []}

    def timed(clips: MusicRequest) -> float:
        times[clips.num_clips].append(seconds(clips))
        return times[clips.num_clips][-1]

    ratio = alternated_speedups(lambda: timed(four), lambda: timed(one), rounds=1)[0]
    batch = engine.clips_per_batch(four, engine.tokens_for(four.duration))
    say(
        f"music: 4 clips of {one.duration:g} s in one request ({4 // batch} batch(es) of {batch}): "
        f"{ratio:.2f}x the time of one clip ({statistics.mean(times[4]):.1f} s against {times[1][0]:.1f} s; "
        f"{1000 * statistics.mean(tokens[4]):.0f} against {1000 * tokens[1][0]:.0f} ms a token)"
    )
    return {
        "clips4_over_one": ratio,
        "clips4_s": statistics.mean(times[4]),
        "clips1_s": times[1][0],
        "clips4_ms_per_token": 1000 * statistics.mean(tokens[4]),
        "clips1_ms_per_token": 1000 * tokens[1][0],
        "clips_audio_seconds": one.duration,
        "clips_per_batch": batch,
    }


def token_speedup(default: Any, on_torch: Any, request: MusicRequest, say: Say, rounds: int = 2) -> dict[str, Any]:
    """The default engine's tokens against the same settings on PyTorch, alternated in one process
    (1.5 s clips): a speed-up the machine's drift between configurations cannot move."""
    short = request.model_copy(update={"duration": 1.5})

    def token_seconds(engine: Any) -> float:
        clock = StepTimes(synchronize_gpu=False)
        engine.generate(short, on_progress=clock.on_progress)
        return clock.step_seconds()

    speedups = alternated_speedups(lambda: token_seconds(on_torch), lambda: token_seconds(default), rounds)
    speedup = statistics.median(speedups)
    say(f"music: tokens alternated in one process: {default.placement.backend} {speedup:.2f}x PyTorch ({speedups})")
    return {"openvino_token_speedup": speedup, "openvino_token_speedups": speedups}


def default_music_quantize(placement: Placement) -> str:

    return music_quantize("auto", placement.device)[0]


def _teacher_forcing_codes(network: Any, length: int = 48) -> torch.Tensor:
    """A fixed random code sequence (codebooks, length) to compare logits on, free of sampling."""
    decoder = network.config.decoder
    shape = (decoder.num_codebooks, length)
    return torch.randint(0, decoder.vocab_size, shape, generator=torch.Generator().manual_seed(SEED))


def _teacher_forced_logits(network: Any, inputs: Any, codes: torch.Tensor) -> np.ndarray:
    """The plain model's logits (codebooks, positions, vocab) for `codes`: the float32 reference."""
    with torch.inference_mode():
        logits = network(
            input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"], decoder_input_ids=codes
        ).logits
    return logits.float().cpu().numpy()
