"""Every bound on a request gives a message that names the field and what it accepts."""

from __future__ import annotations

import annotated_types as at
import pytest

from muselab.schemas import MAX_SEED, SCHEDULERS, ImageRequest, MusicRequest, RequestError, parse_request


def _numeric_bounds(cls):
    for name, info in cls.model_fields.items():
        low = next((m.ge for m in info.metadata if isinstance(m, at.Ge)), None)
        high = next((m.le for m in info.metadata if isinstance(m, at.Le)), None)
        if low is not None and high is not None:
            yield name, low, high


BOUNDED = [(cls, *bound) for cls in (MusicRequest, ImageRequest) for bound in _numeric_bounds(cls)]


def test_every_numeric_field_is_bounded():
    names = {(cls.__name__, name) for cls, name, _, _ in BOUNDED}
    assert {
        ("MusicRequest", "duration"),
        ("MusicRequest", "temperature"),
        ("MusicRequest", "top_k"),
        ("MusicRequest", "top_p"),
        ("MusicRequest", "guidance"),
        ("MusicRequest", "num_clips"),
        ("MusicRequest", "seed"),
        ("ImageRequest", "width"),
        ("ImageRequest", "height"),
        ("ImageRequest", "steps"),
        ("ImageRequest", "guidance"),
        ("ImageRequest", "num_images"),
        ("ImageRequest", "seed"),
    } <= names


@pytest.mark.parametrize("side", ["below", "above"])
@pytest.mark.parametrize(("cls", "field", "low", "high"), BOUNDED, ids=lambda v: getattr(v, "__name__", str(v)))
def test_out_of_range_message_names_field_and_range(cls, field, low, high, side):
    value = low - 1 if side == "below" else high + 1
    if field in ("width", "height"):
        value = low - 8 if side == "below" else high + 8
    with pytest.raises(RequestError) as caught:
        parse_request(cls, {"prompt": "x", field: value})
    message = str(caught.value)
    low_text = str(low) if isinstance(low, int) else f"{low:g}"
    high_text = str(high) if isinstance(high, int) else f"{high:g}"
    assert f"- {field}: must be" in message
    assert f"from {low_text} to {high_text}" in message
    assert f"(got {value!r})" in message


def test_size_must_be_a_multiple_of_8():
    with pytest.raises(RequestError, match=r"width: must be a whole number from 64 to 2048 and a multiple of 8"):
        parse_request(ImageRequest, {"prompt": "x", "width": 500})


def test_unknown_scheduler_lists_the_choices():
    with pytest.raises(RequestError) as caught:
        parse_request(ImageRequest, {"prompt": "x", "scheduler": "Heun++"})
    for name in SCHEDULERS:
        assert repr(name) in str(caught.value)


@pytest.mark.parametrize("prompt", ["", "   \n"])
def test_blank_prompt_is_refused(prompt):
    with pytest.raises(RequestError, match="prompt: must be non-blank text of at most 2000 characters"):
        parse_request(MusicRequest, {"prompt": prompt})


def test_overlong_prompts_are_refused():
    with pytest.raises(RequestError, match="prompt: must be non-blank text of at most 2000"):
        parse_request(ImageRequest, {"prompt": "x" * 2001})
    with pytest.raises(RequestError, match="negative_prompt: must be text of at most 2000"):
        parse_request(ImageRequest, {"prompt": "x", "negative_prompt": "y" * 2001})


def test_unknown_setting_names_the_known_ones():
    with pytest.raises(RequestError, match=r"cfg: unknown setting; known ones are prompt, seed, model, .*steps"):
        parse_request(ImageRequest, {"prompt": "x", "cfg": 7})


def test_several_errors_are_reported_together():
    with pytest.raises(RequestError) as caught:
        parse_request(MusicRequest, {"prompt": "x", "duration": 999, "top_p": 2})
    assert "duration:" in str(caught.value) and "top_p:" in str(caught.value)


def test_wrong_type_is_explained():
    with pytest.raises(RequestError, match=r"steps: must be a whole number from 1 to 150 \(got 'many'\)"):
        parse_request(ImageRequest, {"prompt": "x", "steps": "many"})


def test_valid_requests_keep_values_and_trim_prompt():
    request = parse_request(MusicRequest, {"prompt": "  calm piano ", "duration": 30, "seed": MAX_SEED})
    assert (request.prompt, request.duration, request.seed) == ("calm piano", 30, MAX_SEED)
    image = parse_request(ImageRequest, {"prompt": "fox", "width": 64, "height": 2048})
    assert (image.width, image.height, image.steps) == (64, 2048, None)
