"""LoRAs: found in the LoRA folder, fused into the tiny SD's weights, named in the prompt as A1111
does or with --lora / `loras`, recorded with their hashes, and refused (naming the file) when
they are pickles or do not fit the model."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from safetensors.torch import load_file, save_file

from conftest import run_cli
from muselab.loras import parse_choice, prompt_with_tags, short_hash, split_prompt
from muselab.media import parse_a1111_parameters
from muselab.schemas import ImageRequest, RequestError, parse_request
from test_api import make_client, wait_done


@pytest.fixture(scope="session")
def lora_dir(tiny_dir: Path) -> Path:
    """The tiny data folder's LoRA folder (the default one, <data_dir>/loras): a diffusers-format
    LoRA, a kohya-format one, a pickle and one whose shapes fit no layer of the tiny model."""
    from muselab.engines.image.tiny import build_tiny_lora

    folder = tiny_dir / "loras"
    model = tiny_dir / "tiny-models" / "tiny-stable-diffusion"
    build_tiny_lora(model, folder / "inkwash.safetensors")
    build_tiny_lora(model, folder / "kohya-style.safetensors", kohya=True, seed=7)
    (folder / "evil.pt").write_bytes(b"\x80\x04cos\nsystem\n.")  # a pickle: never to be unpickled
    tensors = load_file(folder / "inkwash.safetensors")
    key = next(name for name in tensors if name.startswith("unet.") and name.endswith("lora_A.weight"))
    tensors[key] = tensors[key][:, :-3].contiguous()  # in-features no layer of the model has
    save_file(tensors, str(folder / "misfit.safetensors"))
    (folder / "broken.safetensors").write_bytes(b"not a safetensors file at all")
    return folder


def pixels(result) -> np.ndarray:
    return np.asarray(result.outputs[0].image).astype(int)


def test_prompt_tags_come_out_of_the_prompt_as_a1111_reads_them():
    assert split_prompt("a fox, <lora:inkwash:0.8>, watercolor <LORA:kohya-style>") == (
        "a fox, watercolor",
        ["inkwash:0.8", "kohya-style"],
    )
    assert prompt_with_tags("a fox", ["inkwash:0.8"]) == "a fox <lora:inkwash:0.8>"
    assert parse_choice("inkwash") == ("inkwash", 1.0) and parse_choice("ink wash:-0.5") == ("ink wash", -0.5)
    for bad in ("../secret", "/etc/passwd", "a/b:1", "name:lots", "name:9"):
        with pytest.raises(ValueError):
            parse_choice(bad)
    # Through the schema: one entry per name (the last wins), with its weight spelled out.
    request = parse_request(ImageRequest, {"prompt": "fox", "loras": ["inkwash:0.5", "kohya-style", "inkwash:0.7"]})
    assert request.loras == ["kohya-style:1", "inkwash:0.7"]
    with pytest.raises(RequestError, match="loras"):
        parse_request(ImageRequest, {"prompt": "fox", "loras": ["../../outside"]})


def test_a_lora_changes_the_picture_whichever_way_it_is_named_and_goes_away_again(tiny_settings, lora_dir):
    from muselab.engines.image.engine import ImageEngine

    engine = ImageEngine.load(tiny_settings.model_for("image"), offline=True, lora_dir=lora_dir)
    plain = ImageRequest(prompt="a fox", seed=3, steps=2)
    base = engine.generate(plain)
    tagged = engine.generate(plain.model_copy(update={"prompt": "a fox <lora:inkwash:0.9>"}))
    named = engine.generate(plain.model_copy(update={"loras": ["inkwash:0.9"]}))
    assert np.abs(pixels(tagged) - pixels(base)).mean() > 0.5  # the LoRA is in the weights
    assert np.array_equal(pixels(tagged), pixels(named))
    assert tagged.request.prompt == "a fox" and tagged.request.loras == ["inkwash:0.9"]
    assert tagged.request.lora_hashes == {"inkwash": short_hash(lora_dir / "inkwash.safetensors")}
    weaker = engine.generate(plain.model_copy(update={"loras": ["inkwash:0.3"]}))
    assert 0 < np.abs(pixels(weaker) - pixels(base)).mean() < np.abs(pixels(tagged) - pixels(base)).mean()
    kohya = engine.generate(plain.model_copy(update={"loras": ["kohya-style"]}))  # kohya-ss key names
    assert np.abs(pixels(kohya) - pixels(base)).mean() > 0.5
    assert np.array_equal(pixels(engine.generate(plain)), pixels(base))  # none again: the model's own weights


def test_pickles_and_misfits_are_refused_naming_the_file_and_the_model_keeps_serving(tiny_settings, lora_dir):
    from muselab.engines.image.engine import ImageEngine

    engine = ImageEngine.load(tiny_settings.model_for("image"), offline=True, lora_dir=lora_dir)
    request = ImageRequest(prompt="a fox", seed=3, steps=1)
    before = engine.generate(request)
    with pytest.raises(RequestError, match=r"evil\.pt is a pickle"):
        engine.generate(request.model_copy(update={"loras": ["evil"]}))
    with pytest.raises(RequestError, match=r"misfit\.safetensors does not fit this model"):
        engine.generate(request.model_copy(update={"loras": ["misfit"]}))
    with pytest.raises(RequestError, match=r"broken\.safetensors is not a readable safetensors file"):
        engine.generate(request.model_copy(update={"loras": ["broken"]}))
    with pytest.raises(RequestError, match=r"No LoRA named 'absent'.*inkwash"):
        engine.generate(request.model_copy(update={"loras": ["absent"]}))
    assert np.array_equal(pixels(engine.generate(request)), pixels(before))


def test_cli_lora_option_and_from_re_run_it(cli_env, tmp_path, lora_dir):
    lora = ["image", "a fox <lora:inkwash:0.8>", "--lora", "kohya-style:0.5", "--preset", "tiny"]
    made = run_cli([*lora, "--steps", "2", "--seed", "5", "-o", "a.png"], cli_env, tmp_path)
    assert made.returncode == 0, made.stderr
    text = Image.open(tmp_path / "a.png").text["parameters"]
    assert text.startswith("a fox <lora:inkwash:0.8> <lora:kohya-style:0.5>\n")
    hashes = f"inkwash: {short_hash(lora_dir / 'inkwash.safetensors')}"
    assert f'Lora hashes: "{hashes}, kohya-style: {short_hash(lora_dir / "kohya-style.safetensors")}"' in text
    again = run_cli(["image", "--from", "a.png", "--preset", "tiny", "-o", "b.png"], cli_env, tmp_path)
    assert again.returncode == 0, again.stderr
    assert (tmp_path / "a.png").read_bytes() == (tmp_path / "b.png").read_bytes()
    plain = ["image", "a fox", "--preset", "tiny", "--steps", "2", "--seed", "5", "-o", "c.png"]
    without = run_cli(plain, cli_env, tmp_path)
    assert without.returncode == 0, without.stderr
    assert not np.array_equal(np.asarray(Image.open(tmp_path / "a.png")), np.asarray(Image.open(tmp_path / "c.png")))
    refused = run_cli(["image", "a fox", "--lora", "evil", "--preset", "tiny", "--steps", "1"], cli_env, tmp_path)
    assert refused.returncode == 2 and "evil.pt is a pickle" in refused.stderr


def test_a1111_lists_loras_and_takes_them_in_the_prompt_as_webuiapi_sends_them(tiny_dir, tmp_path, lora_dir):
    import base64
    import io

    with make_client(tiny_dir, tmp_path, lora_dir=lora_dir) as client:
        listed = client.get("/sdapi/v1/loras").json()
        assert [lora["name"] for lora in listed] == ["broken", "inkwash", "kohya-style", "misfit"]
        assert all("/" not in lora["path"] for lora in listed)  # no server folders
        assert client.post("/sdapi/v1/refresh-loras").status_code == 200
        assert client.get("/api/info").json()["loras"] == ["broken", "inkwash", "kohya-style", "misfit"]
        body = {"prompt": "a fox <lora:inkwash:0.8>", "seed": 5, "steps": 2}
        answer = client.post("/sdapi/v1/txt2img", json=body)
        assert answer.status_code == 200, answer.text
        image = Image.open(io.BytesIO(base64.b64decode(answer.json()["images"][0])))
        parameters = image.text["parameters"]
        assert parameters.startswith("a fox <lora:inkwash:0.8>\n") and "Lora hashes:" in parameters
        assert parse_a1111_parameters(parameters)["prompt"] == "a fox <lora:inkwash:0.8>"
        plain = client.post("/sdapi/v1/txt2img", json={**body, "prompt": "a fox"}).json()["images"][0]
        assert plain != answer.json()["images"][0]
        refused = client.post("/sdapi/v1/txt2img", json={**body, "prompt": "a fox <lora:evil:1>"})
        assert refused.status_code == 422 and "pickle" in refused.text
        misfit = client.post("/sdapi/v1/txt2img", json={**body, "prompt": "a fox <lora:misfit>"})
        assert misfit.status_code == 422 and "misfit.safetensors does not fit" in misfit.text
        assert str(tmp_path) not in misfit.text and str(lora_dir) not in misfit.text  # folders stay private
        job = client.post("/api/jobs/image", json={"prompt": "a fox", "loras": ["inkwash:0.8"], "steps": 2, "seed": 5})
        assert job.status_code == 202, job.text
        done = wait_done(client, job.json()["id"])
        assert done["status"] == "succeeded" and done["request"]["lora_hashes"]["inkwash"]
