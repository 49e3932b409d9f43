"""The speed tiers side by side (quality, balanced, fast, turbo) against the plain script's
image, in one run: seconds per image, ratio to the baseline, the UNet calls each runs and at which
batch, peak memory, PSNR against the quality tier for the same seed, and the expected time the
product would have shown before Generate (`engines.image.estimate`, from this machine's probe:
the bench's models have no history).

Every tier runs as the product runs it here: the saved SD 1.x pipeline loaded through
`ImageEngine.load` (OpenVINO on a CPU, its one-time conversion in a row of its own), and sd-turbo
for turbo, likewise saved, loaded and converted. Quick mode times a few steps of each tier and adds
them up as the tier's whole image would (quality: 25 steps; balanced: 9 whole UNet calls and 16
shallow ones; fast: 4 steps; turbo: 1 step; plus text encoding and the decode, each timed); PSNR
then compares whole pictures made at PSNR_SIDE pixels, where a whole image costs seconds.

What random weights cannot show: the fast tier's LCM-LoRA is not fused here (its fused weights
have the same shapes, so a step costs the same; with real weights a fused model is one more
one-time conversion, which costs what the default's does), and every picture is noise, so PSNR
measures how far a tier's arithmetic moves the output, not how it looks (docs/PERFORMANCE.md
cites the published evidence for that).
"""

from __future__ import annotations

import contextlib
import time
from pathlib import Path
from typing import Any

import numpy as np

from muselab.bench import image as image_part
from muselab.bench.image import (
    IMAGE_PROMPT,
    _image_array,
    default_image_backend,
    image_baseline,
    image_convert,
    load_saved,
    time_text_encoding,
    time_vae_decode,
)
from muselab.bench.isolation import Say, run_part
from muselab.bench.measure import EnoughSteps, PeakMemory, StepTimes
from muselab.bench.quality import SEED, psnr
from muselab.devices import Placement, choose_placement
from muselab.engines.image.step_cache import full_calls
from muselab.schemas import ImageRequest

TIERS = ("quality", "balanced", "fast", "turbo")
#: Side of the whole pictures quick mode compares for PSNR (a 512x512 quality image takes minutes).
PSNR_SIDE = 128
FAST_DECODER = "taesd-random"


def tier_request(tier: str, side: int | None = None) -> ImageRequest:
    """The request each tier resolves to (`speed.TIERS`), spelled out: the fast tier's sampler and
    steps without its LCM-LoRA (see the module's docstring)."""
    side = side or image_part.IMAGE_SIZE
    request = ImageRequest(prompt=IMAGE_PROMPT, width=side, height=side, seed=SEED)
    if tier == "fast":
        return request.model_copy(
            update={"steps": 4, "guidance": 1.0, "scheduler": "LCM", "decoder": "fast", "decoder_model": FAST_DECODER}
        )
    if tier == "turbo":
        return request.model_copy(update={"speed": "turbo", "decoder_model": FAST_DECODER})
    return request.model_copy(update={"speed": tier})


def bench_tiers(placement: Placement, quick: bool, scratch: Path, say: Say, isolate: bool = True) -> dict[str, Any]:
    """The baseline, the conversion, then every tier; figures as `image.*` keys, the tiers under
    `image.tiers.<tier>`."""
    steps = 2 if quick and placement.device == "cpu" else None
    scratch.mkdir(parents=True, exist_ok=True)
    folder, cache = str(scratch / "sd1"), str(scratch / "openvino-cache")
    side = image_part.IMAGE_SIZE
    figures: dict[str, Any] = {"size": [side, side], "extrapolated": steps is not None, "timed_steps": steps}
    figures.update(run_part(image_baseline, {"steps": steps, "save_model": folder, "on_pytorch": False}, isolate, say))
    backend = default_image_backend(placement, "none")
    figures["default_backend"] = backend
    if backend == "openvino":
        part = run_part(image_convert, {"folder": folder, "cache": cache, "quantize": "none"}, isolate, say)
        figures.update({f"default_{key}": value for key, value in part.items()})
    runs = run_part(
        tier_runs, {"folder": folder, "cache": cache, "backend": backend, "quick": steps is not None}, isolate, say
    )
    where = {"folder": str(scratch / "sd-turbo"), "cache": cache, "backend": backend, "quick": steps is not None}
    turbo = run_part(turbo_run, where, isolate, say)
    tiers = {**runs.pop("tiers"), "turbo": turbo.pop("tier")}
    figures.update(runs)
    figures.update(turbo)
    pictures = {tier: np.load(scratch / f"{tier}.npy") for tier in TIERS if (scratch / f"{tier}.npy").exists()}
    expected = expected_seconds(folder)
    for tier, values in tiers.items():
        values["ratio_to_baseline"] = figures["baseline_s"] / values["seconds_per_image"]
        values["expected_s"] = expected.get(tier)
        if values["expected_s"]:
            values["expected_over_measured"] = values["expected_s"] / values["seconds_per_image"]
        # None for quality itself (the reference; infinite) and for turbo (another model's weights).
        same_model = tier not in ("quality", "turbo") and tier in pictures and "quality" in pictures
        values["psnr_vs_quality_db"] = psnr(pictures["quality"], pictures[tier]) if same_model else None
        say(
            f"image tier {tier}: {values['seconds_per_image']:.1f} s per image, "
            f"{values['ratio_to_baseline']:.1f}x the baseline; expected {values['expected_s']} s"
        )
    figures["tiers"] = tiers
    # The quality tier is muselab's default image: the keys earlier reports had for it.
    quality = tiers["quality"]
    figures.update(
        {
            "default_s": quality["seconds_per_image"],
            "default_ratio": quality["ratio_to_baseline"],
            "default_unet_step_s": quality["unet_step_s"],
            "default_steps": quality["unet_calls"],
        }
    )
    return figures


def expected_seconds(folder: str) -> dict[str, float | None]:
    """What the product's estimate says for each tier at 512x512 on this machine, before any run
    of it here (the probe and the model's counted work)."""
    from muselab.config import Settings
    from muselab.engines.image.estimate import estimate_tiers

    settings = Settings(image_model=folder, models={"turbo": "stabilityai/sd-turbo"}, offline=True)
    request = ImageRequest(prompt=IMAGE_PROMPT, width=image_part.IMAGE_SIZE, height=image_part.IMAGE_SIZE)
    return {tier: value.get("seconds") for tier, value in estimate_tiers(request, settings, [])["tiers"].items()}


def _with_fast_decoder(engine: Any) -> Any:
    from muselab.bench import architectures

    engine._fast_vaes[FAST_DECODER] = architectures.build_taesd_random(engine.placement.dtype).to(
        engine.placement.device
    )
    return engine


def _timed_steps(engine: Any, request: ImageRequest, stop_after: int | None) -> tuple[list[float], float, Any]:
    """Each step's seconds (the first includes text encoding and set-up), the whole call's, and the
    result (None when stopped after `stop_after` steps)."""
    clock = StepTimes(stop_after=stop_after)
    result = None
    with contextlib.suppress(EnoughSteps):  # stopped where asked: the steps are timed
        result = engine.generate(request, on_progress=clock.on_progress)
    end = time.perf_counter()
    intervals = [b - a for a, b in zip([clock.start, *clock.marks[:-1]], clock.marks, strict=True)]
    return intervals, end - clock.start, result


def tier_runs(folder: str, cache: str, backend: str, quick: bool, say: Say) -> dict[str, Any]:
    """quality, balanced and fast on the saved SD 1.x pipeline, loaded as the product loads it."""
    placement = choose_placement()
    memory = PeakMemory(placement.device)
    engine = _with_fast_decoder(load_saved(folder, cache, backend, "none"))
    device = engine.placement.device
    guided, single = time_text_encoding(engine.pipe, device), time_text_encoding(engine.pipe, device, guided=False)
    decode = time_vae_decode(engine.pipe, engine.placement.dtype, device)
    tiers: dict[str, dict[str, Any]] = {}
    scratch = Path(folder).parent
    for tier in ("quality", "balanced", "fast"):
        request = tier_request(tier)
        resolved = engine.resolve(request)
        steps = resolved.steps
        assert steps is not None
        rows = 2 if (resolved.guidance or 0) > 1 else 1
        say(f"image tier {tier}: {resolved.scheduler}, {steps} steps at batch {rows}")
        values: dict[str, Any] = {"unet_calls": steps, "unet_batch": rows, "decoder": resolved.decoder}
        if tier == "fast" or not quick:  # whole: a few seconds' steps on a CPU, or any GPU
            if tier == "fast":  # its first batch-1 call carries set-up, as turbo's first image does
                engine.generate(request.model_copy(update={"steps": 1}))
            intervals, whole, result = _timed_steps(engine, request, None)
            values["seconds_per_image"] = whole
            values["unet_step_s"] = float(np.median(intervals[1:] or intervals))
            if not quick:
                np.save(scratch / f"{tier}.npy", _image_array(result))
        elif tier == "quality":
            intervals, _, _ = _timed_steps(engine, request, 2)
            values["unet_step_s"] = intervals[-1]
            values["seconds_per_image"] = guided + steps * intervals[-1] + decode
        else:  # balanced: a whole call, then shallow ones (its first three steps)
            intervals, _, _ = _timed_steps(engine, request, 3)
            whole_step, shallow_step = tiers["quality"]["unet_step_s"], float(np.median(intervals[1:]))
            deep = values["whole_unet_calls"] = full_calls(steps)
            values.update({"unet_step_s": whole_step, "shallow_step_s": shallow_step})
            values["seconds_per_image"] = guided + deep * whole_step + (steps - deep) * shallow_step + decode
        if tier == "balanced" and not quick:  # made whole above: its calls, as the quick branch records them
            values["whole_unet_calls"] = full_calls(steps)
        values["text_encode_s"] = guided if rows == 2 else single
        say(f"image tier {tier}: {values['seconds_per_image']:.1f} s per image")
        tiers[tier] = values
    if quick:
        say(f"image tiers: whole {PSNR_SIDE}x{PSNR_SIDE} pictures of each for PSNR")
        for tier in ("quality", "balanced", "fast"):
            np.save(scratch / f"{tier}.npy", _image_array(engine.generate(tier_request(tier, PSNR_SIDE))))
    return {
        "tiers": tiers,
        "psnr_side": PSNR_SIDE if quick else image_part.IMAGE_SIZE,
        "default_dtype": engine.placement.dtype_name,
        "default_text_encode_s": guided,
        "default_decode_s": decode,
        "tiers_peak_rss_gb": memory.gib(),
    }


def turbo_run(folder: str, cache: str, backend: str, quick: bool, say: Say) -> dict[str, Any]:
    """sd-turbo's architecture saved and loaded as the product loads it (converted once on
    OpenVINO, timed apart), then 1-step images with the tiny autoencoder."""
    from muselab.bench import architectures

    placement = choose_placement()
    say("image tier turbo: saving sd-turbo's architecture for loading (not timed)")
    architectures.build_sd_turbo_random(placement.dtype, verbose=False).save_pretrained(folder, safe_serialization=True)
    memory = PeakMemory(placement.device)
    started = time.perf_counter()
    engine = load_saved(folder, cache, backend, "none", on_progress=lambda event: say(f"image turbo: {event.note}"))
    load_s = time.perf_counter() - started
    engine = _with_fast_decoder(engine)
    request = tier_request("turbo").model_copy(update={"model": folder})
    engine.generate(request)  # the first carries set-up
    times = []
    for _ in range(1 if quick else 3):
        _, whole, _ = _timed_steps(engine, request, None)
        times.append(whole)
    tier = {
        "seconds_per_image": min(times),
        "runs_s": times,
        "unet_calls": 1,
        "unet_batch": 1,
        "decoder": "fast",
        "peak_rss_gb": memory.gib(),
    }
    say(f"image tier turbo: {tier['seconds_per_image']:.2f} s per image ({engine.placement.dtype_name})")
    return {
        "tier": tier,
        "turbo_dtype": engine.placement.dtype_name,
        "turbo_load_s": load_s,
        **{f"turbo_{key}": value for key, value in engine.load_timings.items()},
    }
