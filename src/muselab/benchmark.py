"""`muselab bench`: muselab's defaults against a plain script, side by side, in one run.

Full-size architectures with random weights (`muselab.testing.full`): every matmul and convolution
costs what it costs with the real checkpoints, nothing is downloaded, and the output is noise.

- **baseline**: what a plain script does. Images: `StableDiffusionPipeline` in float32 with the
  checkpoint's PNDM scheduler, 50 steps, guidance 7.5, VAE decode. Music: float32
  `MusicgenForConditionalGeneration.generate` with the checkpoint's sampling settings.
- **default**: muselab's engines with muselab's defaults on this machine (dtype from
  `choose_placement`, DPM++ 2M Karras in 25 steps, the lean MusicGen loop, int8 decoder on a CPU).
- **int8**: the same with `quantize="int8"`; its output is compared with float32's for the same seed.
- **fast**: the distilled path: sd-turbo's architecture, 1 step, tiny-autoencoder (TAESD) decode.
- **int8-full** (its own part, `--only int8-full`): the image default with `quantize="int8-full"`
  (OpenVINO, int8 activations calibrated once), against the same baseline; its calibration alone
  takes minutes on 2 cores, so the default quick run leaves it out.

`--quick` times a few denoising steps and computes steps x step time + text encoding + decode (the
JSON says so with `"extrapolated": true`); a full run makes every image whole.
"""

from __future__ import annotations

import copy
import datetime as dt
import functools
import gc
import json
import math
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from muselab.config import GENERIC_IMAGE_DEFAULTS
from muselab.devices import (
    Placement,
    choose_placement,
    cpu_has_native_bf16,
    cpu_name,
    measure_matmul_gflops,
    physical_memory_gib,
    synchronize,
)
from muselab.engines.base import ProgressEvent
from muselab.schemas import ImageRequest, MusicRequest

IMAGE_PROMPT = "a red fox in snow, watercolor"
MUSIC_PROMPT = "lo-fi beat with warm piano"
#: Width and height of every benchmark image (the tests shrink it for the tiny models).
IMAGE_SIZE = 512
BASELINE_STEPS = 50
DEFAULT_SAMPLER = "DPM++ 2M Karras"
SEED = 1

Say = Callable[[str], None]


def run(
    quick: bool = True,
    json_path: Path | None = None,
    parts: tuple[str, ...] | None = None,
    music_seconds: float | None = None,
    say: Say | None = None,
    isolate: bool = True,
) -> dict[str, Any]:
    """Run the benchmark; the report (also written to `json_path` after every part) is returned.

    With `isolate`, every configuration runs in a fresh process of its own: its peak memory is then
    its own (an allocator keeps freed memory, so a second model in one process starts from the
    first one's high-water mark) and no configuration inherits another's warm caches.
    """
    from muselab.quiet import quiet_libraries

    quiet_libraries()
    say = say or _say
    placement = choose_placement()
    if parts is None:  # on a GPU, `--compile` is one more option to measure
        parts = ("image", "fast", "music", *(("compiled",) if placement.device == "cuda" else ()))
    started = time.perf_counter()
    report: dict[str, Any] = {
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "quick": quick,
        "machine": machine_info(),
        "placement": {"device": placement.device, "dtype": placement.dtype_name, "reason": placement.reason},
        "load_average_at_start": os.getloadavg(),
        "parts": list(parts),
    }
    say(f"{report['machine']['cpu']}, {report['machine']['cores']} cores; default: {placement.reason}")
    report["peak"] = measure_peaks(placement)
    say(
        f"matmul peak: fp32 {report['peak']['matmul_gflops_fp32']:.0f} GFLOP/s, bf16 "
        f"{report['peak']['matmul_gflops_bf16']:.0f} GFLOP/s; copy {report['peak']['copy_gbps']:.1f} GB/s"
    )
    save(report, json_path)
    # Quick mode on a CPU times 2 steps per image configuration (the first carries set-up) and
    # extrapolates; a GPU runs whole images in seconds, so it times them all.
    steps = 2 if quick and placement.device == "cpu" else None
    with tempfile.TemporaryDirectory(prefix="muselab-bench-") as scratch:
        configurations = [
            *(IMAGE_CONFIGURATIONS if "image" in parts else ()),
            *(INT8_FULL_CONFIGURATION if "int8-full" in parts else ()),
        ]
        if configurations:
            report["image"] = bench_image(placement, steps, Path(scratch), say, isolate, tuple(configurations))
            save(report, json_path)
        if "fast-int8-full" in parts:
            part = _run_part("bench_fast_int8_full", {"scratch": scratch}, isolate, say)
            report.setdefault("image", {}).update(part)
            save(report, json_path)
        if "fast" in parts:
            report.setdefault("image", {}).update(_run_part("bench_fast", {}, isolate, say))
            image = report["image"]
            if "baseline_s" in image:
                image["fast_ratio"] = image["baseline_s"] / image["fast_s"]
            save(report, json_path)
        if "music" in parts:
            seconds = music_seconds or (5.0 if quick else 10.0)
            report["music"] = _run_part("bench_music", {"seconds": seconds}, isolate, say)
            save(report, json_path)
        if "compiled" in parts:  # last: compiling takes minutes, and its failure loses nothing else
            try:
                report.setdefault("image", {}).update(bench_compiled(steps, Path(scratch), isolate, say))
            except RuntimeError as exc:
                say(f"image compiled: failed ({exc}); the rest of the report stands")
                report.setdefault("image", {})["compiled_error"] = str(exc)
            save(report, json_path)
    # Measured again at the end, the best of the two kept: one measurement on a shared machine can
    # land in a busy moment, and a low peak would flatter the UNet's share of it.
    again = measure_peaks(placement)
    report["peak_at_start"] = dict(report["peak"])
    report["peak"] = {key: max(value, again[key]) for key, value in report["peak"].items()}
    image = report.get("image", {})
    if "default_unet_step_s" in image:
        image["unet_step_flop"] = flop = unet_step_flop()
        image["unet_step_peak_fraction"] = (
            flop / image["default_unet_step_s"] / 1e9 / peak_for(report["peak"], placement.dtype)
        )
    report["total_seconds"] = time.perf_counter() - started
    report["load_average_at_end"] = os.getloadavg()
    save(report, json_path)
    return report


def _run_part(function: str, arguments: dict[str, Any], isolate: bool, say: Say) -> dict[str, Any]:
    """`function(**arguments)` of this module, in a child process when `isolate`; its progress
    lines go to stderr as they come, its result comes back as JSON on stdout."""
    if not isolate:
        return globals()[function](say=say, **arguments)
    command = [sys.executable, "-m", "muselab.benchmark", function, json.dumps(arguments)]
    child = subprocess.run(command, stdout=subprocess.PIPE, text=True, check=False)
    if child.returncode != 0:
        raise RuntimeError(f"benchmark part {function} failed (exit {child.returncode}); its error is above")
    return json.loads(child.stdout.strip().splitlines()[-1])


def _child_main(argv: list[str]) -> int:
    from muselab.devices import flush_denormals
    from muselab.quiet import quiet_libraries

    flush_denormals()  # as muselab's job workers run (before any tensor operation of this process)
    quiet_libraries()
    function, arguments = argv[0], json.loads(argv[1])
    result = globals()[function](say=_say_to_stderr, **arguments)
    print(json.dumps(result, default=_json_default))
    return 0


def save(report: dict[str, Any], path: Path | None) -> None:
    if path is not None:
        tmp = Path(path).with_suffix(".tmp")
        tmp.write_text(json.dumps(report, indent=2, default=_json_default) + "\n")
        tmp.replace(path)


def _json_default(value: Any) -> Any:
    return str(value)


def _say(text: str, stream: Any = None) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {text}", file=stream or sys.stdout, flush=True)


def _say_to_stderr(text: str) -> None:
    """A child's progress lines: its stdout carries only the JSON result."""
    _say(text, sys.stderr)


# ---- machine ------------------------------------------------------------------------------------


def machine_info() -> dict[str, Any]:
    import diffusers
    import transformers

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {
        "cpu": cpu_name(),
        "cores": os.cpu_count(),
        "gpu": gpu,
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "native_bf16_flag": cpu_has_native_bf16(),
        "ram_gib": round(physical_memory_gib(), 1),
        "python": platform.python_version(),
        "diffusers": diffusers.__version__,
        "transformers": transformers.__version__,
    }


def measure_peaks(placement: Placement) -> dict[str, float]:
    """The practical ceilings: big matmuls in fp32 and bf16 (and fp16 on a GPU), a memory copy."""
    device = placement.device
    peaks = {
        "matmul_gflops_fp32": matmul_gflops(torch.float32, device),
        "matmul_gflops_bf16": matmul_gflops(torch.bfloat16, device),
        "copy_gbps": copy_gbps(device),
    }
    if device == "cuda":
        peaks["matmul_gflops_fp16"] = matmul_gflops(torch.float16, device)
    return peaks


def peak_for(peaks: dict[str, float], dtype: torch.dtype) -> float:
    name = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[dtype]
    return peaks[f"matmul_gflops_{name}"]


def matmul_gflops(dtype: torch.dtype, device: str = "cpu", n: int = 4096, repeats: int = 3) -> float:
    """Best of `repeats` n x n x n matmuls; on AVX2-only CPUs bf16 is emulated, so a smaller one."""
    if device == "cpu" and dtype == torch.bfloat16 and not cpu_has_native_bf16():
        n, repeats = 1024, 1  # emulated: about 100x slower, a big one would take minutes
    return measure_matmul_gflops(dtype, device, n, repeats)


def speed_index(device: str = "cpu") -> float:
    """The machine's fp32 matmul speed right now (a 2048^3 product, best of 2, about 0.2 s).

    Taken before and after each timed part: parts run one after another, and on a shared machine
    the speed drifts, which moves a ratio between two parts as much as any change would."""
    return matmul_gflops(torch.float32, device, n=2048, repeats=2)


def copy_gbps(device: str = "cpu", megabytes: int = 256) -> float:
    """Bytes read plus bytes written per second copying a 256 MB buffer (best of 3)."""
    source = torch.empty(megabytes * 2**20 // 4, device=device)
    target = torch.empty_like(source)
    target.copy_(source)
    best = float("inf")
    for _ in range(3):
        synchronize(device)
        started = time.perf_counter()
        target.copy_(source)
        synchronize(device)
        best = min(best, time.perf_counter() - started)
    return 2 * source.numel() * 4 / best / 1e9


# ---- memory -------------------------------------------------------------------------------------


class PeakMemory:
    """Peak resident memory of one part: the kernel's high-water mark (VmHWM), reset at the start
    (Linux); on a GPU, torch's peak allocation. Only a part's own models and work are counted, as
    the previous part's are freed before it starts."""

    def __init__(self, device: str):
        self.device = device
        gc.collect()
        try:
            Path("/proc/self/clear_refs").write_text("5")
            self.reset = True
        except OSError:
            self.reset = False
        if device == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()

    def gib(self) -> float:
        if self.device == "cuda":
            return torch.cuda.max_memory_allocated() / 2**30
        try:
            for line in Path("/proc/self/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 2**20
        except OSError:
            pass
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


# ---- images -------------------------------------------------------------------------------------


class StepTimes:
    """Times of the denoising steps of one generation, from its progress events or callbacks."""

    def __init__(self, stop_after: int | None = None, synchronize_gpu: bool = True):
        self.start = time.perf_counter()
        self.marks: list[float] = []
        self.stop_after = stop_after
        #: False where the timed code keeps the GPU within a step of its progress events itself
        #: (MusicGen's sampler): a full sync per token would undo its overlap of Python and GPU.
        self.synchronize_gpu = synchronize_gpu

    def on_progress(self, event: ProgressEvent) -> None:
        if event.stage == "generating":
            self.mark()

    def mark(self) -> None:
        if self.synchronize_gpu and torch.cuda.is_available():  # the GPU's work, not Python's queueing
            torch.cuda.synchronize()
        self.marks.append(time.perf_counter())
        if self.stop_after is not None and len(self.marks) >= self.stop_after:
            raise _EnoughSteps()

    def step_seconds(self) -> float:
        """Median step, leaving out the first (it carries text encoding and set-up)."""
        intervals = [b - a for a, b in zip([self.start, *self.marks[:-1]], self.marks, strict=True)]
        return statistics.median(intervals[1:] or intervals)


class _EnoughSteps(Exception):
    """Stops a baseline run once enough steps were timed (quick mode)."""


def time_text_encoding(pipe: Any, device: str) -> float:
    times = []
    with torch.inference_mode():
        for _ in range(3):
            synchronize(device)
            started = time.perf_counter()
            pipe.encode_prompt(IMAGE_PROMPT, device=device, num_images_per_prompt=1, do_classifier_free_guidance=True)
            synchronize(device)
            times.append(time.perf_counter() - started)
    return min(times)


def time_vae_decode(pipe: Any, dtype: torch.dtype, device: str) -> float:
    """One 512x512 decode with post-processing to a PIL image, as the pipeline ends."""
    side = IMAGE_SIZE // pipe.vae_scale_factor
    latents = torch.randn(1, 4, side, side, generator=torch.Generator().manual_seed(SEED)).to(device, dtype)
    with torch.inference_mode():
        synchronize(device)
        started = time.perf_counter()
        image = pipe.vae.decode(latents / pipe.vae.config.scaling_factor).sample
        pipe.image_processor.postprocess(image, output_type="pil")
        synchronize(device)
    return time.perf_counter() - started


#: The image configurations a run compares with the baseline: (name in the report, --quantize).
IMAGE_CONFIGURATIONS = (("default", "none"), ("int8", "int8"))
INT8_FULL_CONFIGURATION = (("int8_full", "int8-full"),)


def bench_image(
    placement: Placement,
    steps: int | None,
    scratch: Path,
    say: Say,
    isolate: bool = True,
    configurations: tuple[tuple[str, str], ...] = IMAGE_CONFIGURATIONS,
) -> dict[str, Any]:
    """Baseline vs muselab's `configurations` for one 512x512 SD 1.x image; `steps` set = quick mode.

    The baseline's process also runs muselab's defaults on PyTorch (same float32 UNet, side by
    side; its picture is the reference for every PSNR) and saves the pipeline, which the OpenVINO
    configurations then load the way a user's model loads, their one-time conversion timed apart."""
    figures: dict[str, Any] = {"size": [IMAGE_SIZE] * 2, "extrapolated": steps is not None, "timed_steps": steps}
    names = ["torch", *(name for name, _ in configurations)]
    images = {name: str(scratch / f"{name}.npy") for name in names}
    folder, cache = str(scratch / "sd1"), str(scratch / "openvino-cache")
    figures.update(
        _run_part("image_baseline", {"steps": steps, "save_image": images["torch"], "save_model": folder}, isolate, say)
    )
    figures["default_backend"] = default_image_backend(placement, "none")
    for name, quantize in configurations:
        backend = "openvino" if quantize == "int8-full" else default_image_backend(placement, quantize)
        where = {"folder": folder, "cache": cache, "quantize": quantize}
        if backend == "openvino":
            part = _run_part("image_convert", where, isolate, say)
            figures.update({f"{name}_{key}": value for key, value in part.items()})
        # PyTorch configurations are built in memory like the baseline, so their peak memory compares
        # like with like; reading a float32 checkpoint from disk adds a loading peak of its own
        # (see docs/PERFORMANCE.md). OpenVINO's needs the saved pipeline to convert and cache.
        run = {**where, "backend": backend, "steps": steps, "save_to": images[name]}
        if backend == "torch":
            run["folder"] = None
        elif name in ("default", "int8_full"):
            run["against_torch"] = True
        part = _run_part("image_engine_run", run, isolate, say)
        # The steps alternated beside PyTorch's: the default's are the report's own figures.
        beside = part.pop("beside", {})
        figures.update({f"{name}_{key}": value for key, value in part.items()})
        figures.update({key if name == "default" else f"{name}_{key}": value for key, value in beside.items()})
        figures[f"{name}_s"] = figures[f"{name}_image_s"]
        figures[f"{name}_ratio"] = figures["baseline_s"] / figures[f"{name}_s"]
        figures[f"{name}_psnr_db"] = psnr(np.load(images["torch"]), np.load(images[name]))
    figures["psnr_recipe"] = (
        f"{DEFAULT_SAMPLER}, {steps or GENERIC_IMAGE_DEFAULTS.steps} steps, guidance 7.5, seed {SEED}"
    )
    figures["torch_s"] = figures["torch_image_s"]
    figures["torch_ratio"] = figures["baseline_s"] / figures["torch_s"]
    if "openvino_step_speedup" in figures and placement.dtype == torch.float32:
        # The alternated PyTorch step is the baseline's own (float32, batch 2): the default's image
        # with its steps at the baseline's step time over the alternated speed-up.
        steps_s = figures["default_steps"] * figures["baseline_unet_step_s"] / figures["openvino_step_speedup"]
        default_s = figures["default_s"] - figures["default_steps"] * figures["default_unet_step_s"] + steps_s
        figures["default_ratio_drift_free"] = figures["baseline_s"] / default_s
    if "default_s" in figures:
        figures["unet_step_dtype"] = figures["default_dtype"]
        say(
            f"image default ({figures['default_dtype']}): {figures['default_s']:.0f} s per image "
            f"({figures['default_ratio']:.2f}x the baseline; PyTorch {figures['torch_ratio']:.2f}x)"
        )
    if "int8_s" in figures:
        figures["int8_memory_ratio"] = figures["int8_peak_rss_gb"] / figures["baseline_peak_rss_gb"]
        say(
            f"image int8: PSNR {figures['int8_psnr_db']:.1f} dB, peak memory {figures['int8_peak_rss_gb']:.2f} GiB "
            f"against the baseline's {figures['baseline_peak_rss_gb']:.2f} GiB"
        )
    if "int8_full_s" in figures:
        say(
            f"image int8-full: {figures['int8_full_s']:.0f} s per image ({figures['int8_full_ratio']:.2f}x the "
            f"baseline), PSNR {figures['int8_full_psnr_db']:.1f} dB"
        )
    return figures


def bench_compiled(steps: int | None, scratch: Path, isolate: bool, say: Say) -> dict[str, Any]:
    """The default with the UNet under torch.compile (`--compile`), compiled by a short image
    first; compared with the baseline and (PSNR) PyTorch float32's picture where the image part ran."""
    run = {"folder": None, "cache": "", "backend": "torch", "quantize": "none", "steps": steps, "compile": True}
    part = _run_part("image_engine_run", {**run, "save_to": str(scratch / "compiled.npy")}, isolate, say)
    figures = {f"compiled_{key}": value for key, value in part.items()}
    figures["compiled_s"] = figures["compiled_image_s"]
    if (scratch / "torch.npy").exists():
        figures["compiled_psnr_db"] = psnr(np.load(scratch / "torch.npy"), np.load(scratch / "compiled.npy"))
    say(f"image compiled ({figures['compiled_dtype']}): {figures['compiled_s']:.2f} s per image")
    return figures


def default_image_backend(placement: Placement, quantize: str) -> str:
    """The backend `--backend auto` gives an SD 1.x model on this machine (as `ImageEngine.load`)."""
    from muselab.engines.image.engine import auto_uses_openvino

    return "openvino" if auto_uses_openvino(placement.device, quantize) else "torch"


def image_baseline(
    steps: int | None, say: Say, save_image: str | None = None, save_model: str | None = None
) -> dict[str, Any]:
    """A plain script: float32 StableDiffusionPipeline, the checkpoint's PNDM, 50 steps, VAE decode.
    Then, on the same pipeline, muselab's defaults on PyTorch (`torch_*` figures; the picture to
    `save_image`), and the pipeline saved to `save_model` for the parts that load it."""
    from muselab.engines.image.engine import ImageEngine
    from muselab.testing import full

    device = choose_placement().device
    memory = PeakMemory(device)
    pipe = full.build_sd1_random(torch.float32, verbose=False).to(device)
    pipe.set_progress_bar_config(disable=True)
    text = time_text_encoding(pipe, device)
    speed_before = speed_index(device)
    say(f"image baseline: float32, PNDM {BASELINE_STEPS} steps ({'timing ' + str(steps) if steps else 'all'})")
    if device == "cuda":  # as muselab's configurations: a first image pays for GPU start-up, untimed
        pipe(IMAGE_PROMPT, width=IMAGE_SIZE, height=IMAGE_SIZE, num_inference_steps=2, guidance_scale=7.5)
    clock = StepTimes(stop_after=steps)
    try:
        pipe(
            IMAGE_PROMPT,
            width=IMAGE_SIZE,
            height=IMAGE_SIZE,
            num_inference_steps=BASELINE_STEPS,
            guidance_scale=7.5,
            generator=torch.Generator("cpu").manual_seed(SEED),
            output_type="pil",
            callback_on_step_end=lambda *args: (clock.mark(), args[-1])[1],
        )
        whole = time.perf_counter() - clock.start
    except _EnoughSteps:
        whole = None
    speed_after = speed_index(device)
    decode = time_vae_decode(pipe, torch.float32, device)
    step = clock.step_seconds()
    total = whole if whole is not None else text + BASELINE_STEPS * step + decode
    say(f"image baseline: {step:.2f} s/step, decode {decode:.1f} s -> {total:.0f} s per image")
    figures = {
        "baseline_text_encode_s": text,
        "baseline_unet_step_s": step,
        "baseline_decode_s": decode,
        "baseline_s": total,
        "baseline_peak_rss_gb": memory.gib(),  # before saving, whose buffers would count too
        "baseline_speed_gflops": [speed_before, speed_after],
    }
    engine = ImageEngine(pipe, "sd1.x-random", choose_placement(dtype="float32"))
    figures.update({f"torch_{key}": value for key, value in time_engine(engine, steps, say, save_image).items()})
    if save_model:
        say("image: saving the pipeline for the parts that load it (not timed)")
        pipe.save_pretrained(save_model, safe_serialization=True)
    return figures


def image_convert(folder: str, cache: str, quantize: str, say: Say) -> dict[str, Any]:
    """The one-time OpenVINO conversion of the saved pipeline, timed apart from generating."""
    memory = PeakMemory(choose_placement().device)
    engine = load_saved(folder, cache, "openvino", quantize, on_progress=lambda event: say(f"image: {event.note}"))
    return {**engine.load_timings, "convert_peak_rss_gb": memory.gib()}


def load_saved(folder: str, cache: str, backend: str, quantize: str, on_progress: Any = None) -> Any:
    """The saved benchmark pipeline, loaded the way `muselab image` loads a model folder."""
    from muselab.engines.image.engine import ImageEngine

    return ImageEngine.load(
        folder,
        choose_placement(),
        safety_checker=False,
        offline=True,
        quantize=quantize,
        backend=backend,
        openvino_cache=Path(cache),
        on_progress=on_progress,
    )


def image_engine_run(
    folder: str | None,
    cache: str,
    backend: str,
    quantize: str,
    steps: int | None,
    save_to: str,
    say: Say,
    against_torch: bool = False,
    compile: bool = False,
) -> dict[str, Any]:
    """Load the saved SD 1.x pipeline as muselab does (backend, int8; a converted model from the
    cache), or with no `folder` build it in memory as loading would (dtype, int8, `compile`), then
    one image with muselab's defaults; the picture is saved to `save_to` (.npy). A compiled UNet
    is compiled by a short image first, timed apart (`compile_s`): that cost is paid once per process."""
    from muselab.engines.image.engine import ImageEngine, load_dtype
    from muselab.testing import full

    placement = choose_placement()
    memory = PeakMemory(placement.device)
    started = time.perf_counter()
    if folder is None:
        pipe = full.build_sd1_random(load_dtype(placement, quantize), verbose=False)
        engine = ImageEngine(pipe, "sd1.x-random", placement, quantize=quantize, compile=compile)
    else:
        engine = load_saved(folder, cache, backend, quantize)
    figures: dict[str, Any] = {"load_s": time.perf_counter() - started}
    if compile:
        say("image: compiling the UNet (torch.compile) with a 2-step image, timed apart")
    figures.update(time_engine(engine, steps, say, save_to, warm_up=compile))
    if compile:
        figures["compile_s"] = figures["warm_up_s"]
    figures["peak_rss_gb"] = memory.gib()
    if against_torch and folder is not None:
        # Once the peak is read: PyTorch's UNet joins the process for the drift-free comparison.
        figures["beside"] = step_speedup(engine.pipe, Path(folder), say, engine.placement.dtype_name)
    return figures


def alternated_speedups(reference: Callable[[], float], ours: Callable[[], float], rounds: int) -> list[float]:
    """`ours` against `reference`, timed in turn in one process (reference, ours, reference, ours,
    reference): each speed-up divides the mean of the two reference times around one of ours, so
    the machine's drift between configurations cancels to first order."""
    previous = reference()
    speedups = []
    for _ in range(rounds):
        mine, after = ours(), reference()
        speedups.append((previous + after) / 2 / mine)
        previous = after
    return speedups


class ProbedSteps:
    """Steps timed with a matmul probe after each (and one before the first): each step's share of
    the peak is taken against the mean of the probes on either side of it, the machine's speed
    while it ran."""

    def __init__(self, probe: Callable[[], float], flop: float):
        self.probe, self.flop = probe, flop
        self.speed = probe()
        self.shares: dict[str, list[float]] = {}

    def timed(self, name: str, step: Callable[[], float]) -> Callable[[], float]:
        """`step` (returning its seconds), its shares of the peak recorded under `name`."""
        shares = self.shares.setdefault(name, [])

        def run() -> float:
            seconds = step()
            after = self.probe()
            shares.append(self.flop / seconds / 1e9 / ((self.speed + after) / 2))
            self.speed = after
            return seconds

        return run


def step_speedup(pipe: Any, folder: Path, say: Say, what: str = "OpenVINO", rounds: int = 2) -> dict[str, Any]:
    """The pipeline's converted (OpenVINO) UNet against PyTorch's read from `folder` (in float, the
    baseline's step), their steps alternated in one process: a speed-up the machine's drift
    between parts cannot move.

    A matmul probe in the step's dtype runs between the steps, so each step's share of the matmul
    peak is also taken against the machine's speed beside it (the mean of the probes before and
    after), not against the best the run saw elsewhere: on a shared machine that moves by a third
    between parts."""
    from diffusers import UNet2DConditionModel

    placement = choose_placement()
    torch_unet = UNet2DConditionModel.from_pretrained(folder / "unet", dtype=placement.dtype).eval()
    converted_unet, config, side = pipe.unet, pipe.unet.config, IMAGE_SIZE // pipe.vae_scale_factor
    generator = torch.Generator().manual_seed(SEED)
    sample = torch.randn(2, config.in_channels, side, side, generator=generator).to(placement.dtype)
    text = torch.randn(2, 77, config.cross_attention_dim, generator=generator).to(placement.dtype)
    timestep = torch.tensor(500.0)

    def seconds(unet: Any) -> Callable[[], float]:
        def step() -> float:
            started = time.perf_counter()
            unet(sample, timestep, text, return_dict=False)
            return time.perf_counter() - started

        return step

    with torch.inference_mode():
        seconds(torch_unet)()  # the first call carries one-off set-up (the converted one ran already)
        probed = ProbedSteps(lambda: matmul_gflops(placement.dtype, placement.device, repeats=1), unet_step_flop())
        torch_step, converted_step = (
            probed.timed("torch", seconds(torch_unet)),
            probed.timed("ours", seconds(converted_unet)),
        )
        speedups = alternated_speedups(torch_step, converted_step, rounds)
    speedup = statistics.median(speedups)
    say(f"image: UNet steps alternated in one process: {what} {speedup:.2f}x PyTorch ({speedups})")
    shares = probed.shares
    converted_share, torch_share = statistics.median(shares["ours"]), statistics.median(shares["torch"])
    say(
        f"image: UNet step's share of the matmul peak measured beside it: {what} {100 * converted_share:.0f}%, "
        f"PyTorch {100 * torch_share:.0f}%"
    )
    return {
        "openvino_step_speedup": speedup,
        "openvino_step_speedups": speedups,
        "unet_step_peak_fraction_beside": converted_share,
        "unet_step_peak_fractions_beside": shares["ours"],
        "torch_unet_step_peak_fraction_beside": torch_share,
        "torch_unet_step_peak_fractions_beside": shares["torch"],
    }


def time_engine(engine: Any, steps: int | None, say: Say, save_to: str | None, warm_up: bool = False) -> dict[str, Any]:
    """Text encoding, steps and decode of one 512x512 image with muselab's sampler defaults. A
    2-step image of the same recipe goes first, untimed, on a GPU or with `warm_up` (its seconds:
    `warm_up_s`): the first image pays for kernel selection, library start-up, compiling."""
    device = engine.placement.device
    text = time_text_encoding(engine.pipe, device)
    total_steps = GENERIC_IMAGE_DEFAULTS.steps
    request = ImageRequest(
        prompt=IMAGE_PROMPT,
        width=IMAGE_SIZE,
        height=IMAGE_SIZE,
        steps=steps or total_steps,
        guidance=GENERIC_IMAGE_DEFAULTS.guidance,
        scheduler=GENERIC_IMAGE_DEFAULTS.scheduler,
        seed=SEED,
    )
    say(f"image {engine.placement.dtype_name}: {request.scheduler}, {total_steps} steps")
    warm_up_s = None
    if warm_up or device == "cuda":
        started = time.perf_counter()
        engine.generate(request.model_copy(update={"steps": 2}))
        warm_up_s = time.perf_counter() - started
    speed_before = speed_index(device)
    clock = StepTimes()
    result = engine.generate(request, on_progress=clock.on_progress)
    end = time.perf_counter()
    speed_after = speed_index(device)
    picture = _image_array(result)
    if save_to:
        np.save(save_to, picture)
    step, decode = clock.step_seconds(), end - clock.marks[-1]
    say(f"image {engine.placement.dtype_name}: {step:.2f} s/step, decode {decode:.1f} s")
    return {
        "dtype": engine.placement.dtype_name,
        "text_encode_s": text,
        "unet_step_s": step,
        "decode_s": decode,
        "steps": total_steps,
        "image_s": text + total_steps * step + decode if steps else end - clock.start,
        "speed_gflops": [speed_before, speed_after],
        # A flat picture (a NaN turned black, say) shows here at once, whatever its PSNR.
        "picture_mean_std": [float(picture.mean()), float(picture.std())],
        **({"warm_up_s": warm_up_s} if warm_up_s is not None else {}),
    }


def _fast_request() -> ImageRequest:
    return ImageRequest(
        prompt=IMAGE_PROMPT,
        width=IMAGE_SIZE,
        height=IMAGE_SIZE,
        steps=1,
        guidance=0.0,
        scheduler="Euler a",
        seed=SEED,
        decoder="fast",
        decoder_model="taesd-random",
    )


def _time_fast(engine: Any, rounds: int = 3) -> tuple[list[float], np.ndarray]:
    """Seconds of `rounds` fast-path images, after one that carries the set-up costs, and the last
    picture (every run draws the same one: same seed)."""
    request = _fast_request()
    engine.generate(request)
    times = []
    for _ in range(rounds):
        synchronize(engine.placement.device)
        started = time.perf_counter()
        result = engine.generate(request)
        synchronize(engine.placement.device)
        times.append(time.perf_counter() - started)
    return times, _image_array(result)


def _fast_engine(placement: Placement) -> Any:
    """The sd-turbo architecture with random weights in an engine whose fast decoder is TAESD's."""
    from muselab.engines.image.engine import ImageEngine
    from muselab.testing import full

    engine = ImageEngine(full.build_sd_turbo_random(placement.dtype, verbose=False), "sd-turbo-random", placement)
    engine._fast_vaes["taesd-random"] = full.build_taesd_random(placement.dtype).to(placement.device)
    return engine


def bench_fast(say: Say) -> dict[str, Any]:
    """sd-turbo's architecture, 1 step, no guidance, decoded by the tiny autoencoder."""
    placement = choose_placement()
    memory = PeakMemory(placement.device)
    engine = _fast_engine(placement)
    times, _ = _time_fast(engine)
    fast = min(times)
    say(f"image fast path (sd-turbo, 1 step, TAESD): {fast:.2f} s per image ({placement.dtype_name})")
    figures = {"fast_s": fast, "fast_runs_s": times, "fast_peak_rss_gb": memory.gib()}
    del engine
    return figures


def bench_fast_int8_full(scratch: str, say: Say) -> dict[str, Any]:
    """The fast path at its fastest: sd-turbo with int8 activations on OpenVINO (converted and
    calibrated once, timed apart), against the same path on PyTorch float in the same process."""
    from muselab.engines.image.engine import ImageEngine

    placement = choose_placement()
    engine = _fast_engine(placement)
    taesd = engine._fast_vaes["taesd-random"]
    torch_times, reference = _time_fast(engine)
    folder = Path(scratch) / "sd-turbo"
    say("image fast path: saving sd-turbo for int8-full (not timed)")
    engine.pipe.save_pretrained(folder, safe_serialization=True)
    del engine
    gc.collect()
    engine = ImageEngine.load(
        str(folder),
        placement,
        safety_checker=False,
        offline=True,
        quantize="int8-full",
        backend="openvino",
        openvino_cache=Path(scratch) / "openvino-cache",
        on_progress=lambda event: say(f"image fast path: {event.note}"),
    )
    engine._fast_vaes["taesd-random"] = taesd
    times, picture = _time_fast(engine)
    fast = min(times)
    figures = {
        "fast_int8_full_s": fast,
        "fast_int8_full_runs_s": times,
        "fast_int8_full_convert_s": engine.load_timings["convert_s"],
        "fast_int8_full_dtype": engine.placement.dtype_name,
        "fast_torch_s": min(torch_times),
        "fast_int8_full_speedup": min(torch_times) / fast,
        "fast_int8_full_psnr_db": psnr(reference, picture),
    }
    say(
        f"image fast path int8-full: {fast:.2f} s per image ({figures['fast_int8_full_speedup']:.2f}x PyTorch "
        f"float's {figures['fast_torch_s']:.2f} s timed before it in the same process), PSNR "
        f"{figures['fast_int8_full_psnr_db']:.1f} dB"
    )
    return figures


def _image_array(result: Any) -> np.ndarray:
    return np.asarray(result.outputs[0].image, dtype=np.float64)


@functools.cache
def unet_step_flop() -> int:
    """FLOPs of one SD 1.x UNet call at batch 2 (classifier-free guidance) on 64x64 latents
    (512x512 pixels): 1.607 TFLOP, 16% of it attention's two matmuls.

    Counted on the meta device (shapes only, under a second). torch's counter on CPU tensors
    leaves attention out, as it has no formula for the CPU flash-attention kernel: that is how
    the issue's and shared/reference/baseline.md's 1.354 TFLOP came about."""
    from diffusers import UNet2DConditionModel

    from muselab.testing.full import SD1_UNET

    with torch.device("meta"):
        unet = UNet2DConditionModel(**SD1_UNET)
    return unet_call_flop(unet, batch=2, latent_side=64, text_tokens=77)


def unet_call_flop(unet: Any, batch: int, latent_side: int, text_tokens: int) -> int:
    """FLOPs of one call of `unet` (on any device, meta included) counted by torch.utils.flop_counter,
    the CPU flash-attention kernel given the formula torch has for the CUDA ones."""
    from torch.utils import flop_counter

    cpu_attention = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
    if cpu_attention not in flop_counter.flop_registry:

        @flop_counter.register_flop_formula(cpu_attention)
        def _cpu_attention_flop(query: Any, key: Any, value: Any, *args: Any, **kwargs: Any) -> int:
            return flop_counter.sdpa_flop_count(query, key, value)

    config, device = unet.config, unet.device
    sample = torch.zeros(batch, config.in_channels, latent_side, latent_side, device=device)
    text = torch.zeros(batch, text_tokens, config.cross_attention_dim, device=device)
    with torch.no_grad(), flop_counter.FlopCounterMode(display=False) as counter:
        unet(sample, torch.tensor(500.0, device=device), text, return_dict=False)
    return counter.get_total_flops()


def psnr(reference: np.ndarray, other: np.ndarray) -> float:
    """Peak signal-to-noise ratio of 8-bit images, in dB (inf when identical)."""
    mse = float(np.mean((reference - other) ** 2))
    return math.inf if mse == 0 else 10 * math.log10(255.0**2 / mse)


# ---- music --------------------------------------------------------------------------------------


def bench_music(seconds: float, say: Say) -> dict[str, Any]:
    """Baseline `generate` vs muselab's engine (default, the default on PyTorch, int8) on
    musicgen-small's architecture."""
    with tempfile.TemporaryDirectory(prefix="muselab-bench-music-") as scratch:
        return _bench_music(seconds, say, Path(scratch))


def _bench_music(seconds: float, say: Say, scratch: Path) -> dict[str, Any]:
    from muselab.engines.music.engine import MusicEngine
    from muselab.testing import full

    placement = choose_placement()
    device = placement.device
    memory = PeakMemory(device)
    network, processor = full.build_musicgen_small_random(torch.float32, verbose=False)
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
    return figures


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
    from muselab.config import Settings

    return Settings(quantize="auto").music_quantize(placement.device)


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


def snr(reference: np.ndarray, other: np.ndarray) -> float:
    """Signal-to-noise ratio of `other` against `reference`, in dB."""
    reference, other = np.asarray(reference, np.float64), np.asarray(other, np.float64)
    noise = float(np.sum((reference - other) ** 2))
    return math.inf if noise == 0 else 10 * math.log10(float(np.sum(reference**2)) / noise)


# ---- the table ----------------------------------------------------------------------------------

DOCS_START, DOCS_END = "<!-- bench:start -->", "<!-- bench:end -->"


def markdown_table(report: dict[str, Any]) -> str:
    """The report as the Markdown table docs/PERFORMANCE.md shows."""
    machine, peak = report["machine"], report["peak"]
    lines = [
        f"Machine: {machine['cpu']}, {machine['cores']} cores, {machine['cpu_capability']}"
        + (f", GPU {machine['gpu']}" if machine.get("gpu") else "")
        + f"; torch {machine['torch']}. Run {report['date']}"
        + (f", quick mode ({_quick_means(report)})" if report.get("quick") else "")
        + f"; {report.get('total_seconds', 0):.0f} s in all.",
        "",
        f"Default placement: {report['placement']['dtype']} ({report['placement']['reason']}).",
        "",
        f"Peaks: matmul fp32 {peak['matmul_gflops_fp32']:.0f} GFLOP/s, bf16 {peak['matmul_gflops_bf16']:.0f} GFLOP/s"
        + (f", fp16 {peak['matmul_gflops_fp16']:.0f} GFLOP/s" if "matmul_gflops_fp16" in peak else "")
        + f"; memory copy {peak['copy_gbps']:.1f} GB/s (read + write).",
    ]
    header = [
        "",
        "| what | baseline (plain script) | muselab default | default on PyTorch | int8 weights "
        "| ratio default/baseline |",
        "|---|---|---|---|---|---|",
    ]
    main: list[str] = []  # the rows under `header`; a run of the int8-full parts alone has none
    image = report.get("image", {})
    if "default_s" in image:
        flop = unet_step_flop()
        baseline_fraction = flop / image["baseline_unet_step_s"] / 1e9 / peak["matmul_gflops_fp32"]
        converted = "default_convert_s" in image
        main += [
            _row(
                "image 512x512: seconds per image",
                f"{_seconds(image['baseline_s'])} (fp32, PNDM 50)",
                f"{_seconds(image['default_s'])} ({image['default_dtype']}, DPM++ 2M Karras {image['default_steps']})",
                f"{_seconds(image['torch_s'])} ({image['torch_dtype']}; **{image['torch_ratio']:.2f}x**)",
                f"{_seconds(image['int8_s'])} ({image['int8_dtype']})",
                f"**{image['default_ratio']:.2f}x**",
            ),
            _image_row(image, "text encoding (CFG pair)", "text_encode_s"),
            _image_row(
                image,
                "UNet step, batch 2",
                "unet_step_s",
                f"{image['baseline_unet_step_s'] / image['default_unet_step_s']:.2f}x",
            ),
            _row(
                f"UNet step as a share of the matmul peak ({flop / 1e12:.3f} TFLOP, attention included)",
                f"{100 * baseline_fraction:.0f}% of fp32",
                f"**{100 * image['unet_step_peak_fraction']:.0f}%** of {image['unet_step_dtype']}",
                f"{100 * flop / image['torch_unet_step_s'] / 1e9 / peak['matmul_gflops_fp32']:.0f}%",
                "",
                "",
            ),
            _row(
                "machine speed before / after the timed steps (fp32 matmul)",
                *(_speeds(image.get(f"{name}_speed_gflops")) for name in ("baseline", "default", "torch", "int8")),
                "drift moves the ratios",
            ),
            _image_row(image, "VAE decode + post-processing", "decode_s"),
            _row(
                "peak resident memory (build or load + one image)",
                f"{image['baseline_peak_rss_gb']:.2f} GiB",
                f"{image['default_peak_rss_gb']:.2f} GiB",
                "(in the baseline's process)",
                f"**{image['int8_peak_rss_gb']:.2f} GiB** ({100 * image['int8_memory_ratio']:.0f}% of baseline)",
                "",
            ),
            _row(
                "output vs PyTorch fp32, same seed (PSNR)",
                "",
                f"{image['default_psnr_db']:.1f} dB",
                "reference",
                f"{image['int8_psnr_db']:.1f} dB",
                image["psnr_recipe"],
            ),
        ]
        if "openvino_step_speedup" in image:
            main.append(_alternated_row("UNet step", image["openvino_step_speedups"]))
        if "unet_step_peak_fraction_beside" in image:
            rounds = ", ".join(f"{100 * value:.0f}%" for value in image["unet_step_peak_fractions_beside"])
            main.append(
                _row(
                    "UNet step as a share of the matmul peak measured beside it (probes between the alternated steps)",
                    f"{100 * image['torch_unet_step_peak_fraction_beside']:.0f}% (the same PyTorch step)",
                    f"**{100 * image['unet_step_peak_fraction_beside']:.0f}%** (median)",
                    f"{100 * image['torch_unet_step_peak_fraction_beside']:.0f}%",
                    "",
                    f"rounds: {rounds}",
                )
            )
        if "default_ratio_drift_free" in image:
            main.append(
                _row(
                    "image, drift-free: the baseline's step time over the alternated speed-up",
                    "",
                    "",
                    "",
                    "",
                    f"**{image['default_ratio_drift_free']:.2f}x**",
                )
            )
        if converted:
            main.append(
                _row(
                    "one-time OpenVINO conversion (cached; peak memory)",
                    "",
                    f"{image['default_convert_s']:.0f} s ({image['default_convert_peak_rss_gb']:.1f} GiB)",
                    "",
                    (
                        f"{image['int8_convert_s']:.0f} s from the converted model "
                        f"({image['int8_convert_peak_rss_gb']:.1f} GiB)"
                    )
                    if "int8_convert_s" in image
                    else "",
                    "not in the per-image times",
                )
            )
    if "compiled_s" in image and "baseline_s" in image:
        main.append(
            _row(
                "image with the UNet under torch.compile (`--compile`)",
                "",
                f"{_seconds(image['compiled_s'])} an image, {_seconds(image['compiled_unet_step_s'])} a step",
                f"PSNR {image['compiled_psnr_db']:.1f} dB against it" if "compiled_psnr_db" in image else "",
                "",
                f"**{image['baseline_s'] / image['compiled_s']:.2f}x**; compiling: "
                f"{image['compiled_compile_s']:.0f} s once a process",
            )
        )
    if "fast_s" in image:
        ratio = f"**1/{image['fast_ratio']:.0f}** of the baseline" if "fast_ratio" in image else ""
        main.append(
            _row("fast path: sd-turbo, 1 step, TAESD decode", "", "", f"{image['fast_s']:.2f} s per image", "", ratio)
        )
    music = report.get("music")
    if music:
        main += [
            _row(
                f"music {music['audio_seconds']:g} s ({music['tokens']} tokens, CFG 3): real-time factor",
                f"{_rtf(music['baseline_rtf'])} (fp32 generate)",
                f"{_rtf(music['default_rtf'])} ({music['default_weights']})",
                f"{_rtf(music['torch_rtf'])} ({music['torch_weights']}; **{music['torch_ratio']:.2f}x**)",
                f"{_rtf(music['int8_rtf'])} ({music['int8_weights']})",
                f"**{music['default_ratio']:.2f}x**",
            ),
            _row(
                "per token",
                f"{_ms(music['baseline_ms_per_token'])} (mean, incl. text + decode)",
                f"{_ms(music['default_ms_per_token'])} (median)",
                f"{_ms(music['torch_ms_per_token'])} (median)",
                f"{_ms(music['int8_ms_per_token'])} (median)",
                "",
            ),
            _row(
                "decoder logits vs fp32, teacher-forced (SNR)",
                "reference",
                f"{music['default_logits_snr_db']:.1f} dB",
                f"{music['torch_logits_snr_db']:.1f} dB",
                f"{music['int8_logits_snr_db']:.1f} dB",
                "",
            ),
            _row(
                "audio vs fp32, same seed (SNR)",
                "reference",
                f"{music['default_snr_db']:.1f} dB",
                f"{music['torch_snr_db']:.1f} dB",
                f"{music['int8_snr_db']:.1f} dB",
                "sampling diverges once a token differs",
            ),
            _row("peak resident memory (build + one clip)", f"{music['baseline_peak_rss_gb']:.2f} GiB", "", "", "", ""),
        ]
        if "eager_rtf" in music:
            main.append(
                _row(
                    "music without the CUDA graph (eager tokens): real-time factor",
                    "",
                    f"{_rtf(music['eager_rtf'])}, {_ms(music['eager_ms_per_token'])} a token",
                    "",
                    "",
                    f"the graph: {music['eager_rtf'] / music['default_rtf']:.1f}x faster",
                )
            )
        if "openvino_token_speedup" in music:
            main.append(_alternated_row("token", music["openvino_token_speedups"]))
        if "default_convert_s" in music:
            main.append(
                _row(
                    "one-time OpenVINO conversion of the decoder (int8 weights) and compile",
                    "",
                    f"{music['default_convert_s']:.0f} s",
                    "",
                    "",
                    "cached on disk for a model loaded from a folder; not in the RTF",
                )
            )
    if main:
        lines += [*header, *main]
    if "int8_full_s" in image:
        lines += ["", *int8_full_table(image, peak)]
    if "fast_int8_full_s" in image:
        lines += [
            "",
            "| fast path: sd-turbo, 1 step, TAESD decode | PyTorch float (same process, timed first) "
            "| int8-full (OpenVINO) "
            "| speed-up | PSNR against PyTorch float | one-time conversion and calibration |",
            "|---|---|---|---|---|---|",
            _row(
                "seconds per image",
                f"{image['fast_torch_s']:.2f} s",
                f"**{image['fast_int8_full_s']:.2f} s** ({image['fast_int8_full_dtype']})",
                f"{image['fast_int8_full_speedup']:.2f}x",
                f"{image['fast_int8_full_psnr_db']:.1f} dB",
                f"{image['fast_int8_full_convert_s']:.0f} s (cached)",
            ),
        ]
    return "\n".join(lines)


def _quick_means(report: dict[str, Any]) -> str:
    if report.get("image", {}).get("extrapolated"):
        return "image steps x measured step time + text encoding + decode"
    return "every image timed whole"


def int8_full_table(image: dict[str, Any], peak: dict[str, float]) -> list[str]:
    """The int8-full rows (`--only int8-full`): int8 activations against the same baseline."""
    step = image["int8_full_unet_step_s"]
    effective = unet_step_flop() / step / 1e9
    lines = [
        "| what | baseline (plain script) | int8-full (int8 activations, OpenVINO) | default on PyTorch "
        "| ratio int8-full/baseline |",
        "|---|---|---|---|---|",
        _row(
            "image 512x512: seconds per image",
            f"{image['baseline_s']:.1f} (fp32, PNDM 50)",
            f"{image['int8_full_s']:.1f} ({image['int8_full_dtype']}, DPM++ 2M Karras {image['int8_full_steps']})",
            f"{image['torch_s']:.1f} ({image['torch_dtype']}; {image['torch_ratio']:.2f}x)",
            f"**{image['int8_full_ratio']:.2f}x**",
        ),
        _row(
            "UNet step, batch 2",
            f"{image['baseline_unet_step_s']:.2f} s",
            f"{step:.2f} s ({effective:.0f} GFLOP/s effective: "
            f"{effective / peak['matmul_gflops_fp32']:.1f}x the fp32 matmul peak)",
            f"{image['torch_unet_step_s']:.2f} s",
            f"{image['baseline_unet_step_s'] / step:.2f}x",
        ),
        _row(
            "VAE decode + post-processing (float32)",
            f"{image['baseline_decode_s']:.1f} s",
            f"{image['int8_full_decode_s']:.1f} s",
            f"{image['torch_decode_s']:.1f} s",
            "",
        ),
        _row(
            "machine speed before / after the timed steps (fp32 matmul)",
            *(_speeds(image.get(f"{name}_speed_gflops")) for name in ("baseline", "int8_full", "torch")),
            "drift moves the ratios",
        ),
        _row(
            "peak resident memory (build or load + one image)",
            f"{image['baseline_peak_rss_gb']:.2f} GiB",
            f"{image['int8_full_peak_rss_gb']:.2f} GiB",
            "(in the baseline's process)",
            "",
        ),
        _row(
            "output vs PyTorch fp32, same seed (PSNR)",
            "",
            f"{image['int8_full_psnr_db']:.1f} dB",
            "reference",
            image["psnr_recipe"],
        ),
    ]
    if "int8_full_openvino_step_speedups" in image:
        speedups = image["int8_full_openvino_step_speedups"]
        rounds = ", ".join(f"{value:.2f}" for value in speedups)
        lines.append(
            _row(
                "UNet step, int8-full vs PyTorch float alternated in one process (drift-free)",
                "",
                f"**{statistics.median(speedups):.2f}x** (median)",
                "1x",
                f"rounds: {rounds}",
            )
        )
    if "int8_full_convert_s" in image:
        shared = "default_convert_s" in image  # the float IR was already converted by the default's part
        lines.append(
            _row(
                "one-time calibration (the float conversion is the default's; cached; peak memory)"
                if shared
                else "one-time conversion and calibration (cached; peak memory)",
                "",
                f"{image['int8_full_convert_s']:.0f} s ({image['int8_full_convert_peak_rss_gb']:.1f} GiB)",
                "",
                "not in the per-image times",
            )
        )
    return lines


def _alternated_row(what: str, speedups: list[float]) -> str:
    rounds = ", ".join(f"{value:.2f}" for value in speedups)
    median = statistics.median(speedups)
    what = f"{what}, OpenVINO vs PyTorch alternated in one process (drift-free)"
    return _row(what, "", f"**{median:.2f}x** (median)", "1x", "", f"rounds: {rounds}")


def _image_row(image: dict[str, Any], what: str, key: str, ratio: str = "") -> str:
    names = ("baseline", "default", "torch", "int8")
    return _row(what, *(_seconds(image[f"{name}_{key}"]) for name in names), ratio)


def _seconds(value: float) -> str:
    """A duration with the digits that matter on a CPU (minutes) and on a GPU (milliseconds)."""
    if value >= 10:
        return f"{value:.1f} s"
    if value >= 1:
        return f"{value:.2f} s"
    return f"{1000 * value:.1f} ms" if value < 0.01 else f"{1000 * value:.0f} ms"


def _rtf(value: float) -> str:
    return f"{value:.2f}" if value >= 0.1 else f"{value:.3f}"


def _ms(value: float) -> str:
    return f"{value:.0f} ms" if value >= 10 else f"{value:.2f} ms"


def _speeds(pair: list[float] | None) -> str:
    return f"{pair[0]:.0f} / {pair[1]:.0f} GFLOP/s" if pair else ""


def _row(*cells: str) -> str:
    return "| " + " | ".join(cells) + " |"


def docs_markers(report: dict[str, Any]) -> tuple[str, str]:
    """Where a report's table goes: a run on a GPU, and a run of the int8-full part alone, have
    sections of their own, so they never overwrite the main (CPU) run's table."""
    parts = set(report.get("parts", ("image",)))
    if parts and parts <= {"int8-full", "fast-int8-full"}:
        return "<!-- bench-int8-full:start -->", "<!-- bench-int8-full:end -->"
    if report.get("machine", {}).get("gpu"):
        return "<!-- bench-gpu:start -->", "<!-- bench-gpu:end -->"
    return DOCS_START, DOCS_END


def update_docs(path: Path, report: dict[str, Any], command: str) -> None:
    """Replace the table between this report's bench markers in `path` with this run's."""
    text = path.read_text()
    start, end = docs_markers(report)
    if start not in text or end not in text:
        raise ValueError(f"{path} has no {start} ... {end} markers to write the table between")
    head, rest = text.split(start, 1)
    _, tail = rest.split(end, 1)
    block = f"{start}\n```\n{command}\n```\n\n{markdown_table(report)}\n{end}"
    path.write_text(head + block + tail)


if __name__ == "__main__":
    raise SystemExit(_child_main(sys.argv[1:]))
