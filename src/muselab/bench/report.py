"""The report as the Markdown table docs/PERFORMANCE.md shows, and that table written into the
docs between the report's bench markers."""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any

from muselab.bench.image import unet_step_flop

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
    if "tiers" in image:
        lines += ["", *tier_table(image)]
    if {"default_s", "torch_s", "int8_s"} <= image.keys():  # the image part: the default beside PyTorch, int8
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
        if "clips4_over_one" in music:
            main.append(
                _row(
                    f"music: 4 clips of {music['clips_audio_seconds']:g} s in one request (batches of "
                    f"{music['clips_per_batch']}) against 1 clip",
                    "",
                    f"{_seconds(music['clips4_s'])} against {_seconds(music['clips1_s'])}",
                    "",
                    "",
                    f"**{music['clips4_over_one']:.2f}x** the time of one clip (4x unbatched)",
                )
            )
        if "continuation_rtf" in music:
            main.append(
                _row(
                    f"music: continuing a {music['continuation_prompt_seconds']:g} s clip to "
                    f"{music['audio_seconds']:g} s: real-time factor of the new audio",
                    f"{_rtf(music['continuation_rtf'] * music['continuation_vs_generate'])} (fp32 generate, "
                    "same audio prompt)",
                    f"{_rtf(music['continuation_rtf'])}",
                    "",
                    "",
                    f"**{music['continuation_vs_generate']:.2f}x** generate; "
                    f"{music['continuation_over_default_rtf']:.2f}x the default clip's RTF",
                )
            )
        if "long_form_rtf" in music:
            main.append(
                _row(
                    f"music: a {music['long_form_seconds']:g} s piece in {music['long_form_windows']} windows "
                    "(30 s context, 18 s stride): real-time factor",
                    "",
                    f"{_rtf(music['long_form_rtf'])}, {_ms(music['long_form_ms_per_token'])} a token",
                    "",
                    "",
                    f"{music['long_form_over_default_rtf']:.2f}x the {music['audio_seconds']:g} s clip's RTF "
                    "(window prompts re-read, longer KV cache)",
                )
            )
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


TIER_RUNS = {
    "quality": "the model's sampler, 25 steps, CFG",
    "balanced": "the same, deep UNet features reused between steps (DeepCache)",
    "fast": "LCM sampler, 4 steps, no CFG, TAESD decode",
    "turbo": "sd-turbo, 1 step, TAESD decode",
}


def tier_table(image: dict[str, Any]) -> list[str]:
    """The speed tiers against the baseline (the `tiers` part)."""
    lines = [
        "| speed tier (512x512) | what it runs | seconds per image | ratio to the baseline "
        "| expected before Generate | UNet calls x batch | PSNR vs quality, same seed |",
        "|---|---|---|---|---|---|---|",
        _row(
            "baseline (plain script)",
            "fp32, PNDM 50 steps, CFG, full VAE",
            _seconds(image["baseline_s"]),
            "1x",
            "",
            "50 x 2",
            "",
        ),
    ]
    for tier, values in image["tiers"].items():
        calls = f"{values['unet_calls']} x {values['unet_batch']}"
        if "whole_unet_calls" in values:
            shallow = values["unet_calls"] - values["whole_unet_calls"]
            calls = (
                f"{values['whole_unet_calls']} whole + {shallow} shallow x {values['unet_batch']} "
                f"({_seconds(values['unet_step_s'])} and {_seconds(values['shallow_step_s'])} a call)"
            )
        expected = values.get("expected_s")
        psnr_db = values.get("psnr_vs_quality_db")
        lines.append(
            _row(
                f"**{tier}**",
                TIER_RUNS.get(tier, ""),
                _seconds(values["seconds_per_image"]),
                f"**{values['ratio_to_baseline']:.1f}x**",
                f"{_seconds(expected)} ({100 * values['expected_over_measured']:.0f}% of measured)" if expected else "",
                calls,
                "reference" if tier == "quality" else (f"{psnr_db:.1f} dB" if psnr_db is not None else "another model"),
            )
        )
    conversions = [
        f"{name} {image[key]:.0f} s"
        for name, key in (("SD 1.x", "default_convert_s"), ("sd-turbo", "turbo_convert_s"))
        if image.get(key)
    ]
    if conversions:
        note = "not in the per-image times"
        lines.append(_row("one-time OpenVINO conversion (cached)", ", ".join(conversions), "", "", "", "", note))
    if image.get("psnr_side") and image.get("extrapolated"):
        side, (width, height) = image["psnr_side"], image["size"]
        lines += [
            "",
            f"PSNR compares whole {side}x{side} pictures of each tier (quick mode times steps at {width}x{height}).",
        ]
    return lines


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
