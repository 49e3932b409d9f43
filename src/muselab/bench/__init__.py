"""`muselab bench`: muselab's defaults against a plain script, side by side, in one run.

Full-size architectures with random weights (`bench.architectures`): every matmul and convolution
costs what it costs with the real checkpoints, nothing is downloaded, and the output is noise.

- **tiers** (`tiers`): the speed tiers (quality, balanced, fast, turbo) as the product runs them,
  each against the baseline, with the expected time the product would have shown; the default set.
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

The modules: `probes` (the machine and its ceilings), `measure` (time, memory, drift-free
speed-ups), `quality` (PSNR, SNR), `image` and `music` (the parts), `isolation` (each part in a
process of its own), `report` (the table and the docs), `architectures` (the random-weight models).
"""

from __future__ import annotations

import datetime as dt
import os
import tempfile
import time
from pathlib import Path
from typing import Any

from muselab.bench.image import (
    IMAGE_CONFIGURATIONS,
    INT8_FULL_CONFIGURATION,
    bench_compiled,
    bench_fast,
    bench_fast_int8_full,
    bench_image,
    unet_step_flop,
)
from muselab.bench.isolation import Say, run_part, save, say_with_time
from muselab.bench.music import bench_music
from muselab.bench.probes import machine_info, measure_peaks, peak_for
from muselab.bench.report import DOCS_END, DOCS_START, markdown_table, update_docs
from muselab.bench.tiers import bench_tiers
from muselab.devices import choose_placement

__all__ = ["DOCS_END", "DOCS_START", "markdown_table", "run", "update_docs"]


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
    say = say or say_with_time
    placement = choose_placement()
    if parts is None:  # on a GPU, `--compile` is one more option to measure
        parts = ("tiers", "music", *(("compiled",) if placement.device == "cuda" else ()))
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
        if "tiers" in parts:
            report["image"] = bench_tiers(placement, quick, Path(scratch) / "tiers", say, isolate)
            save(report, json_path)
        configurations = [
            *(IMAGE_CONFIGURATIONS if "image" in parts else ()),
            *(INT8_FULL_CONFIGURATION if "int8-full" in parts else ()),
        ]
        if configurations:
            part = bench_image(placement, steps, Path(scratch), say, isolate, tuple(configurations))
            report.setdefault("image", {}).update(part)
            save(report, json_path)
        if "fast-int8-full" in parts:
            part = run_part(bench_fast_int8_full, {"scratch": scratch}, isolate, say)
            report.setdefault("image", {}).update(part)
            save(report, json_path)
        if "fast" in parts:
            report.setdefault("image", {}).update(run_part(bench_fast, {}, isolate, say))
            image = report["image"]
            if "baseline_s" in image:
                image["fast_ratio"] = image["baseline_s"] / image["fast_s"]
            save(report, json_path)
        if "music" in parts:
            seconds = music_seconds or (5.0 if quick else 10.0)
            report["music"] = run_part(bench_music, {"seconds": seconds}, isolate, say)
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
    report["total_seconds"] = report["wall_s"] = time.perf_counter() - started
    report["load_average_at_end"] = os.getloadavg()
    save(report, json_path)
    return report
