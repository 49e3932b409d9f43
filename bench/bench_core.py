"""Time muselab's real engines on full-size, random-weight musicgen-small and Stable Diffusion 1.x.

Random weights cost exactly the same compute as the real checkpoints (same shapes, same
kernels), so the figures hold for the real models; the outputs are noise. Nothing is
downloaded. A full run (25-step 512x512 image, 10 s of music) takes several minutes on a
2-core CPU.

    .venv/bin/python bench/bench_core.py [--json FILE] [--image-steps N] [--music-seconds S]
                                         [--skip-image] [--skip-music] [--dtype auto|float32|bfloat16]
"""

from __future__ import annotations

import argparse
import datetime as dt
import gc
import itertools
import json
import os
import platform
import resource
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

from muselab.devices import Placement, choose_placement, cpu_has_native_bf16, cpu_name
from muselab.engines.base import ProgressEvent
from muselab.engines.image import ImageEngine
from muselab.engines.music import MusicEngine
from muselab.quiet import quiet_libraries
from muselab.schemas import ImageRequest, MusicRequest
from muselab.testing.full import build_musicgen_small_random, build_sd1_random, build_taesd_random, count_parameters

#: FLOPs of one SD 1.x UNet call at batch 2 (classifier-free guidance), 64x64 latents (512x512
#: pixels), counted with torch.utils.flop_counter (see /work/shared/reference/baseline.md).
UNET_STEP_FLOP_512_CFG = 1.354e12
IMAGE_PROMPT = "a red fox in snow, watercolor"
MUSIC_PROMPT = "lo-fi beat with warm piano"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    quiet_libraries()
    placement = choose_placement("cpu", args.dtype)
    started = time.perf_counter()
    report: dict[str, Any] = {
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "machine": machine_info(),
        "placement": {"device": placement.device, "dtype": placement.dtype_name, "reason": placement.reason},
        "load_average_at_start": os.getloadavg(),
    }
    say(f"placement: {placement.device} {placement.dtype_name} ({placement.reason})")
    say(
        f"machine: {report['machine']['cpu']}, {report['machine']['cores']} cores, torch threads "
        f"{report['machine']['torch_threads']}, {report['machine']['cpu_capability']}"
    )

    matmul_start = bench_matmul(placement.dtype)
    say(f"matmul 4096^3 {placement.dtype_name}: {matmul_start['gflops']:.0f} GFLOP/s")
    report["matmul"] = {"start": matmul_start, "gflops": matmul_start["gflops"]}

    if not args.skip_image:
        report["image"] = bench_image(placement, args.image_steps)
        save(report, args.json)  # partial results survive a failure in a later part
        gc.collect()
    if not args.skip_music:
        report["music"] = bench_music(placement, args.music_seconds)
        save(report, args.json)
        gc.collect()
    # Measured again at the end: on a shared machine one measurement can land in a busy moment.
    matmul_end = bench_matmul(placement.dtype)
    say(f"matmul 4096^3 {placement.dtype_name} again: {matmul_end['gflops']:.0f} GFLOP/s")
    peak = max(matmul_start["gflops"], matmul_end["gflops"])
    report["matmul"] = {"start": matmul_start, "end": matmul_end, "gflops": peak}
    if "image" in report:
        image = report["image"]
        for key, step in (("median", image["step_seconds_median"]), ("best", image["step_seconds_min"])):
            image[f"unet_gflops_{key}_step"] = UNET_STEP_FLOP_512_CFG / step / 1e9
            image[f"unet_share_of_matmul_peak_{key}_step"] = UNET_STEP_FLOP_512_CFG / step / (peak * 1e9)
    report["total_seconds"] = time.perf_counter() - started
    report["load_average_at_end"] = os.getloadavg()

    print()
    print(summary_table(report))
    if args.json:
        save(report, args.json)
        say(f"wrote {args.json}")
    return 0


def save(report: dict[str, Any], path: str | None) -> None:
    if path:
        Path(path).write_text(json.dumps(report, indent=2) + "\n")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", metavar="FILE", help="also write every figure and the machine info here")
    parser.add_argument("--image-steps", type=int, default=25, help="sampling steps (default 25)")
    parser.add_argument("--music-seconds", type=float, default=10.0, help="seconds of audio (default 10)")
    parser.add_argument("--skip-image", action="store_true")
    parser.add_argument("--skip-music", action="store_true")
    parser.add_argument("--dtype", choices=["auto", "float32", "bfloat16"], default="auto")
    return parser.parse_args(argv)


def say(text: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {text}", flush=True)


def machine_info() -> dict[str, Any]:
    import diffusers
    import transformers

    return {
        "cpu": cpu_name(),
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "native_bf16": cpu_has_native_bf16(),
        "ram_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "transformers": transformers.__version__,
    }


# ---- memory ---------------------------------------------------------------------------------


def ru_maxrss_gib() -> float:
    """The process's peak resident set so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark (VmHWM) so the next part's peak is its own.

    Linux 4.0+. `ru_maxrss` reads the same mark, so after a reset it too covers only the part
    that follows (this process starts no threads that exit, which would keep an older peak).
    Returns False where the reset is refused; `ru_maxrss` then is the process's peak so far.
    """
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def vm_hwm_gib() -> float | None:
    """Peak resident set since the last `reset_peak_rss` (VmHWM), or None off Linux."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 2**20
    except OSError:
        pass
    return None


def memory_figures(reset_ok: bool) -> dict[str, Any]:
    hwm = vm_hwm_gib()
    return {
        "ru_maxrss_gib": round(ru_maxrss_gib(), 2),
        "vm_hwm_gib": round(hwm, 2) if hwm is not None else None,
        "peak_reset_before_part": reset_ok,
    }


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def cpu_share(cpu_start: float, wall: float) -> float:
    """This process's CPU time over wall time times torch's threads: about 1.0 on an idle machine.

    Well below 1.0 means other processes took the cores for part of the run (a shared machine):
    the timings of that part are then inflated, typically 2-3x when fully contended.
    """
    return (cpu_seconds() - cpu_start) / (wall * torch.get_num_threads())


# ---- matmul peak ----------------------------------------------------------------------------


def bench_matmul(dtype: torch.dtype, n: int = 4096, repeats: int = 3) -> dict[str, Any]:
    """Best of `repeats` n x n x n matmuls in `dtype`: the practical compute ceiling here."""
    a = torch.randn(n, n, dtype=dtype)
    b = torch.randn(n, n, dtype=dtype)
    torch.mm(a, b)  # warm-up: thread pool, oneDNN kernel selection
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        torch.mm(a, b)
        times.append(time.perf_counter() - t0)
    best = min(times)
    return {"n": n, "seconds": times, "gflops": 2 * n**3 / best / 1e9}


# ---- image ----------------------------------------------------------------------------------


class EventLog:
    """Records each progress event with its perf_counter time."""

    def __init__(self, label: str, every: int = 1):
        self.label, self.every = label, every
        self.events: list[tuple[float, ProgressEvent]] = []

    def __call__(self, event: ProgressEvent) -> None:
        self.events.append((time.perf_counter(), event))
        if event.stage != "generating" or event.step % self.every == 0 or event.step == event.total:
            eta = f", eta {event.eta:.0f} s" if event.eta is not None else ""
            say(f"  {self.label} {event.stage} {event.step}/{event.total} ({event.elapsed:.1f} s{eta})")

    def times(self, stage: str) -> list[float]:
        return [t for t, event in self.events if event.stage == stage]


def bench_image(placement: Placement, steps: int) -> dict[str, Any]:
    reset_ok = reset_peak_rss()
    t0 = time.perf_counter()
    pipe = build_sd1_random(placement.dtype)
    build_seconds = time.perf_counter() - t0
    engine = ImageEngine(pipe, "sd1.x-random", placement)

    # CLIP text encoding on its own (the pipeline does it once per image: prompt + negative).
    encode_times = []
    with torch.inference_mode():
        for _ in range(3):
            t = time.perf_counter()
            pipe.encode_prompt(
                IMAGE_PROMPT,
                device=placement.device,
                num_images_per_prompt=1,
                do_classifier_free_guidance=True,
            )
            encode_times.append(time.perf_counter() - t)

    request = ImageRequest(
        prompt=IMAGE_PROMPT,
        width=512,
        height=512,
        steps=steps,
        guidance=7.5,
        scheduler="DPM++ 2M Karras",
        seed=1,
    )
    say(f"image: {steps} steps, 512x512, DPM++ 2M Karras, guidance 7.5 ({placement.dtype_name})")
    log = EventLog("image", every=1)
    cpu_start, start = cpu_seconds(), time.perf_counter()
    result = engine.generate(request, on_progress=log)
    end = time.perf_counter()
    share = cpu_share(cpu_start, end - start)
    step_at = log.times("generating")
    intervals = [b - a for a, b in zip([start, *step_at[:-1]], step_at, strict=True)]
    later = intervals[1:] or intervals  # step 1 carries the text encoding and set-up
    per_step = statistics.median(later)
    image = result.outputs[0].image
    figures = {
        "steps": steps,
        "size": [image.width, image.height],
        "scheduler": "DPM++ 2M Karras",
        "guidance": 7.5,
        "build_seconds": build_seconds,
        "parameters": {
            "unet": count_parameters(pipe.unet),
            "vae": count_parameters(pipe.vae),
            "text_encoder": count_parameters(pipe.text_encoder),
        },
        "text_encode_seconds": min(encode_times),
        "seconds": end - start,
        "cpu_share": share,
        "engine_seconds": result.seconds,
        "first_step_seconds": intervals[0],
        "step_seconds": intervals,
        "step_seconds_median": per_step,
        "step_seconds_min": min(later),
        "step_seconds_max": max(later),
        "decode_seconds": end - step_at[-1],
        **memory_figures(reset_ok),
    }
    say(
        f"image: {figures['seconds']:.1f} s, {per_step:.2f} s/step (median of steps 2..{steps}), "
        f"decode {figures['decode_seconds']:.1f} s"
    )
    figures["fast_decode_seconds"] = time_fast_decoder(engine, request)
    say(f"image: the fast decoder (TAESD) decodes in {figures['fast_decode_seconds']:.2f} s")
    del engine, pipe, result, image
    return figures


def time_fast_decoder(engine: ImageEngine, request: ImageRequest) -> float:
    """Decode time with `decoder="fast"` (TAESD architecture, random weights), after one step."""
    engine._fast_vaes["taesd-random"] = build_taesd_random(engine.placement.dtype)
    fast = request.model_copy(update={"steps": 1, "decoder": "fast", "decoder_model": "taesd-random"})
    log = EventLog("fast decoder", every=1)
    engine.generate(fast, on_progress=log)
    return time.perf_counter() - log.times("generating")[-1]


# ---- music ----------------------------------------------------------------------------------


def bench_music(placement: Placement, seconds: float) -> dict[str, Any]:
    reset_ok = reset_peak_rss()
    t0 = time.perf_counter()
    network, processor = build_musicgen_small_random(placement.dtype)
    build_seconds = time.perf_counter() - t0
    engine = MusicEngine(network, processor, "musicgen-small-random", placement)
    request = MusicRequest(prompt=MUSIC_PROMPT, duration=seconds, seed=1)
    tokens = engine.tokens_for(seconds)
    say(f"music: {seconds:g} s of audio = {tokens} decoder steps, guidance 3 ({placement.dtype_name})")
    log = EventLog("music", every=50)
    cpu_start, start = cpu_seconds(), time.perf_counter()
    result = engine.generate(request, on_progress=log)
    end = time.perf_counter()
    share = cpu_share(cpu_start, end - start)
    token_at = log.times("generating")
    decoded_at = log.times("decoding")
    gaps = [b - a for a, b in itertools.pairwise(token_at)]
    ms_per_token = 1000 * statistics.median(gaps) if gaps else None
    ms_mean = 1000 * (token_at[-1] - token_at[0]) / len(gaps) if gaps else None
    audio = result.outputs[0].audio
    figures = {
        "audio_seconds": seconds,
        "tokens": tokens,
        "audio_samples": int(audio.shape[0]),
        "build_seconds": build_seconds,
        "parameters": {
            "text_encoder": count_parameters(network.text_encoder),
            "decoder": count_parameters(network.decoder),
            "audio_encoder": count_parameters(network.audio_encoder),
        },
        "seconds": end - start,
        "cpu_share": share,
        "engine_seconds": result.seconds,
        "real_time_factor": (end - start) / seconds,
        "first_token_seconds": token_at[0] - start if token_at else None,
        "ms_per_token_median": ms_per_token,
        "ms_per_token_mean": ms_mean,
        "decode_seconds": (decoded_at[0] if decoded_at else end) - token_at[-1],
        **memory_figures(reset_ok),
    }
    say(
        f"music: {figures['seconds']:.1f} s for {seconds:g} s of audio "
        f"(RTF {figures['real_time_factor']:.2f}), "
        f"{ms_per_token or 0:.0f} ms/token, decode {figures['decode_seconds']:.2f} s"
    )
    del engine, network, processor, result, audio
    return figures


# ---- summary --------------------------------------------------------------------------------


def summary_table(report: dict[str, Any]) -> str:
    machine, dtype = report["machine"], report["placement"]["dtype"]
    rows = [
        (
            "machine",
            f"{machine['cpu']}, {machine['cores']} cores, {machine['cpu_capability']}, "
            f"native bf16 {'yes' if machine['native_bf16'] else 'no'}",
        ),
        ("dtype", f"{dtype} ({report['placement']['reason']})"),
        (
            f"matmul 4096^3 {dtype}",
            f"{report['matmul']['gflops']:.0f} GFLOP/s (best of 3, at start "
            f"{report['matmul']['start']['gflops']:.0f}, at end {report['matmul']['end']['gflops']:.0f})",
        ),
    ]
    image = report.get("image")
    if image:
        rows += [
            (
                f"image 512x512, {image['steps']} steps DPM++ 2M Karras, CFG 7.5",
                f"{image['seconds']:.1f} s per image",
            ),
            (
                "  UNet step (batch 2), median of steps 2..N",
                f"{image['step_seconds_median']:.2f} s (min {image['step_seconds_min']:.2f}, "
                f"max {image['step_seconds_max']:.2f})",
            ),
            ("  first step (incl. text encoding, set-up)", f"{image['first_step_seconds']:.2f} s"),
            ("  VAE decode + post-processing", f"{image['decode_seconds']:.1f} s"),
            ("  fast decoder (TAESD) decode + post-processing", f"{image['fast_decode_seconds']:.2f} s"),
            ("  CLIP text encoding (prompt + negative)", f"{image['text_encode_seconds']:.2f} s"),
            (
                "  UNet share of matmul peak, median step",
                _share(image, "median"),
            ),
            ("  UNet share of matmul peak, fastest step", _share(image, "best")),
            ("  peak RSS (image part)", _rss(image)),
            ("  CPU share (1.0 = both cores ours throughout)", f"{image['cpu_share']:.2f}"),
        ]
    music = report.get("music")
    if music:
        rows += [
            (
                f"music {music['audio_seconds']:g} s ({music['tokens']} tokens), CFG 3",
                f"{music['seconds']:.1f} s (real-time factor {music['real_time_factor']:.2f})",
            ),
            (
                "  per token, median (mean)",
                f"{music['ms_per_token_median']:.0f} ms ({music['ms_per_token_mean']:.0f} ms)",
            ),
            ("  first token (incl. text encoding)", f"{music['first_token_seconds']:.2f} s"),
            ("  EnCodec decode", f"{music['decode_seconds']:.2f} s"),
            ("  peak RSS (music part)", _rss(music)),
            ("  CPU share (1.0 = both cores ours throughout)", f"{music['cpu_share']:.2f}"),
        ]
    rows.append(("whole benchmark (incl. building models)", f"{report['total_seconds']:.0f} s"))
    load = " / ".join(
        ", ".join(f"{x:.1f}" for x in report[key]) for key in ("load_average_at_start", "load_average_at_end")
    )
    rows.append(("load average 1/5/15 min, start / end", f"{load} ({machine['cores']} cores)"))
    width = max(len(name) for name, _ in rows)
    return "\n".join(f"{name.ljust(width)}  {value}" for name, value in rows)


def _share(image: dict[str, Any], key: str) -> str:
    share = image[f"unet_share_of_matmul_peak_{key}_step"]
    return f"{100 * share:.0f}% ({image[f'unet_gflops_{key}_step']:.0f} GFLOP/s)"


def _rss(figures: dict[str, Any]) -> str:
    scope = "this part only" if figures["peak_reset_before_part"] else "whole process so far"
    return f"{figures['ru_maxrss_gib']:.2f} GiB (ru_maxrss, {scope}; includes building the models)"


if __name__ == "__main__":
    raise SystemExit(main())
