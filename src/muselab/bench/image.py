"""The image parts: SD 1.x's plain-script baseline against muselab's configurations (default,
int8, int8-full, compiled), and the sd-turbo fast path (float, and int8-full beside it).

Each `image_*` and `bench_fast*` function is a part that `isolation.run_part` may run in a
process of its own: JSON-able arguments and `say` in, its figures out.
"""

from __future__ import annotations

import functools
import gc
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from muselab.bench.isolation import Say, run_part
from muselab.bench.measure import EnoughSteps, PeakMemory, ProbedSteps, StepTimes, alternated_speedups
from muselab.bench.probes import peak_matmul_gflops, speed_index
from muselab.bench.quality import SEED, psnr
from muselab.devices import Placement, choose_placement, synchronize
from muselab.engines.image.family import GENERIC_DEFAULTS as GENERIC_IMAGE_DEFAULTS
from muselab.schemas import ImageRequest

IMAGE_PROMPT = "a red fox in snow, watercolor"
#: Width and height of every benchmark image (the tests shrink it for the tiny models).
IMAGE_SIZE = 512
BASELINE_STEPS = 50
DEFAULT_SAMPLER = "DPM++ 2M Karras"


def time_text_encoding(pipe: Any, device: str, guided: bool = True) -> float:
    """The prompt's encoding, with the negative prompt's where `guided` (classifier-free guidance)."""
    times = []
    with torch.inference_mode():
        for _ in range(3):
            synchronize(device)
            started = time.perf_counter()
            pipe.encode_prompt(IMAGE_PROMPT, device=device, num_images_per_prompt=1, do_classifier_free_guidance=guided)
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
        run_part(image_baseline, {"steps": steps, "save_image": images["torch"], "save_model": folder}, isolate, say)
    )
    figures["default_backend"] = default_image_backend(placement, "none")
    for name, quantize in configurations:
        backend = "openvino" if quantize == "int8-full" else default_image_backend(placement, quantize)
        where = {"folder": folder, "cache": cache, "quantize": quantize}
        if backend == "openvino":
            part = run_part(image_convert, where, isolate, say)
            figures.update({f"{name}_{key}": value for key, value in part.items()})
        # PyTorch configurations are built in memory like the baseline, so their peak memory compares
        # like with like; reading a float32 checkpoint from disk adds a loading peak of its own
        # (see docs/PERFORMANCE.md). OpenVINO's needs the saved pipeline to convert and cache.
        run = {**where, "backend": backend, "steps": steps, "save_to": images[name]}
        if backend == "torch":
            run["folder"] = None
        elif name in ("default", "int8_full"):
            run["against_torch"] = True
        part = run_part(image_engine_run, run, isolate, say)
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
    part = run_part(image_engine_run, {**run, "save_to": str(scratch / "compiled.npy")}, isolate, say)
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
    steps: int | None,
    say: Say,
    save_image: str | None = None,
    save_model: str | None = None,
    on_pytorch: bool = True,
) -> dict[str, Any]:
    """A plain script: float32 StableDiffusionPipeline, the checkpoint's PNDM, 50 steps, VAE decode.
    Then, on the same pipeline and where `on_pytorch`, muselab's defaults on PyTorch (`torch_*`
    figures; the picture to `save_image`), and the pipeline saved to `save_model` for the parts
    that load it."""
    from muselab.bench import architectures
    from muselab.engines.image.engine import ImageEngine

    device = choose_placement().device
    memory = PeakMemory(device)
    pipe = architectures.build_sd1_random(torch.float32, verbose=False).to(device)
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
    except EnoughSteps:
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
    if on_pytorch:
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
    from muselab.bench import architectures
    from muselab.engines.image.engine import ImageEngine, load_dtype

    placement = choose_placement()
    memory = PeakMemory(placement.device)
    started = time.perf_counter()
    if folder is None:
        pipe = architectures.build_sd1_random(load_dtype(placement, quantize), verbose=False)
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
        probed = ProbedSteps(lambda: peak_matmul_gflops(placement.dtype, placement.device, repeats=1), unet_step_flop())
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
    from muselab.bench import architectures
    from muselab.engines.image.engine import ImageEngine

    engine = ImageEngine(
        architectures.build_sd_turbo_random(placement.dtype, verbose=False), "sd-turbo-random", placement
    )
    engine._fast_vaes["taesd-random"] = architectures.build_taesd_random(placement.dtype).to(placement.device)
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

    from muselab.bench.architectures import SD1_UNET

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
