"""Starting from a picture (img2img): untrusted uploads, strength, resize modes, recipes that re-run."""

from __future__ import annotations

import base64
import io
import json
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from conftest import run_cli
from muselab.schemas import ImageRequest, RequestError
from muselab.uploads import InputStore, decode_base64, decode_image
from test_api import make_client, wait_done


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def a_picture(width: int = 64, height: int = 64) -> Image.Image:
    """A picture with structure (a gradient and a square), so a change to it shows."""
    x, y = np.meshgrid(np.linspace(0, 255, width), np.linspace(0, 255, height))
    pixels = np.stack([x, y, 255 - x], axis=-1).astype(np.uint8)
    pixels[height // 4 : height // 2, width // 4 : width // 2] = (250, 40, 40)
    return Image.fromarray(pixels)


def huge_png_header(width: int, height: int) -> bytes:
    """A few hundred bytes that claim a width x height picture (a decompression bomb's shape)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")
    )


def pixels(image) -> np.ndarray:
    return np.asarray(image).astype(int)


@pytest.mark.parametrize(
    ("data", "says"),
    [
        (b"hello, I am text with a .png name", "this is not one"),
        (huge_png_header(30000, 30000), "this one is too large"),
        (huge_png_header(5000, 5000), r"this one is too large \(5000x5000\)"),  # past ours, within Pillow's
        (None, "cannot be read whole"),  # a truncated JPEG
        (b"GIF89a" + b"\0" * 64, "this is not one"),  # a format outside PNG, JPEG, WebP
    ],
)
def test_bad_uploads_are_refused_naming_the_field(data, says):
    if data is None:
        buffer = io.BytesIO()
        a_picture(256, 256).save(buffer, format="JPEG", quality=95)
        data = buffer.getvalue()[: len(buffer.getvalue()) // 2]
    with pytest.raises(RequestError, match=rf"^init_image: .*{says}"):
        decode_image(data, "init_image")


def test_uploads_decode_with_or_without_a_data_url_and_honour_exif_orientation():
    picture = a_picture(64, 32)
    encoded = base64.b64encode(png_bytes(picture)).decode()
    assert decode_base64(f"data:image/png;base64,{encoded}", "init_image") == png_bytes(picture)
    assert decode_base64(encoded, "init_image") == png_bytes(picture)
    with pytest.raises(RequestError, match="init_image: expected a PNG, JPEG or WebP picture in base64"):
        decode_base64("not base64!", "init_image")
    exif = Image.Exif()
    exif[0x0112] = 6  # the camera was turned: show it rotated 90 degrees
    buffer = io.BytesIO()
    picture.save(buffer, format="JPEG", exif=exif.tobytes())
    assert decode_image(buffer.getvalue(), "init_image").size == (32, 64)


def test_stored_inputs_are_named_by_hash_and_never_by_a_path(tmp_path):
    store = InputStore(tmp_path / "inputs")
    reference = store.keep(a_picture())
    assert reference.startswith("sha256:") and store.keep(a_picture()) == reference  # one file per picture
    assert len(list((tmp_path / "inputs").iterdir())) == 1
    assert np.array_equal(pixels(store.load(reference, "init_image")), pixels(a_picture()))
    (tmp_path / "secret.png").write_bytes(png_bytes(a_picture()))
    for path in ("../secret.png", str(tmp_path / "secret.png"), "sha256:../../secret"):
        with pytest.raises(RequestError, match="init_image: expected a stored input's 'sha256:<64 hex digits>'"):
            store.load(path, "init_image")


def test_strength_runs_its_share_of_the_steps_and_moves_further_from_the_input(tiny_settings, tmp_path):
    from muselab.engines.image.engine import ImageEngine
    from muselab.engines.image.img2img import round_trip

    engine = ImageEngine.load(tiny_settings.model_for("image"), offline=True, data_dir=tmp_path)
    reference = InputStore(tmp_path / "inputs").keep(a_picture())
    request = ImageRequest(prompt="a fox", seed=3, steps=10, init_image=reference, speed="quality")
    steps = []
    kept = engine.generate(request.model_copy(update={"strength": 0.0}), on_progress=steps.append)
    assert len(steps) == 1  # no denoising: the VAE's round trip
    import torch

    expected = round_trip(engine.pipe, a_picture(), torch.Generator("cpu").manual_seed(3))
    assert np.array_equal(pixels(kept.outputs[0].image), pixels(expected))
    distances = []
    for strength in (0.3, 0.9):
        steps.clear()
        result = engine.generate(request.model_copy(update={"strength": strength}), on_progress=steps.append)
        assert len(steps) == int(10 * strength)  # A1111's and diffusers' share of the steps
        assert result.outputs[0].image.size == (64, 64)  # the input's shape at the model's size
        distances.append(np.abs(pixels(result.outputs[0].image) - pixels(expected)).mean())
    assert 0 < distances[0] < distances[1]
    again = engine.generate(request.model_copy(update={"strength": 0.9}))
    assert np.array_equal(pixels(again.outputs[0].image), pixels(result.outputs[0].image))
    assert (again.request.strength, again.request.resize_mode) == (0.9, "just resize")


def test_resize_modes_fit_another_shape_as_a1111_does():
    from muselab.engines.image.img2img import fit, fitted_size

    # Without a size asked for, the picture keeps its shape at the model's size (multiples of 8).
    assert fitted_size((4000, 3000), 512) == (512, 384) and fitted_size((600, 2000), 512) == (152, 512)

    wide = a_picture(128, 64)
    assert fit(wide, 64, 64, "just resize").size == (64, 64)
    cropped = pixels(fit(wide, 64, 64, "crop and resize"))
    assert np.array_equal(cropped, pixels(wide.crop((32, 0, 96, 64))))  # the middle, at the same scale
    filled = pixels(fit(wide, 64, 64, "resize and fill"))
    fitted = pixels(wide.resize((64, 32), Image.Resampling.LANCZOS))
    assert np.array_equal(filled[16:48], fitted)  # whole, centred
    # The margins repeat the edge rows (resampled from a zero-height box: within a level or two).
    assert np.abs(filled[:16] - fitted[0]).max() <= 2 and np.abs(filled[48:] - fitted[-1]).max() <= 2


def test_the_api_keeps_the_input_by_hash_and_refuses_a_bad_one_without_writing(tiny_dir, tmp_path):
    with make_client(tiny_dir, tmp_path) as client:
        encoded = "data:image/png;base64," + base64.b64encode(png_bytes(a_picture(96, 64))).decode()
        job = client.post(
            "/api/jobs/image", json={"prompt": "a fox", "seed": 1, "init_image": encoded, "strength": 0.5}
        )
        assert job.status_code == 202, job.text
        status = wait_done(client, job.json()["id"])
        assert status["status"] == "succeeded", status.get("error")
        recipe = status["request"]
        assert recipe["init_image"].startswith("sha256:") and recipe["strength"] == 0.5
        assert (recipe["width"], recipe["height"]) == (64, 64)  # at the tiny model's size (64), 64 at least
        stored = list((tmp_path / "data" / "inputs").iterdir())
        assert [path.name for path in stored] == [recipe["init_image"].split(":")[1] + ".png"]
        outputs = sorted((tmp_path / "outputs").rglob("*.png"))
        bad = client.post("/api/jobs/image", json={"prompt": "a fox", "init_image": base64.b64encode(b"text").decode()})
        assert bad.status_code == 422 and "init_image" in bad.text and "PNG, JPEG or WebP" in bad.text
        assert sorted((tmp_path / "outputs").rglob("*.png")) == outputs  # nothing written
        assert list((tmp_path / "data" / "inputs").iterdir()) == stored
        # A big picture fits the upload routes' body limit; other routes keep the small one.
        big = base64.b64encode(png_bytes(Image.effect_noise((1024, 1024), 64).convert("RGB"))).decode()
        assert len(big) > 200_000
        sent = client.post("/api/jobs/image", json={"prompt": "a fox", "steps": 1, "init_image": big, "strength": 0.1})
        assert sent.status_code == 202, sent.text
        wait_done(client, sent.json()["id"])
        assert client.post("/api/jobs/scene", json={"prompt": "x" * 100_000}).status_code == 413


def test_the_cli_starts_from_a_file_and_from_re_runs_it_to_the_same_bytes(cli_env, tmp_path):
    (tmp_path / "start.png").write_bytes(png_bytes(a_picture()))
    args = ["image", "a fox", "--preset", "tiny", "--init", "start.png", "--strength", "0.6", "--seed", "4"]
    made = run_cli([*args, "-o", "a.png"], cli_env, tmp_path)
    assert made.returncode == 0, made.stderr
    recipe = json.loads(Image.open(tmp_path / "a.png").text["muselab"])["request"]
    assert recipe["init_image"].startswith("sha256:") and recipe["strength"] == 0.6
    again = run_cli(["image", "--from", "a.png", "--preset", "tiny", "-o", "b.png"], cli_env, tmp_path)
    assert again.returncode == 0, again.stderr
    assert (tmp_path / "a.png").read_bytes() == (tmp_path / "b.png").read_bytes()
    missing = run_cli(["image", "a fox", "--preset", "tiny", "--init", "nope.png"], cli_env, tmp_path)
    assert missing.returncode == 2 and "--init nope.png: no such file" in missing.stderr
    (tmp_path / "fake.png").write_text("not a picture")
    fake = run_cli(["image", "a fox", "--preset", "tiny", "--init", "fake.png", "-o", "c.png"], cli_env, tmp_path)
    assert fake.returncode == 2 and "init_image:" in fake.stderr and not (tmp_path / "c.png").exists()


def test_img2img_runs_on_openvino_too_with_the_balanced_tier(tiny_settings, tmp_path):
    from muselab.engines.image.engine import ImageEngine

    engine = ImageEngine.load(
        tiny_settings.model_for("image"),
        offline=True,
        backend="openvino",
        openvino_cache=tmp_path / "ov",
        data_dir=tmp_path,
    )
    reference = InputStore(tmp_path / "inputs").keep(a_picture())
    steps = []
    result = engine.generate(
        ImageRequest(prompt="a fox", seed=3, init_image=reference, strength=0.5, speed="balanced"),
        on_progress=steps.append,
    )
    assert len(steps) == 12 and result.outputs[0].image.size == (64, 64)


def test_a1111_img2img_as_webuiapi_sends_it(tiny_dir, tmp_path):
    start = "data:image/png;base64," + base64.b64encode(png_bytes(a_picture())).decode()
    body = {  # webuiapi 0.9's img2img payload, its defaults as it sends them
        "init_images": [start],
        "resize_mode": 1,
        "denoising_strength": 0.6,
        "mask_blur": 4,
        "inpainting_fill": 0,
        "inpaint_full_res": True,
        "inpaint_full_res_padding": 0,
        "inpainting_mask_invert": 0,
        "initial_noise_multiplier": 1,
        "prompt": "a castle",
        "styles": [],
        "seed": 7,
        "subseed": -1,
        "subseed_strength": 0,
        "seed_resize_from_h": 0,
        "seed_resize_from_w": 0,
        "sampler_name": "Euler a",
        "batch_size": 1,
        "n_iter": 1,
        "steps": 5,
        "cfg_scale": 7.0,
        "width": 64,
        "height": 64,
        "restore_faces": False,
        "tiling": False,
        "negative_prompt": "",
        "eta": 1.0,
        "override_settings": {},
        "include_init_images": False,
        "send_images": True,
        "save_images": False,
        "alwayson_scripts": {},
    }
    with make_client(tiny_dir, tmp_path) as client:
        response = client.post("/sdapi/v1/img2img", json=body)
        assert response.status_code == 200, response.text
        result = response.json()
        picture = Image.open(io.BytesIO(base64.b64decode(result["images"][0])))
        assert picture.size == (64, 64)
        recipe = json.loads(picture.text["muselab"])["request"]
        assert (recipe["strength"], recipe["resize_mode"], recipe["seed"]) == (0.6, "crop and resize", 7)
        assert recipe["init_image"].startswith("sha256:")
        assert "init_images" not in result["parameters"]  # the picture is not sent back again
        assert json.loads(result["info"])["all_seeds"] == [7]
        small = "data:image/png;base64," + base64.b64encode(png_bytes(Image.new("L", (32, 32), 255))).decode()
        masked = client.post("/sdapi/v1/img2img", json={**body, "mask": small})
        assert masked.status_code == 422 and "mask: must be the size of init_image (64x64)" in masked.text
        empty = client.post("/sdapi/v1/img2img", json={**body, "init_images": []})
        assert empty.status_code == 422 and "init_images" in empty.json()["error"]["message"]


def test_the_expected_time_counts_the_steps_a_strength_runs():
    from muselab.engines.image.estimate import _gflop, model_work

    work = model_work("CompVis/stable-diffusion-v1-4")
    assert work is not None
    plain = ImageRequest(prompt="-", steps=20, guidance=1.0, decoder="fast", speed="quality")
    half = plain.model_copy(update={"init_image": "sha256:" + "0" * 64, "strength": 0.5})
    assert _gflop(half, work) == pytest.approx(_gflop(plain, work) / 2)
