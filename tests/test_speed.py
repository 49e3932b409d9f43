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
