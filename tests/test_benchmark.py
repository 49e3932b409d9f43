"""`muselab bench` end to end, on the tiny models standing in for the full-size architectures.

The figures are meaningless at this size; what is checked is that every part runs through the real
engines, that the JSON carries the keys other tools read, and that the table and docs get written.
"""

from __future__ import annotations

import json
import math

import pytest
import torch

from muselab import bench, devices
from muselab.bench import architectures, measure, quality
from muselab.bench import image as image_parts
from muselab.bench import report as table
from muselab.engines.openvino_runtime import nncf_available
from muselab.families import tiny_models


@pytest.fixture
def tiny_architectures(monkeypatch, tiny_dir):
    """Swap the full-size builders for loaders of the tiny models (same classes, a few MB)."""
    from diffusers import AutoencoderTiny, StableDiffusionPipeline
    from transformers import AutoProcessor, MusicgenForConditionalGeneration

    models = tiny_dir / "tiny-models"

    def sd(dtype=torch.float32, verbose=True):
        return StableDiffusionPipeline.from_pretrained(
            models / tiny_models()["image"].folder, dtype=dtype, safety_checker=None, requires_safety_checker=False
        )

    def musicgen(dtype=torch.float32, verbose=True):
        folder = models / tiny_models()["music"].folder
        return MusicgenForConditionalGeneration.from_pretrained(folder, dtype=dtype), AutoProcessor.from_pretrained(
            folder
        )

    def taesd(dtype=torch.float32):
        return AutoencoderTiny.from_pretrained(models / tiny_models()["decoder"].folder, dtype=dtype)

    real_probe = devices.matmul_gflops

    def matmul_gflops(dtype, *args, now=False, **kwargs):  # the bench's (now) read 100; the dtype probe is real
        return 100.0 if now else real_probe(dtype, *args, **kwargs)

    monkeypatch.setattr(architectures, "build_sd1_random", sd)
    monkeypatch.setattr(architectures, "build_sd_turbo_random", sd)
    monkeypatch.setattr(architectures, "build_musicgen_small_random", musicgen)
    monkeypatch.setattr(architectures, "build_taesd_random", taesd)
    monkeypatch.setattr(devices, "matmul_gflops", matmul_gflops)
    monkeypatch.setattr(image_parts, "IMAGE_SIZE", 64)


def test_quick_bench_writes_every_documented_key(tiny_architectures, tmp_path):
    path = tmp_path / "bench.json"
    lines: list[str] = []
    report = bench.run(quick=True, json_path=path, music_seconds=1.0, say=lines.append, isolate=False)
    saved = json.loads(path.read_text())
    assert saved["quick"] is True and saved["image"]["extrapolated"] is True
    assert saved["parts"] == ["tiers", "music"]
    assert saved["wall_s"] > 0
    for key in ("cpu", "cores", "gpu", "torch"):
        assert key in saved["machine"]
    for key in ("matmul_gflops_fp32", "matmul_gflops_bf16", "copy_gbps"):
        assert saved["peak"][key] > 0
    image, music = report["image"], report["music"]
    for key in ("baseline_s", "default_s", "baseline_unet_step_s", "unet_step_peak_fraction", "baseline_peak_rss_gb"):
        assert isinstance(saved["image"][key], float), key
    # The quick baseline is 50 steps at the measured step time, plus text encoding and decode.
    expected = image["baseline_text_encode_s"] + 50 * image["baseline_unet_step_s"] + image["baseline_decode_s"]
    assert math.isclose(image["baseline_s"], expected)
    tiers = saved["image"]["tiers"]
    assert list(tiers) == ["quality", "balanced", "fast", "turbo"]
    for name, tier in tiers.items():
        for key in ("seconds_per_image", "ratio_to_baseline", "expected_s"):
            assert isinstance(tier[key], float) and tier[key] > 0, (name, key)
        assert math.isclose(tier["ratio_to_baseline"], image["baseline_s"] / tier["seconds_per_image"])
    quality, balanced = tiers["quality"], tiers["balanced"]
    assert math.isclose(image["default_ratio"], quality["ratio_to_baseline"])
    # Balanced adds up 9 whole UNet calls and 16 shallow ones, each timed, as the tier runs them.
    assert (balanced["unet_calls"], balanced["whole_unet_calls"], balanced["unet_batch"]) == (25, 9, 2)
    assert 0 < balanced["shallow_step_s"] < balanced["unet_step_s"]
    added = (
        balanced["text_encode_s"]
        + 9 * balanced["unet_step_s"]
        + 16 * balanced["shallow_step_s"]
        + image["default_decode_s"]
    )
    assert math.isclose(balanced["seconds_per_image"], added)
    assert (tiers["fast"]["unet_calls"], tiers["fast"]["unet_batch"], tiers["turbo"]["unet_calls"]) == (4, 1, 1)
    # PSNR against quality for the same seed: exact for quality, near for balanced, none for another model.
    assert quality["psnr_vs_quality_db"] is None and tiers["turbo"]["psnr_vs_quality_db"] is None
    assert 15 < balanced["psnr_vs_quality_db"] < 90
    # The expected time is what the product's estimate says before any run (the probe reads 100).
    assert all(tier["expected_s"] > 0 for tier in tiers.values())
    assert tiers["balanced"]["expected_s"] < tiers["quality"]["expected_s"]
    table = bench.markdown_table(report)
    assert "speed tier" in table and "| **balanced** |" in table and "9 whole + 16 shallow" in table
    if image["default_backend"] == "openvino":
        assert image["default_dtype"].endswith("(openvino)") and image["default_convert_s"] > 0
        assert image["turbo_dtype"].endswith("(openvino)") and image["turbo_convert_s"] > 0
        assert "one-time OpenVINO conversion (cached)" in table
    for key in ("baseline_rtf", "default_rtf", "int8_rtf", "int8_snr_db", "int8_logits_snr_db", "int8_dynamic_rtf"):
        assert isinstance(saved["music"][key], float), key
    # int8 really changed the numbers, but not beyond recognition.
    assert 10 < music["int8_logits_snr_db"] < 200
    assert "+int8" in music["int8_weights"]
    # Four clips of one request are timed against one, side by side; they sample as one batch
    # except on PyTorch's int8-dynamic (see MusicEngine.batches_clips).
    assert isinstance(saved["music"]["clips4_over_one"], float) and music["clips4_over_one"] > 0
    assert music["continuation_new_seconds"] == 0.5 and music["continuation_vs_generate"] > 0
    assert music["long_form_windows"] == 3 and music["long_form_rtf"] > 0  # 60 s: 30, 18 and 12 s new
    assert any("music long form (60 s in 3 windows)" in line for line in lines)
    unbatched = music["default_backend"] == "torch" and music["default_weights"].endswith("int8-dynamic")
    assert saved["music"]["clips_per_batch"] == (1 if unbatched else 4)
    assert "4 clips of" in table
    # Music's default runs side by side with the same settings on PyTorch.
    assert music["torch_backend"] == "torch" and isinstance(music["torch_rtf"], float)
    if music["default_backend"] == "openvino":
        assert music["default_weights"].endswith("(openvino)") and music["default_convert_s"] > 0
        assert "one-time OpenVINO conversion of the decoder" in table
        assert len(music["openvino_token_speedups"]) == 2 and music["openvino_token_speedup"] > 0
    assert any("image baseline" in line for line in lines) and any("music default" in line for line in lines)
    assert any("image tier balanced" in line for line in lines)


def test_the_image_part_puts_the_default_beside_pytorch_and_int8_weights(tiny_architectures, tmp_path):
    report = bench.run(quick=True, parts=("image", "fast"), say=lambda line: None, isolate=False)
    image = report["image"]
    for key in ("baseline_s", "default_s", "fast_s", "int8_peak_rss_gb", "int8_psnr_db"):
        assert isinstance(image[key], float), key
    assert math.isclose(image["default_ratio"], image["baseline_s"] / image["default_s"])
    assert image["int8_psnr_db"] > 10
    # Where OpenVINO is the default, its step is also timed against PyTorch's in one process.
    if image["default_backend"] == "openvino":
        assert len(image["openvino_step_speedups"]) == 2 and image["openvino_step_speedup"] > 0
        assert "alternated in one process" in bench.markdown_table(report)
        # Each alternated step's share of the peak is taken beside it (the probe reads 100 here).
        assert (
            len(image["unet_step_peak_fractions_beside"]) == 2
            and len(image["torch_unet_step_peak_fractions_beside"]) == 3
        )
        step_s = image_parts.unet_step_flop() / 1e9 / 100 / image["unet_step_peak_fraction_beside"]
        assert 0 < step_s < 60
        assert "measured beside it" in bench.markdown_table(report)
        # The drift-free ratio puts the baseline's step time, over the alternated speed-up, in the default's image.
        steps = image["default_steps"]
        default_s = image["default_s"] + steps * (
            image["baseline_unet_step_s"] / image["openvino_step_speedup"] - image["default_unet_step_s"]
        )
        assert math.isclose(image["default_ratio_drift_free"], image["baseline_s"] / default_s)
        assert image["default_dtype"].endswith("(openvino)") and image["default_convert_s"] > 0
    # Every timed image part says how fast the machine was around it (drift moves ratios).
    assert image["baseline_speed_gflops"] == image["default_speed_gflops"] == [100.0, 100.0]


def test_the_table_lands_between_the_markers_of_the_docs(tiny_architectures, tmp_path):
    report = bench.run(quick=True, parts=("fast", "music"), music_seconds=1.0, say=lambda line: None, isolate=False)
    docs = tmp_path / "PERFORMANCE.md"
    docs.write_text(f"# Title\n\nbefore\n{bench.DOCS_START}\nold table\n{bench.DOCS_END}\nafter\n")
    bench.update_docs(docs, report, "muselab bench --quick")
    text = docs.read_text()
    assert "old table" not in text and text.startswith("# Title\n\nbefore\n") and text.endswith("after\n")
    assert "muselab bench --quick" in text and "real-time factor" in text and "sd-turbo" in text
    docs.write_text("no markers")
    with pytest.raises(ValueError, match="markers"):
        bench.update_docs(docs, report, "x")


def test_a_gpu_run_has_a_section_of_its_own_with_its_cuda_graph_row(tiny_architectures, tmp_path):
    """A GPU's table must never overwrite the CPU run's, and it says what the CUDA graph buys."""
    report = bench.run(quick=True, parts=("music",), music_seconds=1.0, say=lambda line: None, isolate=False)
    report["machine"]["gpu"] = "NVIDIA H100 80GB HBM3"
    music = report["music"]
    music.update(eager_rtf=4 * music["default_rtf"], eager_ms_per_token=4 * music["default_ms_per_token"])
    docs = tmp_path / "PERFORMANCE.md"
    main = f"{bench.DOCS_START}\nCPU table\n{bench.DOCS_END}"
    docs.write_text(f"{main}\n<!-- bench-gpu:start -->\nstale GPU table\n<!-- bench-gpu:end -->\n")
    bench.update_docs(docs, report, "muselab bench --quick")
    text = docs.read_text()
    assert text.startswith(main) and "stale GPU table" not in text
    assert "GPU NVIDIA H100" in text and "the graph: 4.0x faster" in text


def test_a_failed_compiled_part_keeps_the_rest_of_the_report(tiny_architectures, monkeypatch):
    """torch.compile can fail on a bare machine (no compiler, an unsupported GPU); the figures
    already measured must still reach the JSON and the table."""

    def fails(**arguments):
        raise RuntimeError("inductor: no working C++ compiler")

    monkeypatch.setattr(image_parts, "image_engine_run", fails)
    lines: list[str] = []
    report = bench.run(quick=True, parts=("music", "compiled"), music_seconds=1.0, say=lines.append, isolate=False)
    assert "no working C++ compiler" in report["image"]["compiled_error"]
    assert report["music"]["default_rtf"] > 0 and "total_seconds" in report
    assert "real-time factor" in bench.markdown_table(report)
    assert any("image compiled: failed" in line for line in lines)


def test_durations_keep_their_digits_from_minutes_down_to_milliseconds():
    durations = [table._seconds(value) for value in (512.3, 3.14159, 0.0336, 0.00451)]
    assert durations == ["512.3 s", "3.14 s", "34 ms", "4.5 ms"]
    assert table._rtf(2.261) == "2.26" and table._rtf(0.0472) == "0.047"


def test_psnr_and_snr_measure_the_difference():
    import numpy as np

    image = np.full((4, 4, 3), 100.0)
    assert quality.psnr(image, image) == math.inf
    assert math.isclose(quality.psnr(image, image + 1), 20 * math.log10(255))
    signal = np.sin(np.linspace(0, 20, 1000))
    assert math.isclose(quality.snr(signal, signal * 1.1), 20.0, abs_tol=1e-9)


def test_alternated_speedups_cancel_a_steady_drift():
    """The machine slows down steadily while timing; a configuration exactly twice as fast as the
    reference must still measure 2x, which it would not if each were timed once, one after the other."""
    clock = iter(range(100))

    def reference() -> float:
        return 10.0 + next(clock)  # slower on every call

    def ours() -> float:
        return (10.0 + next(clock)) / 2

    assert measure.alternated_speedups(reference, ours, rounds=2) == [2.0, 2.0]


def test_a_step_slowed_by_the_machine_keeps_its_share_of_the_peak():
    """The machine runs at half speed while one step runs (the probes on either side say so): that
    step takes twice as long but uses the hardware as well as the others, and its share of the
    peak measured beside it must say so; against the best probe of the run it would read half."""
    speeds = iter([200.0, 200.0, 100.0, 100.0, 200.0])  # the probe before the first step, then after each

    def step(seconds: float):
        return lambda: seconds

    probed = measure.ProbedSteps(lambda: next(speeds), flop=1e12)
    fast, slowed = probed.timed("a", step(10.0)), probed.timed("b", step(20.0))
    assert [fast(), slowed(), slowed(), fast()] == [10.0, 20.0, 20.0, 10.0]
    # 100 GFLOP/s of work: 50% of 200 beside the first step; the slowed ones ran beside 150 and 100.
    assert probed.shares == {"a": [0.5, 100 / 150], "b": [50 / 150, 0.5]}


def test_the_unet_step_flop_count_includes_attention(tiny_dir):
    """The UNet's share of the peak divides the work of a step by its time: work left out of the
    count would understate the share. SD 1.x at 512x512 and batch 2 is 1.354 TFLOP of convolutions
    and linear layers plus 0.252 of attention, which torch's counter misses on CPU tensors."""
    from diffusers import UNet2DConditionModel
    from diffusers.models.attention_processor import AttnProcessor

    assert image_parts.unet_step_flop() == 1_606_546_882_560
    # The tiny UNet's CPU flash-attention kernel counts what the explicit attention (baddbmm and
    # bmm, which torch's counter knows) computes, as the meta device does.
    unet = UNet2DConditionModel.from_pretrained(
        tiny_dir / "tiny-models" / tiny_models()["image"].folder / "unet"
    ).eval()

    def flop(model):
        return image_parts.unet_call_flop(model, batch=2, latent_side=16, text_tokens=7)

    fused = flop(unet)
    with torch.device("meta"):
        on_meta = flop(UNet2DConditionModel.from_config(unet.config))
    unet.set_attn_processor(AttnProcessor())
    assert fused == on_meta == flop(unet)


@pytest.mark.skipif(not nncf_available(), reason="needs nncf")
def test_the_int8_full_part_compares_with_the_same_baseline_in_a_section_of_its_own(tiny_architectures, tmp_path):
    report = bench.run(quick=True, parts=("int8-full", "fast-int8-full"), say=lambda line: None, isolate=False)
    image = report["image"]
    assert "default_s" not in image and "music" not in report  # only what was asked for
    assert image["int8_full_dtype"] == "float32+int8-full (openvino)"
    assert math.isclose(image["int8_full_ratio"], image["baseline_s"] / image["int8_full_s"])
    assert 5 < image["int8_full_psnr_db"] < 100  # changed by int8 activations, still the same picture
    assert image["int8_full_convert_s"] > 0 and len(image["int8_full_openvino_step_speedups"]) == 2
    # The sd-turbo fast path with int8 activations, against PyTorch float in the same process.
    assert image["fast_int8_full_dtype"] == "float32+int8-full (openvino)" and image["fast_int8_full_convert_s"] > 0
    assert math.isclose(image["fast_int8_full_speedup"], image["fast_torch_s"] / image["fast_int8_full_s"])
    assert 5 < image["fast_int8_full_psnr_db"] < 100 and "fast_s" not in image
    docs = tmp_path / "PERFORMANCE.md"
    main = f"{bench.DOCS_START}\nmain table\n{bench.DOCS_END}"
    docs.write_text(f"{main}\n<!-- bench-int8-full:start -->\nold\n<!-- bench-int8-full:end -->\n")
    bench.update_docs(docs, report, "muselab bench --quick --only int8-full")
    text = docs.read_text()
    assert text.startswith(main) and "old" not in text  # the main run's table is left alone
    assert "ratio int8-full/baseline" in text and "one-time conversion and calibration" in text
    assert len(image["fast_int8_full_runs_s"]) == 3 and image["fast_int8_full_s"] == min(image["fast_int8_full_runs_s"])
    assert "int8-full (OpenVINO) | speed-up" in text
    assert "muselab default" not in text  # no empty main table above the int8-full ones
