"""The OpenVINO image path on the tiny SD pipeline: same pictures as PyTorch, a one-time cached
conversion with progress, int8 weights from NNCF, clear errors, and cancellation while converting."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from muselab.config import Settings
from muselab.engines import ModelUnavailable, load_engine
from muselab.engines.image.engine import ImageEngine
from muselab.engines.image.openvino import OpenVinoUNet
from muselab.engines.openvino_runtime import OpenVinoUnavailable, openvino_available
from muselab.schemas import ImageRequest

pytestmark = pytest.mark.skipif(not openvino_available(), reason="openvino is a dependency; installed by make setup")


def pixels(result) -> np.ndarray:
    return np.asarray(result.outputs[0].image).astype(int)


@pytest.fixture(scope="module")
def ov_settings(tiny_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Settings:
    """The tiny models, with a conversion cache of this module's own (so the first load converts)."""
    data_dir = tmp_path_factory.mktemp("ov-data")
    (data_dir / "tiny-models").symlink_to(tiny_dir / "tiny-models")
    return Settings(data_dir=data_dir, cache_dir=data_dir / "cache", preset="tiny", offline=True, backend="openvino")


@pytest.fixture(scope="module")
def converted(ov_settings: Settings) -> tuple[ImageEngine, list]:
    events: list = []
    engine = load_engine("image", ov_settings, on_progress=events.append)
    return engine, events


def test_first_load_converts_with_progress_and_caches_whole_models(converted, ov_settings):
    engine, events = converted
    assert isinstance(engine.pipe.unet, OpenVinoUNet)
    assert engine.placement.dtype_name.endswith("(openvino)")
    assert {event.stage for event in events} == {"converting"}
    steps = [event.step for event in events]
    assert steps == sorted(steps) and steps[-1] == events[-1].total
    assert any("Converting the unet" in event.note for event in events)
    folders = sorted(p.name for p in ov_settings.openvino_cache.iterdir())
    # The UNet (with its deep features out), its shallow path (the balanced tier's) and the decoder.
    assert [name.split("-")[:2] for name in folders] == [["unet", "none"], ["unet", "shallow"], ["vae", "none"]]
    assert not any(".partial" in name for name in folders)
    assert all((ov_settings.openvino_cache / name / "model.bin").stat().st_size > 0 for name in folders)
    assert engine.load_timings["convert_s"] > 0


def test_second_load_reuses_the_cache_without_reading_the_torch_unet(converted, ov_settings):
    events: list = []
    again = load_engine("image", ov_settings, on_progress=events.append)
    assert again.load_timings["convert_s"] < 0.05
    assert events == []  # nothing one-time to report
    assert isinstance(again.pipe.unet, OpenVinoUNet)
    # Denormal numbers as zero: OpenVINO's threads leave them on by default, and a matmul fed
    # them ran 130x slower (devices.flush_denormals does the same for PyTorch).
    assert again.pipe.unet.compiled.get_property("CPU_DENORMALS_OPTIMIZATION") is True


def test_openvino_draws_the_same_picture_as_pytorch(converted, image_engine):
    engine, _ = converted
    request = ImageRequest(prompt="a red fox", seed=5, steps=4)
    result, reference = engine.generate(request), image_engine.generate(request)
    assert result.dtype.endswith("(openvino)")
    assert np.abs(pixels(result) - pixels(reference)).max() <= 2  # float rounding only
    # Tiled decoding (large images, --low-memory) goes through the converted decoder tile by tile.
    import torch

    vae = engine.pipe.vae
    latents = torch.randn(1, vae.config.latent_channels, 48, 40)
    whole = vae.decode(latents).sample
    sizes = vae.tile_sample_min_size, vae.tile_latent_min_size
    vae.tile_sample_min_size, vae.tile_latent_min_size = 32, 16  # tiles small enough for a tiny model
    vae.enable_tiling()
    try:
        tiled = vae.decode(latents).sample
    finally:
        vae.disable_tiling()
        vae.tile_sample_min_size, vae.tile_latent_min_size = sizes
    assert tiled.shape == whole.shape == (1, 3, 96, 80)
    assert (tiled - whole).abs().mean() < 0.1  # tiles blend at their seams


def test_the_converted_unet_refuses_conditioning_it_would_drop(converted):
    import torch

    unet = converted[0].pipe.unet
    sample, text = torch.zeros(2, 4, 32, 32), torch.zeros(2, 77, unet.config.cross_attention_dim)
    unet(sample, 1, text, timestep_cond=None, cross_attention_kwargs=None, added_cond_kwargs={})  # what SD passes
    with pytest.raises(NotImplementedError, match=r"down_block_additional_residuals.*--backend torch"):
        unet(sample, 1, text, down_block_additional_residuals=(torch.zeros(1),))


def test_int8_weights_come_from_nncf_and_shrink_the_unet(converted, ov_settings, image_engine):
    engine = load_engine("image", ov_settings.model_copy(update={"quantize": "int8"}))
    assert engine.placement.dtype_name == "float32+int8 (openvino)"
    request = ImageRequest(prompt="a red fox", seed=5, steps=3)
    difference = np.abs(pixels(engine.generate(request)) - pixels(image_engine.generate(request)))
    assert difference.mean() < 8
    sizes = {p.name: (p / "model.bin").stat().st_size for p in ov_settings.openvino_cache.iterdir() if "unet" in p.name}
    int8 = next(size for name, size in sizes.items() if "-int8-" in name)
    full = next(size for name, size in sizes.items() if "-none-" in name)
    assert int8 < 0.5 * full


def test_explicit_openvino_that_cannot_work_says_why(ov_settings):
    with pytest.raises(OpenVinoUnavailable, match="--compile"):
        load_engine("image", ov_settings.model_copy(update={"compile": True}))
    # An OpenVINO problem is a model problem to the job service and the CLI (clear message, exit 3).
    assert issubclass(OpenVinoUnavailable, ModelUnavailable)


def test_auto_means_openvino_on_a_cpu_but_pytorch_with_compile(ov_settings, monkeypatch):
    auto = ov_settings.model_copy(update={"backend": "auto", "device": "cpu"})
    assert isinstance(load_engine("image", auto).pipe.unet, OpenVinoUNet)
    # --compile is a PyTorch feature: auto quietly stays on PyTorch instead of failing.
    compiled = load_engine("image", auto.model_copy(update={"compile": True}))
    assert not isinstance(compiled.pipe.unet, OpenVinoUNet)
    assert not compiled.placement.dtype_name.endswith("(openvino)")
    # Where memory matters more than OpenVINO's few percent, auto keeps PyTorch.
    from muselab.engines import runtime

    assert runtime.auto_uses_openvino("cpu", "none") and not runtime.auto_uses_openvino("cuda", "none")
    assert not runtime.auto_uses_openvino("cpu", "none", low_memory=True)
    monkeypatch.setattr(runtime, "physical_memory_gib", lambda: 8.0)  # an 8 GB laptop
    assert not runtime.auto_uses_openvino("cpu", "none")
    monkeypatch.undo()
    # int8 is asked for to save memory, which PyTorch's int8 layers do better: auto keeps PyTorch.
    small = load_engine("image", auto.model_copy(update={"quantize": "int8"}))
    assert not isinstance(small.pipe.unet, OpenVinoUNet) and small.placement.dtype_name == "float32+int8"


def test_one_plan_decides_what_doctor_shows_and_what_loading_does(ov_settings, monkeypatch):
    """`describe_runtime` reads the same RuntimePlan loading carries out: a setting loading refuses
    is shown as unavailable, with loading's own reason."""
    import torch

    from muselab.devices import Placement
    from muselab.engines import describe_runtime, runtime

    monkeypatch.setattr(runtime, "physical_memory_gib", lambda: 64.0)
    compiled = ov_settings.model_copy(update={"compile": True})
    shown = describe_runtime(compiled)
    assert shown["image_engine"] == "unavailable" and "--compile" in shown["image_backend"]
    with pytest.raises(OpenVinoUnavailable, match="--compile"):
        runtime.image_plan(compiled).require()
    cpu = Placement("cpu", torch.float32, "a test's")
    auto = runtime.image_plan(ov_settings.model_copy(update={"backend": "auto"}), cpu, "m")
    assert (auto.backend, auto.fallback, auto.problem) == ("openvino", True, None) and auto.backend_reason
    # What only loading can find out: auto gives way to PyTorch, an explicit choice says why not.
    on_torch = auto.without_openvino("its UNet is odd")
    assert on_torch.backend == "torch" and "its UNet is odd" in on_torch.backend_reason
    with pytest.raises(OpenVinoUnavailable, match=r"'m' cannot use the OpenVINO backend: its UNet is odd\. Or use"):
        runtime.image_plan(ov_settings, cpu, "m").without_openvino("its UNet is odd")
    full = runtime.image_plan(ov_settings.model_copy(update={"backend": "auto", "quantize": "int8-full"}), cpu)
    assert full.backend == "openvino" and not full.fallback  # int8-full exists only on OpenVINO


def cancel_while_loading(tiny_dir: Path, tmp_path: Path, when: str, **settings: object) -> tuple[dict, list, Settings]:
    """Submit an image job on a fresh conversion cache and press cancel at the first loading event
    whose note starts with `when`; returns the job's final status, the events seen, the settings."""
    from muselab.jobs import JobService

    (tmp_path / "tiny-models").symlink_to(tiny_dir / "tiny-models")
    config = Settings(data_dir=tmp_path, cache_dir=tmp_path / "cache", preset="tiny", offline=True, **settings)
    service = JobService(config)
    seen: list = []
    original = service.models.loader

    def loader(kind, settings, model, on_progress=None):
        def spy(event):
            seen.append(event)
            if event.note.startswith(when):
                job.cancel.cancel()  # the user presses cancel
            on_progress(event)

        return original(kind, settings, model, on_progress=spy)

    service.models.loader = loader
    try:
        job = service.submit(ImageRequest(prompt="fox", steps=2))
        status = service.wait(job.id, 120)
    finally:
        service.shutdown()
    return status, seen, config


def test_cancel_during_conversion_leaves_no_half_model(tiny_dir, tmp_path):
    # Cancelled once the UNet is converted and the decoder starts.
    status, seen, settings = cancel_while_loading(tiny_dir, tmp_path, "Converting the vae", backend="openvino")
    assert status["status"] == "cancelled"
    assert seen and seen[0].stage == "converting"
    # The finished UNet and its shallow path stay cached (the next load skips them); the decoder
    # was never started.
    leftovers = sorted(p.name for p in settings.openvino_cache.iterdir())
    assert [name.split("-")[:2] for name in leftovers] == [["unet", "none"], ["unet", "shallow"]]
    assert all((settings.openvino_cache / name / "model.xml").exists() for name in leftovers)


def runtime_precisions(unet: OpenVinoUNet) -> set[str]:
    """The precisions the CPU plugin really runs the UNet's convolutions and matrix products in."""
    return {
        node.get_rt_info()["runtimePrecision"].astype(str)
        for node in unet.compiled.get_runtime_model().get_ops()
        if node.get_rt_info()["layerType"].astype(str) in ("Convolution", "FullyConnected", "MatMul")
    }


def test_int8_full_calibrates_once_on_the_float_unet_and_computes_in_int8(converted, ov_settings, image_engine):
    from muselab.engines.image.openvino import CALIBRATION_PROMPTS, CALIBRATION_STEPS

    events: list = []
    settings = ov_settings.model_copy(update={"quantize": "int8-full"})
    engine = load_engine("image", settings, on_progress=events.append)
    assert engine.placement.dtype_name == "float32+int8-full (openvino)"
    notes = [event.note for event in events]
    # The float UNet is in the cache already (the module's first load): read, not converted again.
    assert not any(note.startswith("Converting the unet") for note in notes)
    calibrating = [note for note in notes if note.startswith("Calibrating int8 activations")]
    assert len(calibrating) == len(CALIBRATION_PROMPTS) * CALIBRATION_STEPS + 1  # from call 0
    assert any(note.startswith("Quantizing the unet's weights and activations") for note in notes)
    steps = [event.step for event in events]
    assert steps == sorted(steps) and steps[-1] == events[-1].total
    assert "i8" in runtime_precisions(engine.pipe.unet) or "u8" in runtime_precisions(engine.pipe.unet)
    assert runtime_precisions(converted[0].pipe.unet) == {"f32"}  # the float path stays float
    request = ImageRequest(prompt="a red fox", seed=5, steps=3)
    quantized, reference = pixels(engine.generate(request)), pixels(image_engine.generate(request))
    assert quantized.shape == reference.shape and 0 < np.abs(quantized - reference).mean() < 12
    again: list = []
    load_engine("image", settings, on_progress=again.append)
    assert again == []  # calibrated once: the quantized UNet is cached


def test_int8_full_without_openvino_says_what_to_use_instead(ov_settings):
    settings = ov_settings.model_copy(update={"quantize": "int8-full"})
    with pytest.raises(OpenVinoUnavailable, match=r"--backend torch.*--quantize int8 "):
        load_engine("image", settings.model_copy(update={"backend": "torch"}))
    with pytest.raises(OpenVinoUnavailable, match=r"--compile"):  # auto cannot use OpenVINO here
        load_engine("image", settings.model_copy(update={"backend": "auto", "compile": True}))
    # A model the OpenVINO path cannot convert is named with the reason, not swapped silently for PyTorch.
    from muselab.engines.image import openvino

    original = openvino.unsupported_reason
    openvino.unsupported_reason = lambda config: "the UNet takes extra conditioning (SDXL-style)"
    try:
        with pytest.raises(OpenVinoUnavailable, match=r"cannot use it: the UNet takes extra conditioning"):
            load_engine("image", settings.model_copy(update={"backend": "auto"}))
    finally:
        openvino.unsupported_reason = original
    # An image option: music stays as auto has it.
    import torch

    from muselab.devices import Placement
    from muselab.engines.runtime import music_plan

    auto = settings.model_copy(update={"quantize": "auto"})
    for placement in (Placement("cpu", torch.float32, ""), Placement("cuda", torch.float16, "")):
        assert music_plan(settings, placement).quantize == music_plan(auto, placement).quantize


@pytest.mark.parametrize("call", [0, 3])
def test_cancel_while_calibrating_keeps_the_float_unet_and_no_half_model(tiny_dir, tmp_path, call):
    calibrating = f"Calibrating int8 activations: UNet call {call} "
    status, _, settings = cancel_while_loading(
        tiny_dir, tmp_path, calibrating, quantize="int8-full", backend="openvino"
    )
    assert status["status"] == "cancelled"
    cached = sorted(p.name for p in settings.openvino_cache.iterdir())
    # The float UNet (and the balanced tier's shallow path), ready for the next try.
    assert [name.split("-")[:2] for name in cached] == [["unet", "none"], ["unet", "shallow"]]


def test_cli_converts_int8_full_ahead_of_time_and_refuses_it_on_pytorch(cli_env, tmp_path):
    from conftest import run_cli

    env = {**cli_env, "MUSELAB_CACHE_DIR": str(tmp_path / "cache")}
    first = run_cli(["models", "convert", "--quantize", "int8-full", "--preset", "tiny", "--offline"], env)
    assert first.returncode == 0, first.stderr
    assert "converted in" in first.stdout
    names = [p.name for p in (tmp_path / "cache" / "openvino").iterdir()]
    assert any("-int8-full-" in name for name in names) and any("-none-" in name for name in names)
    refused = run_cli(
        ["image", "a fox", "--quantize", "int8-full", "--backend", "torch", "--preset", "tiny", "--offline"], env
    )
    assert refused.returncode == 3
    assert "--quantize int8 " in refused.stderr and "Traceback" not in refused.stderr


def test_calibration_stopped_at_its_first_notice_leaves_the_pipeline_as_it_was(converted):
    from muselab.engines.image.openvino import ConversionProgress, record_unet_inputs

    pipe = converted[0].pipe
    unet, scheduler = pipe.unet, pipe.scheduler

    class Stop(Exception):
        pass

    def stop(event):
        raise Stop  # what a cancel or a job timeout does from inside the progress callback

    with pytest.raises(Stop):
        record_unet_inputs(pipe, unet, ConversionProgress(3, stop))
    assert pipe.unet is unet and pipe.scheduler is scheduler and "run" not in unet.__dict__


def test_a_bfloat16_placement_makes_the_pictures_pytorch_makes(ov_settings, tmp_path):
    """Where the dtype probe picks bfloat16 (CPUs with fast bf16, or a busy moment during the probe),
    the OpenVINO default must still work: its graphs take and return float32 and compute in bf16.
    (They used to be traced with bfloat16 inputs, which numpy arrays cannot feed: a crash.)"""
    import torch

    from muselab.bench.quality import psnr
    from muselab.devices import Placement

    placement = Placement("cpu", torch.bfloat16, "as the probe picks it on some CPUs")
    model = ov_settings.model_for("image")
    request = ImageRequest(prompt="fox", steps=2, seed=1)
    on_openvino = ImageEngine.load(model, placement, offline=True, backend="openvino", openvino_cache=tmp_path)
    on_torch = ImageEngine.load(model, placement, offline=True, backend="torch")
    assert on_openvino.placement.dtype_name == "bfloat16 (openvino)"
    assert psnr(pixels(on_torch.generate(request)), pixels(on_openvino.generate(request))) > 30  # 42 dB seen


def test_cancel_stops_a_long_step_midway_and_the_next_picture_is_sound(converted):
    """One UNet step of a large picture takes minutes on a CPU: Cancel (and the time limit) stop
    the OpenVINO inference itself, not the step after it; the graph, which a cancelled inference
    leaves broken, is compiled again, so the next picture, at another size, comes out right."""
    import threading
    import time

    from muselab.engines import Cancelled, CancelToken

    engine, _ = converted
    cancel = CancelToken()
    threading.Timer(0.5, cancel.cancel).start()
    started = time.perf_counter()
    with pytest.raises(Cancelled):
        engine.generate(ImageRequest(prompt="x", steps=2, width=1712, height=976, seed=1), cancel=cancel)
    assert time.perf_counter() - started < 8  # the step alone takes far longer on 2 cores
    small = ImageRequest(prompt="a fox", steps=2, width=64, height=64, seed=5)
    again = pixels(engine.generate(small))
    assert again.std() > 0 and np.array_equal(again, pixels(engine.generate(small)))
