"""Seed variations (A1111's variation seed): explore near a picture, recorded and re-run."""

from __future__ import annotations

import json

import numpy as np

from muselab.media import a1111_parameters, parse_a1111_parameters
from muselab.schemas import ImageRequest
from test_api import make_client


def pixels(result, index: int = 0) -> np.ndarray:
    return np.asarray(result.outputs[index].image).astype(int)


def test_a_variation_blends_toward_its_seed_and_is_recorded(image_engine):
    base = ImageRequest(prompt="a fox", seed=11, steps=4, speed="quality")
    plain = image_engine.generate(base)
    assert plain.request.subseed is None  # no strength, no variation seed recorded
    none = image_engine.generate(base.model_copy(update={"subseed": 5, "subseed_strength": 0.0}))
    assert np.array_equal(pixels(none), pixels(plain))
    other = image_engine.generate(base.model_copy(update={"seed": 5}))
    whole = image_engine.generate(base.model_copy(update={"subseed": 5, "subseed_strength": 1.0}))
    assert np.array_equal(pixels(whole), pixels(other))  # strength 1: the variation seed's own picture
    near = image_engine.generate(base.model_copy(update={"subseed": 5, "subseed_strength": 0.1, "num_images": 2}))
    to_plain = np.abs(pixels(near) - pixels(plain)).mean()
    to_other = np.abs(pixels(near) - pixels(other)).mean()
    assert 0 < to_plain < to_other  # near the picture it varies
    again = image_engine.generate(near.request)
    assert all(np.array_equal(pixels(again, i), pixels(near, i)) for i in range(2))
    drawn = image_engine.generate(base.model_copy(update={"subseed_strength": 0.2}))
    assert drawn.request.subseed is not None  # drawn, and recorded so the picture can be made again


def test_a1111_text_carries_the_variation_seed_both_ways():
    request = {
        "prompt": "a fox",
        "negative_prompt": "",
        "steps": 20,
        "scheduler": "Euler a",
        "guidance": 7.0,
        "seed": 11,
        "width": 512,
        "height": 512,
        "subseed": 5,
        "subseed_strength": 0.25,
    }
    text = a1111_parameters(request, "sd15")
    assert "Seed: 11, Variation seed: 5, Variation seed strength: 0.25, Size: 512x512" in text
    back = parse_a1111_parameters(text)
    assert (back["subseed"], back["subseed_strength"]) == (5, 0.25)
    assert "Variation seed" not in a1111_parameters({**request, "subseed_strength": 0}, "sd15")


def test_a1111_txt2img_takes_subseeds_as_webuiapi_sends_them(tiny_dir, tmp_path):
    body = {"prompt": "a fox", "seed": 3, "subseed": 9, "subseed_strength": 0.3, "steps": 2, "batch_size": 2}
    with make_client(tiny_dir, tmp_path) as client:
        response = client.post("/sdapi/v1/txt2img", json=body)
    assert response.status_code == 200, response.text
    info = json.loads(response.json()["info"])
    assert info["subseed"] == 9 and info["all_subseeds"] == [9, 10] and info["subseed_strength"] == 0.3
    assert "Variation seed: 9, Variation seed strength: 0.3" in info["infotexts"][0]
