"""The image engine on the tiny SD pipeline: seeds, progress, cancel, schedulers, safety checker."""

from __future__ import annotations

import numpy as np
import pytest

from muselab.engines import Cancelled, CancelToken
from muselab.schemas import SCHEDULERS, ImageRequest


def pixels(result, index=0):
    return np.asarray(result.outputs[index].image)


def test_same_seed_gives_identical_pixels(image_engine):
    request = ImageRequest(prompt="a red fox", seed=42, steps=4)
    first, second = image_engine.generate(request), image_engine.generate(request)
    assert np.array_equal(pixels(first), pixels(second))
    other = image_engine.generate(request.model_copy(update={"seed": 43}))
    assert not np.array_equal(pixels(first), pixels(other))


def test_batch_image_i_matches_a_single_run_with_seed_plus_i(image_engine):
    batch = image_engine.generate(ImageRequest(prompt="a red fox", seed=10, steps=3, num_images=2))
    assert [out.seed for out in batch.outputs] == [10, 11]
    single = image_engine.generate(ImageRequest(prompt="a red fox", seed=11, steps=3))
    assert np.array_equal(pixels(batch, 1), pixels(single))


def test_random_seed_is_chosen_and_recorded(image_engine):
    result = image_engine.generate(ImageRequest(prompt="a red fox", steps=2))
    assert result.request.seed is not None and result.outputs[0].seed == result.request.seed
    again = image_engine.generate(ImageRequest(prompt="a red fox", steps=2, seed=result.request.seed))
    assert np.array_equal(pixels(result), pixels(again))


def test_defaults_are_resolved_into_the_recipe(image_engine):
    result = image_engine.generate(ImageRequest(prompt="a red fox", seed=1))
    request = result.request
    assert (request.width, request.height) == (64, 64)  # the tiny UNet's native size
    assert (request.steps, request.guidance, request.scheduler) == (25, 7.5, "DPM++ 2M Karras")
    assert result.outputs[0].image.size == (64, 64)


def test_progress_events_count_order_and_eta(image_engine):
    events = []
    image_engine.generate(ImageRequest(prompt="fox", seed=1, steps=5, num_images=2), on_progress=events.append)
    assert [e.step for e in events] == list(range(1, 11))
    assert {e.total for e in events} == {10}
    assert [e.item for e in events] == [0] * 5 + [1] * 5
    assert all(e.eta is not None and e.eta >= 0 for e in events)
    assert events[-1].eta == 0 and events[-1].fraction == 1.0
    elapsed = [e.elapsed for e in events]
    assert elapsed == sorted(elapsed)


def test_previews_come_every_n_steps(image_engine):
    events = []
    image_engine.generate(ImageRequest(prompt="fox", seed=1, steps=6), on_progress=events.append, preview_every=2)
    with_preview = [e.step for e in events if e.preview is not None]
    assert with_preview == [2, 4, 6]
    assert events[1].preview.mode == "RGB" and max(events[1].preview.size) <= 128


def test_cancel_mid_generation_stops_within_a_step(image_engine):
    cancel = CancelToken()
    events = []

    def on_progress(event):
        events.append(event)
        if event.step == 3:
            cancel.cancel()

    with pytest.raises(Cancelled) as caught:
        image_engine.generate(ImageRequest(prompt="fox", seed=1, steps=20), on_progress, cancel)
    assert len(events) == 3  # no step ran after the one that asked to cancel
    assert caught.value.completed == []


def test_cancel_keeps_the_images_already_finished(image_engine):
    cancel = CancelToken()

    def on_progress(event):
        if event.item == 1 and event.step == 5:
            cancel.cancel()

    with pytest.raises(Cancelled) as caught:
        image_engine.generate(ImageRequest(prompt="fox", seed=1, steps=4, num_images=3), on_progress, cancel)
    assert [out.seed for out in caught.value.completed] == [1]


@pytest.mark.parametrize("scheduler", SCHEDULERS)
def test_every_scheduler_runs(image_engine, scheduler):
    result = image_engine.generate(ImageRequest(prompt="fox", seed=3, steps=4, scheduler=scheduler))
    assert result.request.scheduler == scheduler
    assert type(image_engine.pipe.scheduler).__name__ != "PNDMScheduler" or scheduler == "PNDM"
    assert pixels(result).std() > 0
    # The seed drives every draw, ancestral samplers' per-step noise included.
    again = image_engine.generate(ImageRequest(prompt="fox", seed=3, steps=4, scheduler=scheduler))
    assert np.array_equal(pixels(again), pixels(result))


def test_custom_size_and_negative_prompt(image_engine):
    result = image_engine.generate(
        ImageRequest(prompt="fox", negative_prompt="blurry", width=96, height=64, steps=2, seed=1)
    )
    assert result.outputs[0].image.size == (96, 64)
    plain = image_engine.generate(ImageRequest(prompt="fox", width=96, height=64, steps=2, seed=1))
    assert not np.array_equal(pixels(result), pixels(plain))


def test_flagged_image_is_reported_and_blanked(image_engine):
    checker = image_engine.pipe.safety_checker
    assert image_engine.has_safety_checker
    saved = checker.concept_embeds_weights.data.clone()
    try:
        checker.concept_embeds_weights.data.fill_(-2.0)  # every image now matches a concept
        result = image_engine.generate(ImageRequest(prompt="fox", seed=1, steps=2))
    finally:
        checker.concept_embeds_weights.data.copy_(saved)
    assert result.outputs[0].flagged
    assert pixels(result).max() == 0
    clean = image_engine.generate(ImageRequest(prompt="fox", seed=1, steps=2))
    assert not clean.outputs[0].flagged and pixels(clean).max() > 0


def test_engine_keywords_are_settings_and_a_plan_comes_alone(tiny_settings):
    """Keywords beside a placement make the plan (`runtime.engine_plan`); a misspelt one is an
    error, not a setting quietly ignored, and a RuntimePlan takes none beside it."""
    from muselab.engines.image.engine import ImageEngine
    from muselab.engines.runtime import image_plan

    with pytest.raises(TypeError, match="quantise"):
        ImageEngine.load(tiny_settings.model_for("image"), offline=True, quantise="int8")
    with pytest.raises(TypeError, match="offline"):
        ImageEngine.load(tiny_settings.model_for("image"), image_plan(tiny_settings), offline=True)


def test_safety_checker_can_be_turned_off(tiny_settings):
    from muselab.engines.image.engine import ImageEngine

    engine = ImageEngine.load(tiny_settings.model_for("image"), safety_checker=False, offline=True)
    assert not engine.has_safety_checker
    result = engine.generate(ImageRequest(prompt="fox", seed=1, steps=2))
    assert result.outputs[0].flagged is False


def test_fast_decoder_is_deterministic_and_recorded(image_engine, tiny_dir):
    image_engine.fast_decoder = str(tiny_dir / "tiny-models" / "tiny-taesd")
    request = ImageRequest(prompt="a red fox", seed=4, steps=3)
    full = image_engine.generate(request)
    fast = image_engine.generate(request.model_copy(update={"decoder": "fast"}))
    again = image_engine.generate(request.model_copy(update={"decoder": "fast"}))
    assert fast.outputs[0].image.size == full.outputs[0].image.size == (64, 64)
    assert np.array_equal(pixels(fast), pixels(again))
    assert not np.array_equal(pixels(fast), pixels(full))
    assert fast.request.decoder == "fast"
    # The full decoder comes back for the next request that asks for it.
    assert np.array_equal(pixels(image_engine.generate(request)), pixels(full))


def test_missing_fast_decoder_is_explained(tiny_settings):
    from muselab.engines import ModelUnavailable
    from muselab.engines.image.engine import ImageEngine

    engine = ImageEngine.load(tiny_settings.model_for("image"), offline=True)
    assert engine.fast_decoder == "madebyollin/taesd"
    with pytest.raises(ModelUnavailable, match="muselab models download madebyollin/taesd"):
        engine.generate(ImageRequest(prompt="fox", seed=1, steps=1, decoder="fast"))


def test_int8_weights_draw_nearly_the_same_image_and_say_so(tiny_settings, image_engine):
    import torch

    from muselab.engines.image.engine import ImageEngine, load_dtype
    from muselab.quantize import Int8Linear

    engine = ImageEngine.load(tiny_settings.model_for("image"), offline=True, quantize="int8")
    assert any(isinstance(m, Int8Linear) for m in engine.pipe.unet.modules())
    assert any(isinstance(m, Int8Linear) for m in engine.pipe.text_encoder.modules())
    # Compute happens in the placement's dtype, whatever the weights were read as.
    assert engine.pipe.unet.conv_in.weight.dtype == torch.int8
    assert engine.pipe.unet.conv_norm_out.weight.dtype == engine.placement.dtype
    request = ImageRequest(prompt="a red fox", seed=7, steps=3)
    int8, reference = engine.generate(request), image_engine.generate(request)
    assert int8.dtype == f"{engine.placement.dtype_name}" and int8.dtype.endswith("+int8")
    difference = np.abs(pixels(int8).astype(int) - pixels(reference).astype(int))
    assert difference.mean() < 8  # the same picture, give or take quantization noise
    # float32 machines read int8 models as bfloat16 first (half the peak memory while loading).
    assert load_dtype(image_engine.placement.__class__("cpu", torch.float32, ""), "int8") == torch.bfloat16
    assert load_dtype(image_engine.placement.__class__("cpu", torch.float32, ""), "none") == torch.float32


def test_previews_use_the_tiny_autoencoder_when_there_is_one(tiny_settings, tiny_dir):
    from muselab.engines.image.engine import ImageEngine

    engine = ImageEngine.load(
        tiny_settings.model_for("image"), offline=True, fast_decoder=str(tiny_dir / "tiny-models" / "tiny-taesd")
    )
    previews = []
    engine.generate(
        ImageRequest(prompt="fox", seed=1, steps=2), on_progress=lambda e: previews.append(e.preview), preview_every=1
    )
    # The tiny TAESD decodes the 32x32 latents to pixels (64x64: it upsamples 2x, as the tiny VAE
    # does; the real one 8x); the linear projection stays 32x32.
    assert [p.size for p in previews] == [(64, 64), (64, 64)]
    # A big image's latents are shrunk first: the preview costs the same whatever the size.
    big = []
    engine.generate(
        ImageRequest(prompt="fox", seed=1, steps=1, width=512, height=256),
        on_progress=lambda e: big.append(e.preview),
        preview_every=1,
    )
    assert big[0].size == (128, 64)
    offline = ImageEngine.load(tiny_settings.model_for("image"), offline=True)  # TAESD not in the cache
    assert offline.preview_decoder() is None
    previews.clear()
    offline.generate(
        ImageRequest(prompt="fox", seed=1, steps=1), on_progress=lambda e: previews.append(e.preview), preview_every=1
    )
    assert previews[0].size == (32, 32)


def test_previews_survive_a_fast_decoder_left_tiled_by_a_big_image(tiny_settings, tiny_dir, monkeypatch):
    """A big image asking for the fast decoder tiles it; the same TAESD then draws the next
    request's previews, whose shrunk latents are far smaller than a tile (the fuzzer found the
    500 this used to be)."""
    from muselab.engines.image import engine as image_module

    engine = image_module.ImageEngine.load(
        tiny_settings.model_for("image"), offline=True, fast_decoder=str(tiny_dir / "tiny-models" / "tiny-taesd")
    )
    monkeypatch.setattr(image_module, "TILED_DECODE_PIXELS", 96 * 96)
    engine.generate(ImageRequest(prompt="fox", seed=1, steps=1, width=128, height=128, decoder="fast"))
    assert engine.preview_decoder().use_tiling  # the big image's decode was tiled
    previews = []
    result = engine.generate(
        ImageRequest(prompt="fox", seed=1, steps=2), on_progress=lambda e: previews.append(e.preview), preview_every=1
    )
    assert [p.size for p in previews] == [(64, 64), (64, 64)]
    assert result.outputs[0].image.size == (64, 64)


def test_low_memory_slices_attention_and_tiles_the_decode(tiny_settings, image_engine):
    from muselab.engines.image.engine import ImageEngine

    engine = ImageEngine.load(tiny_settings.model_for("image"), offline=True, low_memory=True)
    processors = {type(p).__name__ for p in engine.pipe.unet.attn_processors.values()}
    assert processors == {"SlicedAttnProcessor"}
    request = ImageRequest(prompt="fox", seed=2, steps=2)
    result = engine.generate(request)
    assert engine.pipe.vae.use_tiling and engine.pipe.vae.use_slicing
    # Same picture: sliced attention is exact, tiles blend at their seams.
    difference = np.abs(pixels(result).astype(int) - pixels(image_engine.generate(request)).astype(int))
    assert difference.mean() < 3
    assert not image_engine.pipe.vae.use_tiling  # small images decode whole by default


@pytest.mark.parametrize("scheduler", ["DPM++ 2M Karras", "Euler a", "LCM"])
def test_a_float32_picture_is_the_librarys_own_for_the_seed(tiny_settings, scheduler):
    """Drawing the starting noise itself must not change a float32 picture: the pipeline's own
    draws (ancestral samplers' per-step noise) continue the seed's sequence after it, as when the
    pipeline draws everything (a recipe saved by an earlier version remakes the same picture)."""
    import torch

    from muselab.devices import choose_placement
    from muselab.engines.image.engine import ImageEngine
    from muselab.engines.image.schedulers import make_scheduler

    engine = ImageEngine.load(tiny_settings.model_for("image"), choose_placement(dtype="float32"), offline=True)
    request = ImageRequest(prompt="a red fox", seed=5, steps=4, scheduler=scheduler)
    result = engine.generate(request)
    ours, resolved = pixels(result), result.request
    engine.pipe.scheduler = make_scheduler(scheduler, engine._scheduler_config)
    library = engine.pipe(
        prompt="a red fox",
        width=resolved.width,
        height=resolved.height,
        num_inference_steps=4,
        guidance_scale=resolved.guidance,
        generator=torch.Generator("cpu").manual_seed(5),
    ).images[0]
    assert np.array_equal(ours, np.asarray(library))


@pytest.mark.parametrize("scheduler", ["DPM++ 2M Karras", "Euler a", "LCM"])
def test_a_seed_draws_the_same_noise_in_every_dtype(tiny_settings, image_engine, monkeypatch, scheduler):
    """Some PyTorch builds draw half-precision noise by a path of their own, other numbers than
    float32's for the same seed (float16 on an H200 read 11 dB PSNR from float32). The engine draws
    the starting noise, and the noise ancestral samplers add between steps, in float32; here the
    libraries' own draws are made dtype-dependent, as on such a build."""
    import diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion as sd_pipeline
    import diffusers.schedulers.scheduling_euler_ancestral_discrete as euler_a
    import diffusers.schedulers.scheduling_lcm as lcm
    import torch

    from muselab.devices import choose_placement
    from muselab.engines.image.engine import ImageEngine

    draw = sd_pipeline.randn_tensor

    def dtype_dependent_draw(shape, generator=None, device=None, dtype=None, layout=None):
        if dtype not in (None, torch.float32):
            generator = torch.Generator().manual_seed(12345)
        return draw(shape, generator=generator, device=device, dtype=dtype, layout=layout)

    for module in (sd_pipeline, euler_a, lcm):
        monkeypatch.setattr(module, "randn_tensor", dtype_dependent_draw)
    bf16 = ImageEngine.load(tiny_settings.model_for("image"), choose_placement(dtype="bfloat16"), offline=True)
    assert type(bf16.pipe).__module__ == sd_pipeline.__name__
    request = ImageRequest(prompt="a red fox", seed=7, steps=4, scheduler=scheduler)
    reference = pixels(image_engine.generate(request)).astype(int)
    assert np.abs(pixels(bf16.generate(request)).astype(int) - reference).mean() < 6
    other_seed = pixels(bf16.generate(request.model_copy(update={"seed": 12345}))).astype(int)
    assert np.abs(other_seed - reference).mean() > 12  # what a different noise looks like
