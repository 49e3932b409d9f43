"""Repainting part of a picture: inpainting, outpainting and hires fix, through every front end."""

from __future__ import annotations

import base64
import io
import json

import numpy as np
import pytest
from PIL import Image, ImageFilter

from conftest import run_cli
from muselab.schemas import ImageRequest, RequestError
from muselab.uploads import InputStore
from test_api import make_client
from test_img2img import a_picture, pixels, png_bytes


def a_mask(size: tuple[int, int] = (64, 64), box: tuple[int, int, int, int] = (16, 16, 40, 40)) -> Image.Image:
    mask = Image.new("L", size, 0)
    mask.paste(255, box)
    return mask


def untouched(mask: Image.Image, blur: int = 4) -> np.ndarray:
    """Where the blurred mask is 0: the pixels inpainting must leave as they were."""
    return np.asarray(mask.filter(ImageFilter.GaussianBlur(blur)) if blur else mask) == 0


def data_url(image: Image.Image) -> str:
    return "data:image/png;base64," + base64.b64encode(png_bytes(image)).decode()


@pytest.fixture(scope="module")
def engine(tiny_settings, tmp_path_factory):
    from muselab.engines.image.engine import ImageEngine

    data = tmp_path_factory.mktemp("inpaint-data")
    return ImageEngine.load(tiny_settings.model_for("image"), offline=True, data_dir=data)


def stored(engine, image: Image.Image) -> str:
    return InputStore(engine.plan.inputs_dir).keep(image)


def test_inpainting_changes_only_the_masked_area_with_each_masked_content(engine):
    picture, mask = a_picture(), a_mask()
    request = ImageRequest(
        prompt="a fox", seed=3, steps=8, strength=0.75, init_image=stored(engine, picture), mask=stored(engine, mask)
    )
    keep, made = untouched(mask), {}
    for fill in ("original", "fill", "latent noise", "latent nothing"):
        steps = []
        result = engine.generate(request.model_copy(update={"inpainting_fill": fill}), on_progress=steps.append)
        image = pixels(result.outputs[0].image)
        assert len(steps) == 6 and result.outputs[0].image.size == picture.size
        assert np.array_equal(image[keep], pixels(picture)[keep]), fill  # the input's own pixels
        assert np.abs(image[~keep] - pixels(picture)[~keep]).mean() > 5, fill  # repainted
        made[fill] = image
        assert result.request.inpainting_fill == fill and result.request.resize_mode is None
    assert np.abs(made["original"] - made["latent noise"]).mean() > 1  # what the area starts from shows
    again = engine.generate(request.model_copy(update={"inpainting_fill": "latent noise"}))
    assert np.array_equal(pixels(again.outputs[0].image), made["latent noise"])
    assert engine.generate(request).request.inpainting_fill == "original"  # A1111's default


def test_an_inverted_mask_repaints_the_rest_and_only_masked_repaints_a_crop_at_full_size(engine):
    picture, mask = a_picture(160, 160), a_mask((160, 160), (100, 100, 120, 130))
    common = {"prompt": "a fox", "seed": 5, "steps": 4, "init_image": stored(engine, picture)}
    inverted = engine.generate(ImageRequest(**common, mask=stored(engine, mask), inpainting_mask_invert=True))
    inside = np.asarray(mask.filter(ImageFilter.MinFilter(21))) == 255  # well within the white box
    image = pixels(inverted.outputs[0].image)
    assert np.array_equal(image[inside], pixels(picture)[inside]) and np.abs(image - pixels(picture)).mean() > 5

    request = ImageRequest(**common, mask=stored(engine, mask), inpaint_full_res=True, inpaint_full_res_padding=8)
    result = engine.generate(request)
    assert result.outputs[0].image.size == (160, 160)  # pasted back into the whole picture
    keep = untouched(mask)
    assert np.array_equal(pixels(result.outputs[0].image)[keep], pixels(picture)[keep])
    # The region around the mask (20x30 plus blur and padding) is repainted at the model's size.
    assert (result.request.width, result.request.height) == (64, 64)
    whole = engine.generate(request.model_copy(update={"inpaint_full_res": False}))
    assert not np.array_equal(pixels(whole.outputs[0].image), pixels(result.outputs[0].image))


def test_outpainting_grows_the_canvas_by_what_was_asked(engine):
    picture = a_picture(64, 48)
    request = ImageRequest(
        prompt="a fox",
        seed=2,
        steps=4,
        init_image=stored(engine, picture),
        outpaint=16,
        outpaint_sides=["left", "down"],
    )
    result = engine.generate(request)
    image = result.outputs[0].image
    assert image.size == (80, 64) and result.request.inpainting_fill == "fill"  # A1111 outpainting's start
    # The original, away from the seam the blur softens, is where it was put: right of and above the margins.
    assert np.array_equal(pixels(image)[:32, 32:], pixels(picture)[:32, 16:])
    margin = pixels(image)[:, :8]
    assert margin.std() > 0 and not np.array_equal(margin, np.zeros_like(margin))  # painted, not left black
    with pytest.raises(RequestError, match="outpaint: inpainting and outpainting need a starting picture"):
        from muselab.engines.image.inpaint import check_edit

        check_edit(ImageRequest(prompt="x", outpaint=8), None, None)


def test_an_inpainting_checkpoint_repaints_with_its_9_channel_unet(tmp_path):
    from muselab.engines.image.engine import ImageEngine
    from muselab.engines.image.tiny import build_tiny_stable_diffusion

    folder = build_tiny_stable_diffusion(tmp_path / "tiny-inpainting", inpainting=True)
    engine = ImageEngine.load(str(folder), offline=True, data_dir=tmp_path)
    assert engine.pipe.unet.config.in_channels == 9
    picture, mask = a_picture(), a_mask()
    request = ImageRequest(
        prompt="a fox", seed=3, steps=4, strength=1.0, init_image=stored(engine, picture), mask=stored(engine, mask)
    )
    image = pixels(engine.generate(request).outputs[0].image)
    keep = untouched(mask)
    assert np.array_equal(image[keep], pixels(picture)[keep]) and np.abs(image - pixels(picture)).mean() > 1
    with pytest.raises(RequestError, match="mask: 'tiny-inpainting' is an inpainting model"):
        engine.generate(ImageRequest(prompt="a fox", seed=1, steps=2))


@pytest.mark.parametrize("upscaler", ["Lanczos", "Latent"])
def test_hires_fix_makes_the_larger_picture_in_two_passes(engine, upscaler):
    request = ImageRequest(
        prompt="a fox", seed=4, steps=4, enable_hr=True, hr_scale=1.5, hr_upscaler=upscaler, hr_second_pass_steps=6
    )
    steps = []
    result = engine.generate(request, on_progress=steps.append)
    assert result.outputs[0].image.size == (96, 96)  # 64 x 1.5
    assert len(steps) == 4 + int(6 * 0.75) and steps[-1].step == steps[-1].total
    assert (result.request.width, result.request.strength) == (64, 0.75)  # the first pass's size, recorded
    plain = engine.generate(request.model_copy(update={"enable_hr": False})).outputs[0].image
    assert plain.size == (64, 64)
    with pytest.raises(RequestError, match="strength: hires fix's second pass"):
        engine.generate(request.model_copy(update={"strength": 0.1}))


def test_inpainting_and_hires_fix_run_on_openvino_with_the_balanced_tier(tiny_settings, tmp_path):
    from muselab.engines.image.engine import ImageEngine

    engine = ImageEngine.load(
        tiny_settings.model_for("image"), offline=True, backend="openvino", openvino_cache=tmp_path, data_dir=tmp_path
    )
    picture, mask = a_picture(), a_mask()
    common = {"prompt": "a fox", "seed": 3, "steps": 6, "speed": "balanced"}
    edit = ImageRequest(
        **common, init_image=stored(engine, picture), mask=stored(engine, mask), outpaint=8, outpaint_sides=["left"]
    )
    image = engine.generate(edit).outputs[0].image
    whole_mask = Image.new("L", (72, 64), 255)  # the new margin is repainted, with the box
    whole_mask.paste(mask, (8, 0))
    grown = Image.new("RGB", (72, 64))
    grown.paste(picture, (8, 0))
    keep = untouched(whole_mask)
    assert image.size == (72, 64) and keep.sum() > 1000
    assert np.array_equal(pixels(image)[keep], pixels(grown)[keep])
    hires = engine.generate(ImageRequest(**common, enable_hr=True, hr_upscaler="Latent"))
    assert hires.outputs[0].image.size == (128, 128)


def test_the_expected_time_counts_hires_fixs_second_pass():
    from muselab.engines.image.estimate import _gflop, model_work

    work = model_work("CompVis/stable-diffusion-v1-4")
    assert work is not None
    plain = ImageRequest(prompt="-", steps=20, guidance=1.0, decoder="fast", speed="quality", width=512, height=512)
    hires = plain.model_copy(update={"enable_hr": True, "hr_scale": 2.0, "strength": 0.5})
    # The second pass: 10 steps at four times the area.
    assert _gflop(hires, work) == pytest.approx(_gflop(plain, work) * (1 + 4 * 10 / 20), rel=0.01)


def test_bad_masks_are_refused_naming_the_field_and_nothing_is_written(tiny_dir, tmp_path):
    picture = data_url(a_picture())
    cases = [
        ({"init_image": picture, "mask": data_url(a_mask((32, 32), (0, 0, 8, 8)))}, "mask: must be the size"),
        ({"mask": data_url(a_mask())}, "mask: inpainting and outpainting need a starting picture"),
        ({"init_image": picture, "mask": data_url(Image.new("L", (64, 64), 0))}, "mask: it has no white area"),
        ({"init_image": picture, "mask": base64.b64encode(b"not a picture").decode()}, "mask: "),
        ({"enable_hr": True, "init_image": picture}, "enable_hr: hires fix is for text to image"),
        ({"init_image": picture, "subseed_strength": 0.2}, "subseed_strength: a variation seed blends"),
    ]
    with make_client(tiny_dir, tmp_path) as client:
        for fields, says in cases:
            response = client.post("/api/jobs/image", json={"prompt": "a fox", **fields})
            assert response.status_code == 422 and says in response.text, (fields.keys(), response.text)
        inputs = tmp_path / "data" / "inputs"
        assert not inputs.exists() or not any(inputs.iterdir())  # not even the good picture beside a bad mask
        assert not list((tmp_path / "outputs").rglob("*.png"))


def test_the_cli_inpaints_and_from_re_runs_the_edit_to_the_same_bytes(cli_env, tmp_path):
    (tmp_path / "start.png").write_bytes(png_bytes(a_picture()))
    (tmp_path / "mask.png").write_bytes(png_bytes(a_mask()))
    args = ["image", "a fox", "--preset", "tiny", "--init", "start.png", "--mask", "mask.png", "--seed", "4"]
    made = run_cli([*args, "--masked-content", "latent noise", "--strength", "0.9", "-o", "a.png"], cli_env, tmp_path)
    assert made.returncode == 0, made.stderr
    recipe = json.loads(Image.open(tmp_path / "a.png").text["muselab"])["request"]
    assert recipe["mask"].startswith("sha256:") and recipe["inpainting_fill"] == "latent noise"
    keep = untouched(a_mask())
    assert np.array_equal(pixels(Image.open(tmp_path / "a.png"))[keep], pixels(a_picture())[keep])
    again = run_cli(["image", "--from", "a.png", "--preset", "tiny", "-o", "b.png"], cli_env, tmp_path)
    assert again.returncode == 0, again.stderr
    assert (tmp_path / "a.png").read_bytes() == (tmp_path / "b.png").read_bytes()
    grown = run_cli(
        [*args[:6], "--outpaint", "8", "--outpaint-side", "up", "--seed", "1", "-o", "c.png"],
        cli_env,
        tmp_path,
    )
    assert grown.returncode == 0, grown.stderr
    assert Image.open(tmp_path / "c.png").size == (64, 72)
    upscaled = run_cli(["upscale", "a.png", "--preset", "tiny", "-o", "big.png"], cli_env, tmp_path)
    assert upscaled.returncode == 0, upscaled.stderr
    big = Image.open(tmp_path / "big.png")
    recipe = json.loads(big.text["muselab"])["request"]
    assert big.size == (128, 128) and (recipe["prompt"], recipe["seed"], recipe["strength"]) == ("a fox", 4, 0.3)
    assert recipe["mask"] is None and recipe["init_image"].startswith("sha256:")  # the picture, not its edit


def test_upscale_fields_take_what_the_picture_shows_not_its_edits():
    from muselab.upscale import UPSCALE_PROMPT, upscale_fields

    recipe = {"prompt": "a fox", "seed": 3, "steps": 1, "speed": "turbo", "mask": "sha256:" + "0" * 64, "width": 512}
    fields = upscale_fields(recipe, (1500, 1000), "sha256:" + "1" * 64, scale=2.0, strength=0.3)
    assert (fields["width"], fields["height"]) == (2048, 1368)  # the longer side at most 2048, the shape kept
    assert fields["steps"] == 4 and "mask" not in fields  # a 1-step model still runs one step at 0.3
    assert upscale_fields(None, (64, 64), "x")["prompt"] == UPSCALE_PROMPT
    ImageRequest.model_validate(fields)


def test_a1111_txt2img_hires_fix_and_png_info(tiny_dir, tmp_path):
    with make_client(tiny_dir, tmp_path) as client:
        body = {"prompt": "a castle", "seed": 9, "steps": 3, "enable_hr": True, "hr_scale": 2}
        response = client.post("/sdapi/v1/txt2img", json={**body, "hr_upscaler": "Latent", "denoising_strength": 0.6})
        assert response.status_code == 200, response.text
        encoded = response.json()["images"][0]
        picture = Image.open(io.BytesIO(base64.b64decode(encoded)))
        assert picture.size == (128, 128)
        info = client.post("/sdapi/v1/png-info", json={"image": "data:image/png;base64," + encoded})
        assert info.status_code == 200, info.text
        parameters = info.json()["parameters"]
        assert parameters["Hires upscale"] == "2" and parameters["Hires upscaler"] == "Latent"
        assert (parameters["Prompt"], parameters["Seed"], parameters["Denoising strength"]) == ("a castle", "9", "0.6")
        assert "muselab" in info.json()["items"]  # the recipe chunk too
        bad = client.post("/sdapi/v1/png-info", json={"image": base64.b64encode(b"plain text").decode()})
        assert bad.status_code == 422 and "image:" in bad.text
        # The PNG's A1111 text reads back into the same hires fix (--from of an A1111 picture).
        from muselab.media import parse_a1111_parameters

        parsed = parse_a1111_parameters(info.json()["info"])
        assert (parsed["enable_hr"], parsed["hr_scale"], parsed["hr_upscaler"], parsed["strength"]) == (
            True,
            2.0,
            "Latent",
            0.6,
        )


def test_webuiapi_inpaints_through_the_a1111_route(tmp_path, tiny_dir):
    webuiapi = pytest.importorskip("webuiapi")
    from test_server import Server

    server = Server(tmp_path / "data", tiny_dir).start()
    try:
        api = webuiapi.WebUIApi(host="127.0.0.1", port=server.port)
        picture, mask = a_picture(), a_mask()
        result = api.img2img(
            images=[picture],
            mask_image=mask,
            inpainting_fill=0,
            inpaint_full_res=False,
            prompt="a red fox",
            seed=11,
            steps=4,
            width=64,
            height=64,
            denoising_strength=0.8,
        )
        assert result.image.size == (64, 64)
        keep = untouched(mask)
        assert np.array_equal(pixels(result.image.convert("RGB"))[keep], pixels(picture)[keep])
        assert result.info["all_seeds"] == [11]
        recipe = json.loads(result.image.info["muselab"])["request"]
        assert recipe["inpainting_fill"] == "fill" and recipe["mask"].startswith("sha256:")
        info = api.png_info(result.image)
        assert "Mask blur: 4" in info.info and "Denoising strength: 0.8" in info.info
    finally:
        server.stop()
