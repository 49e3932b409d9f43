"""Speed tiers (quality, fast, turbo, auto) and the expected time shown before Generate."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from conftest import run_cli
from muselab.config import Settings
from muselab.schemas import ImageRequest
from test_api import make_client, wait_done


def pixels(result) -> np.ndarray:
    return np.asarray(result.outputs[0].image).astype(int)


def test_auto_is_fast_on_a_cpu_and_turbo_brings_its_own_model(tiny_settings):
    from muselab.engines.image.speed import choose_speed

    request = ImageRequest(prompt="a fox")
    assert choose_speed(request, tiny_settings).speed == "fast"  # the tests run on CPUs
    quality = Settings(data_dir=tiny_settings.data_dir, preset="tiny", offline=True, speed="quality")
    assert choose_speed(request, quality).speed == "quality"  # MUSELAB_SPEED
    assert choose_speed(request.model_copy(update={"speed": "quality"}), tiny_settings).speed == "quality"
    turbo = choose_speed(request.model_copy(update={"speed": "turbo"}), tiny_settings)
    assert turbo.model == tiny_settings.model_for("image")  # the tiny preset's stand-in for sd-turbo
    named = choose_speed(request.model_copy(update={"speed": "turbo", "model": "elsewhere"}), tiny_settings)
    assert named.model == "elsewhere"  # a model the user names wins


def test_fast_tier_runs_four_lcm_steps_with_the_lcm_lora_fused_and_the_user_can_override(tiny_settings):
    from muselab.engines.image.engine import ImageEngine

    model, lcm_lora = tiny_settings.model_for("image"), tiny_settings.model_for("lcm-lora")
    engine = ImageEngine.load(model, offline=True, lcm_lora=lcm_lora, fast_decoder=tiny_settings.fast_decoder())
    steps = []
    fast = engine.generate(
        ImageRequest(prompt="a fox", seed=2, speed="fast"), on_progress=lambda event: steps.append(event)
    )
    resolved = fast.request
    assert (resolved.steps, resolved.guidance, resolved.scheduler, resolved.decoder) == (4, 1.0, "LCM", "fast")
    assert len(steps) == 4
    assert [lora.name for lora in engine.loras] == ["tiny-lcm-lora"]
    quality = engine.generate(
        ImageRequest(prompt="a fox", seed=2, speed="quality", steps=4, scheduler="LCM", guidance=1.0, decoder="fast")
    )
    assert engine.loras == ()  # quality runs the model's own weights
    assert np.abs(pixels(fast) - pixels(quality)).mean() > 0.5  # the LCM-LoRA is in the fast picture
    mine = engine.generate(ImageRequest(prompt="a fox", seed=2, speed="fast", steps=6, decoder="full"))
    assert (mine.request.steps, mine.request.decoder, mine.request.scheduler) == (6, "full", "LCM")


def test_the_cli_says_what_to_expect_and_records_the_tier(cli_env, tmp_path):
    made = run_cli(
        ["image", "a fox", "--preset", "tiny", "--speed", "turbo", "--seed", "3", "-o", "t.png"], cli_env, tmp_path
    )
    assert made.returncode == 0, made.stderr
    assert "Expected: about" in made.stderr and "turbo" in made.stderr
    recipe = json.loads(Image.open(tmp_path / "t.png").text["muselab"])["request"]
    assert (recipe["speed"], recipe["steps"], recipe["guidance"], recipe["decoder"]) == ("turbo", 1, 0.0, "fast")
    again = run_cli(["image", "--from", "t.png", "--preset", "tiny", "-o", "u.png"], cli_env, tmp_path)
    assert again.returncode == 0, again.stderr
    assert (tmp_path / "t.png").read_bytes() == (tmp_path / "u.png").read_bytes()


def test_estimates_come_from_the_machine_speed_then_from_its_own_runs(tiny_dir, tmp_path):
    with make_client(tiny_dir, tmp_path) as client:
        first = client.post("/api/estimate/image", json={"width": 64, "height": 64})
        assert first.status_code == 200, first.text
        tiers = first.json()["tiers"]
        assert first.json()["chosen"] == "fast"
        assert tiers["turbo"]["seconds"] < tiers["fast"]["seconds"] < tiers["quality"]["seconds"]
        assert all("measured speed" in tier["source"] for tier in tiers.values())
        job = client.post("/api/jobs/image", json={"prompt": "a fox", "seed": 1, "speed": "fast"}).json()
        assert wait_done(client, job["id"])["status"] == "succeeded"
        after = client.post("/api/estimate/image", json={"speed": "fast"}).json()["tiers"]
        assert after["fast"]["source"] == "from 1 earlier run here"
        assert "measured speed" in after["quality"]["source"]
        assert client.post("/api/estimate/image", json={"steps": 0}).status_code == 422
        assert client.post("/api/estimate/nope", json={}).status_code == 404
        assert client.post("/api/estimate/music", json={}).status_code == 404


def test_gflop_counts_match_the_published_sizes():
    """SD 1.x's UNet costs about 0.8 TFLOP a row at 512x512 and its VAE decode about 2.5: what the
    probe-based estimate divides by the machine's speed."""
    from muselab.engines.image.estimate import model_work

    work = model_work("CompVis/stable-diffusion-v1-4")
    assert work is not None and work.side == 512
    assert 700 < work.unet < 900 and 2000 < work.decode < 3000


def test_counted_work_is_kept_for_the_next_process(tmp_path, monkeypatch):
    from muselab.engines.image import estimate

    counted = estimate.model_work("stabilityai/sd-turbo", tmp_path)
    assert list((tmp_path / "estimates").glob("work-*.json"))

    def no_counting(*configs):
        raise AssertionError("counted again")

    monkeypatch.setattr(estimate, "_counted", no_counting)
    assert estimate.model_work("stabilityai/sd-turbo", tmp_path) == counted


def test_auto_yields_to_a_sampler_the_fast_tier_cannot_run(tiny_settings):
    from muselab.engines.image.speed import check_request, choose_speed
    from muselab.schemas import RequestError

    assert choose_speed(ImageRequest(prompt="fox", scheduler="Euler a"), tiny_settings).speed == "quality"
    assert choose_speed(ImageRequest(prompt="fox", steps=80), tiny_settings).speed == "quality"
    assert choose_speed(ImageRequest(prompt="fox", steps=8), tiny_settings).speed == "fast"
    with pytest.raises(RequestError, match=r"steps: the LCM sampler \(the fast tier's\) takes 1-50 steps"):
        check_request(ImageRequest(prompt="fox", speed="fast", steps=80), tiny_settings)


def test_auto_is_quality_where_the_lcm_lora_cannot_be_had(tmp_path, monkeypatch):
    from muselab.engines.image.speed import auto_choice

    monkeypatch.setenv("HF_HOME", str(tmp_path / "empty-hf-home"))
    offline = Settings(data_dir=tmp_path, offline=True)
    speed, reason = auto_choice(offline)
    assert speed == "quality" and "muselab models download latent-consistency/lcm-lora-sdv1-5" in reason
    assert auto_choice(Settings(data_dir=tmp_path, offline=False))[0] == "fast"  # it would be downloaded


def test_the_default_tier_is_loaded_with_the_model_so_the_first_image_loads_once(tiny_settings):
    from muselab.engines import load_engine

    settings = tiny_settings.model_copy(update={"backend": "torch"})
    engine = load_engine("image", settings)
    assert [lora.name for lora in engine.loras] == ["tiny-lcm-lora"]  # auto is fast on a CPU
    pipe = engine.pipe
    result = engine.generate(engine.resolve(ImageRequest(prompt="fox", seed=1, speed="fast")))
    assert engine.pipe is pipe and result.request.steps == 4  # no second load for the first image


def test_the_shallow_path_over_a_steps_own_deep_features_is_the_whole_unet():
    """Step caching's split is exact: what the shallow steps compute is the UNet's own last layer,
    so any difference in a balanced picture comes from reusing features, not from the split."""
    import torch
    from diffusers import UNet2DConditionModel

    from muselab.engines.image.step_cache import DeepUNet, ShallowUNet

    for down, up in (
        (("DownBlock2D", "CrossAttnDownBlock2D"), ("CrossAttnUpBlock2D", "UpBlock2D")),
        (("CrossAttnDownBlock2D", "DownBlock2D"), ("UpBlock2D", "CrossAttnUpBlock2D")),
    ):
        torch.manual_seed(0)
        unet = UNet2DConditionModel(
            block_out_channels=(32, 64),
            layers_per_block=2,
            sample_size=16,
            cross_attention_dim=32,
            attention_head_dim=8,
            norm_num_groups=32,
            down_block_types=down,
            up_block_types=up,
        ).eval()
        sample, text, timestep = torch.randn(2, 4, 16, 16), torch.randn(2, 77, 32), torch.tensor(420.0)
        with torch.no_grad():
            whole = unet(sample, timestep, text).sample
            deep, features = DeepUNet(unet)(sample, timestep, text)
            shallow = ShallowUNet(unet)(sample, timestep, text, features)
            next_step = ShallowUNet(unet)(sample * 0.9, timestep, text, features)
        assert torch.equal(deep, whole) and torch.allclose(shallow, whole, atol=1e-5)
        assert not torch.allclose(next_step, whole, atol=1e-3)  # a shallow step follows the fresh latents


class CountedSplit:
    """Counts the deep and shallow calls a balanced image makes."""

    def __init__(self, monkeypatch, target):
        self.deep = self.shallow = 0
        deep, shallow = target.deep, target.shallow

        def counted_deep(this, *args):
            self.deep += 1
            return deep(this, *args)

        def counted_shallow(this, *args):
            self.shallow += 1
            return shallow(this, *args)

        monkeypatch.setattr(target, "deep", counted_deep)
        monkeypatch.setattr(target, "shallow", counted_shallow)


@pytest.mark.parametrize("backend", ["torch", "openvino"])
def test_balanced_runs_the_whole_unet_every_third_step_and_stays_near_quality(
    tiny_settings, backend, monkeypatch, tmp_path
):
    from muselab.engines.image.engine import ImageEngine
    from muselab.engines.image.openvino import OpenVinoUNet
    from muselab.engines.image.step_cache import TorchSplitUNet

    engine = ImageEngine.load(tiny_settings.model_for("image"), offline=True, backend=backend)
    counted = CountedSplit(monkeypatch, OpenVinoUNet if backend == "openvino" else TorchSplitUNet)
    quality = engine.generate(ImageRequest(prompt="a fox", seed=4, speed="quality"))
    assert (counted.deep, counted.shallow) == (0, 0)
    steps = []
    balanced = engine.generate(
        ImageRequest(prompt="a fox", seed=4, speed="balanced", num_images=2), on_progress=steps.append
    )
    resolved = balanced.request
    assert (resolved.speed, resolved.steps, resolved.scheduler) == ("balanced", 25, quality.request.scheduler)
    assert (counted.deep, counted.shallow) == (2 * 9, 2 * 16)  # steps 0, 3, ..., 24 whole; a fresh cache per image
    assert len(steps) == 2 * 25
    difference = np.abs(pixels(balanced) - pixels(quality))
    assert 0 < difference.mean() < 8  # the reused features show, a little
    again = engine.generate(ImageRequest(prompt="a fox", seed=4, speed="balanced"))
    assert np.array_equal(pixels(again), pixels(balanced))  # nothing leaks from one image's cache to the next
    assert engine.pipe.unet.__class__.__name__ in ("UNet2DConditionModel", "OpenVinoUNet")  # put back


def test_balanced_on_openvino_converts_its_shallow_path_with_progress_and_matches_pytorch(tiny_settings, tmp_path):
    from muselab.engines.image.engine import ImageEngine

    notes = []
    on_openvino = ImageEngine.load(
        tiny_settings.model_for("image"),
        offline=True,
        backend="openvino",
        openvino_cache=tmp_path,
        on_progress=lambda event: notes.append(event.note),
    )
    assert any("shallow path (for the balanced speed)" in note for note in notes)
    assert len(list(tmp_path.glob("unet-shallow-*/model.xml"))) == 1
    on_torch = ImageEngine.load(tiny_settings.model_for("image"), offline=True, backend="torch")
    request = ImageRequest(prompt="a fox", seed=6, speed="balanced")
    same = np.abs(pixels(on_openvino.generate(request)) - pixels(on_torch.generate(request)))
    assert same.max() <= 2
    cached = ImageEngine.load(
        tiny_settings.model_for("image"), offline=True, backend="openvino", openvino_cache=tmp_path
    )
    assert cached.pipe.unet.shallow_part is not None  # the second load reads it from the cache


def test_balanced_refuses_a_unet_it_cannot_split_naming_the_speed(image_engine, monkeypatch):
    from diffusers.configuration_utils import FrozenDict

    from muselab.engines.image.step_cache import unsupported_reason
    from muselab.schemas import RequestError

    assert unsupported_reason(image_engine.pipe.unet.config) is None
    lcm_style = FrozenDict({**image_engine.pipe.unet.config, "time_cond_proj_dim": 256})
    assert "guidance embedding" in unsupported_reason(lcm_style)
    monkeypatch.setattr(image_engine.pipe.unet, "_internal_dict", lcm_style)
    with pytest.raises(RequestError, match="speed: balanced reuses the UNet's deep features"):
        image_engine.generate(ImageRequest(prompt="a fox", seed=1, speed="balanced", steps=3))


def test_the_balanced_estimate_counts_its_shallow_steps():
    from muselab.engines.image.estimate import _gflop, model_work

    work = model_work("CompVis/stable-diffusion-v1-4")
    assert work is not None and 0.05 * work.unet < work.shallow < 0.12 * work.unet
    quality = _gflop(ImageRequest(prompt="-", speed="quality", steps=25, guidance=7.5, decoder="full"), work)
    balanced = _gflop(ImageRequest(prompt="-", speed="balanced", steps=25, guidance=7.5, decoder="full"), work)
    # 9 whole UNet calls and 16 shallow ones against 25 whole: about 2.2x less UNet work.
    assert 2.0 < quality / balanced < 2.6


def test_a_scene_picture_takes_the_machines_tier_so_the_image_model_is_not_reloaded(tiny_dir, tmp_path, monkeypatch):
    """A scene's picture is an image like any other: `auto` is fast on a CPU, as for the Image page,
    so the model loaded with the LCM-LoRA serves both; the tier is in the scene's recipe."""
    from muselab.engines.image.engine import ImageEngine
    from muselab.schemas import SceneRequest
    from test_jobs import scene_service

    loads = []
    load = ImageEngine.load.__func__

    def counted(cls, *args, **kwargs):
        loads.append(kwargs.get("loras"))
        return load(cls, *args, **kwargs)

    monkeypatch.setattr(ImageEngine, "load", classmethod(counted))
    service, _ = scene_service(tiny_dir, tmp_path)
    try:
        scene = SceneRequest(prompt="a quiet harbour", music_prompt="calm piano", duration=1, seed=3)
        status = service.wait(service.submit(scene).id, 180)
        assert status["status"] == "succeeded", status.get("error")
        assert (status["request"]["speed"], status["request"]["steps"]) == ("fast", 4)
        image = service.wait(service.submit(ImageRequest(prompt="a fox", seed=1)).id, 120)
        assert image["status"] == "succeeded" and image["request"]["speed"] == "fast"
        assert len(loads) == 1  # one load (with the LCM-LoRA) served the scene and the image
        quality = service.wait(service.submit(scene.model_copy(update={"speed": "quality"})).id, 180)
        assert (quality["request"]["speed"], quality["request"]["steps"]) == ("quality", 25)
        assert len(loads) == 2 and loads[-1] == ()  # the model's own weights for quality
    finally:
        service.shutdown()
