"""A1111's prompt emphasis and prompts over 75 tokens: parsed as A1111 reads them, encoded by the
tiny SD's own tokenizer and text encoder, and compared with what the diffusers pipeline encodes."""

from __future__ import annotations

import copy
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from muselab.engines.image.emphasis import chunked, encode, parse, pipeline_inputs, plain, weights_record
from muselab.schemas import RequestError

#: Five-letter words: the tiny tokenizer has no merges, so each is five tokens and 15 fill a chunk.
WORDS = [f"{letter}word" for letter in "abcdefghijklmnopqrstuvwxyz"]


@pytest.fixture(scope="module")
def folder(tiny_dir: Path) -> Path:
    return tiny_dir / "tiny-models" / "tiny-stable-diffusion"


@pytest.fixture(scope="module")
def pipe(folder: Path):
    from diffusers import StableDiffusionPipeline

    # No safety checker: with random weights it may black out a picture, and the test compares pixels.
    return StableDiffusionPipeline.from_pretrained(folder, safety_checker=None, requires_safety_checker=False)


@pytest.fixture(scope="module")
def clip_like(pipe):
    """The tiny pipeline with a bias in its text encoder's final layer norm, as real CLIP has: its
    hidden states then average to clearly nonzero (the random model's average to about 0), so
    A1111's mean restoration has a mean to restore."""
    from diffusers import StableDiffusionPipeline

    encoder = copy.deepcopy(pipe.text_encoder)
    with torch.no_grad():
        encoder.final_layer_norm.bias.normal_(0.2, 0.5, generator=torch.Generator().manual_seed(0))
    return StableDiffusionPipeline(**{**pipe.components, "text_encoder": encoder})


def plain_embeds(pipe, text: str) -> torch.Tensor:
    """The conditioning the pipeline itself makes of `text` (one chunk, truncated at 75 tokens)."""
    return pipe.encode_prompt(text, "cpu", 1, False)[0]


def test_parse_reads_the_a1111_wiki_examples():
    assert parse("a (word)") == [("a ", 1.0), ("word", 1.1)]
    assert parse("((word))") == [("word", pytest.approx(1.21))]
    assert parse("[word]") == [("word", pytest.approx(1 / 1.1))]
    assert parse("(word:1.5)") == parse("(word: 1.5 )") == [("word", 1.5)]
    assert parse("(a (b:2) c)") == [("a ", 1.1), ("b", pytest.approx(2.2)), (" c", 1.1)]
    assert parse("a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).") == [
        ("a ", 1.0),
        ("house", pytest.approx(1.573)),
        (" ", 1.1),
        ("on", pytest.approx(1.0)),
        (" a ", 1.1),
        ("hill", pytest.approx(0.55)),
        (", sun, ", 1.1),
        ("sky", pytest.approx(1.4641)),
        (".", 1.1),
    ]
    # Escapes are literal characters; an unclosed bracket runs to the end, a stray closing one is text.
    assert parse(r"a \(b\) \[c\] d\\e") == [(r"a (b) [c] d\e", 1.0)]
    assert parse("(word") == [("word", 1.1)] and parse("[a (b") == [("a ", pytest.approx(1 / 1.1)), ("b", 1.0)]
    assert parse("word)]") == [("word)]", 1.0)]
    assert parse("(unnecessary)(parens)") == [("unnecessaryparens", 1.1)]
    # BREAK only uppercase and as its own word; inside brackets it still breaks.
    assert parse("a cat BREAK a dog") == [("a cat", 1.0), ("BREAK", -1.0), ("a dog", 1.0)]
    assert parse("(a BREAK b)") == [("a", 1.1), ("BREAK", -1.0), ("b", 1.1)]
    assert parse("a break b, aBREAK") == [("a break b, aBREAK", 1.0)]
    with pytest.raises(RequestError, match="number"):
        parse("(word:1.2.3)")


def test_plain_removes_the_syntax_only_when_nothing_is_weighted():
    assert plain("(word:1.0)") == "word" and plain(r"a \(b\)") == "a (b)" and plain("a: b") == "a: b"
    assert plain("") == "" and plain("a [(b)]") == "a b"  # 1.1 and 1/1.1 cancel exactly
    assert plain("(word)") is None and plain("a BREAK b") is None and plain("(word:0)") is None
    assert weights_record("a fox", "") == {} and weights_record("(a fox:1.0)", None) == {}
    assert weights_record("a (fox)", "ugly BREAK dull") == {
        "prompt": [("a ", 1.0), ("fox", 1.1)],
        "negative_prompt": [("ugly", 1.0), ("BREAK", -1.0), ("dull", 1.0)],
    }
    assert weights_record("a fox", "[ugly]") == {"negative_prompt": [("ugly", pytest.approx(1 / 1.1))]}


def test_weight_one_conditions_exactly_as_the_plain_word(pipe, folder: Path):
    assert pipeline_inputs(pipe, "(word:1.0)", "") == {"prompt": "word", "negative_prompt": None}
    assert pipeline_inputs(pipe, r"a \(b\)", "[(ugly)]") == {"prompt": "a (b)", "negative_prompt": "ugly"}
    # The embedding path, forced on unweighted prompts, is bit for bit the pipeline's own encoding:
    # the tiny tokenizer pads with its end token (id 1), as SD 1.x's does and A1111 pads.
    assert pipe.tokenizer.pad_token_id == pipe.tokenizer.eos_token_id == 1
    for text in ("(word:1.0)", "", "a \\(long\\) " + " ".join(WORDS[:13])):
        assert torch.equal(encode(pipe, chunked(pipe.tokenizer, parse(text))), plain_embeds(pipe, plain(text)))
    # SD 2.x's tokenizer pads with "!" instead: still the pipeline's encoding exactly.
    from diffusers import StableDiffusionPipeline
    from transformers import CLIPTokenizer

    tokenizer = CLIPTokenizer.from_pretrained(folder / "tokenizer", pad_token="!")
    sd2 = StableDiffusionPipeline(**{**pipe.components, "tokenizer": tokenizer})
    assert tokenizer.pad_token_id not in (tokenizer.eos_token_id, None)
    assert torch.equal(encode(sd2, chunked(tokenizer, parse("(word:1.0)"))), plain_embeds(sd2, "word"))
    assert not torch.equal(plain_embeds(sd2, "word"), plain_embeds(pipe, "word"))


@pytest.mark.parametrize(
    ("prompt", "weight"), [("a (word:1.5) here", 1.5), ("a ((word)) here", 1.21), ("a [word] here", 1 / 1.1)]
)
def test_a_weight_scales_only_that_words_tokens(clip_like, prompt: str, weight: float):
    weighted = pipeline_inputs(clip_like, prompt, "")["prompt_embeds"]
    unweighted = plain_embeds(clip_like, "a word here")
    assert weighted.shape == unweighted.shape == (1, 77, 32)
    # Start token, "a", then w o r d at positions 2 to 5: only those are multiplied; then the whole
    # is rescaled by one factor so that its mean is the unweighted one's.
    weights = torch.ones(77)
    weights[2:6] = weight
    scaled = unweighted * weights[:, None]
    factor = unweighted.mean() / scaled.mean()
    assert abs(factor - 1) > 1e-3  # the rescale does something: positions outside the word move too
    assert torch.allclose(weighted, scaled * factor, rtol=1e-5, atol=1e-6)
    assert torch.allclose(weighted.mean(), unweighted.mean(), rtol=1e-5)
    assert not torch.allclose(weighted, scaled, rtol=1e-4)  # not weighted at the word's tokens alone


def test_states_that_average_to_zero_are_weighted_without_blowing_up(pipe):
    # The tiny random encoder's states average to about 0: dividing by that mean gave inf, and NaN
    # pictures. There the weights apply and the (nonexistent) mean is left alone.
    unweighted = plain_embeds(pipe, "a word here")
    assert abs(unweighted.mean()) < 1e-6 < unweighted.abs().mean()
    weighted = pipeline_inputs(pipe, "a (word:1.5) here", "")["prompt_embeds"]
    weights = torch.ones(77)
    weights[2:6] = 1.5
    assert torch.isfinite(weighted).all() and torch.allclose(weighted, unweighted * weights[:, None], atol=1e-6)


def test_a_long_prompt_is_encoded_in_chunks_of_75_tokens(pipe):
    prompt = " ".join(WORDS[:20])  # 100 tokens
    embeds = pipeline_inputs(pipe, prompt, "blurry")
    assert embeds["prompt_embeds"].shape == embeds["negative_prompt_embeds"].shape == (1, 154, 32)
    first, second = embeds["prompt_embeds"][:, :77], embeds["prompt_embeds"][:, 77:]
    assert torch.allclose(first, plain_embeds(pipe, " ".join(WORDS[:15])), atol=1e-6)
    # The last 25 tokens are there (the pipeline alone would have cut them off).
    assert torch.allclose(second, plain_embeds(pipe, " ".join(WORDS[15:20])), atol=1e-6)
    assert torch.allclose(first, plain_embeds(pipe, prompt), atol=1e-6)
    assert not torch.allclose(second, plain_embeds(pipe, ""), atol=1e-3)
    # The shorter negative prompt is padded with an empty chunk, as A1111 pads it.
    negative = embeds["negative_prompt_embeds"]
    assert torch.allclose(negative[:, :77], plain_embeds(pipe, "blurry"), atol=1e-6)
    assert torch.allclose(negative[:, 77:], plain_embeds(pipe, ""), atol=1e-6)


def test_a_comma_near_the_end_of_a_chunk_moves_the_break_back(pipe):
    comma = pipe.tokenizer.get_vocab()[",</w>"]
    # A comma at token 70: the words after it start the next chunk whole.
    near = " ".join(WORDS[:14]) + ", " + " ".join(WORDS[14:20])
    chunks = chunked(pipe.tokenizer, parse(near))
    assert [len(tokens) for tokens, _ in chunks] == [71, 30] and chunks[0][0][-1] == comma
    embeds = pipeline_inputs(pipe, near, "")["prompt_embeds"]
    assert torch.allclose(embeds[:, 77:], plain_embeds(pipe, " ".join(WORDS[14:20])), atol=1e-6)
    assert torch.allclose(embeds[:, :77], plain_embeds(pipe, " ".join(WORDS[:14]) + ","), atol=1e-6)
    # More than 20 tokens back, the comma is not used: the cut stays at 75, mid-word.
    far = " ".join(WORDS[:10]) + ", " + " ".join(WORDS[10:20])
    assert [len(tokens) for tokens, _ in chunked(pipe.tokenizer, parse(far))] == [75, 26]


def test_break_starts_a_new_chunk(pipe):
    embeds = pipeline_inputs(pipe, "a cat BREAK a dog", "")
    assert embeds["prompt_embeds"].shape == (1, 154, 32)
    assert torch.allclose(embeds["prompt_embeds"][:, :77], plain_embeds(pipe, "a cat"), atol=1e-6)
    assert torch.allclose(embeds["prompt_embeds"][:, 77:], plain_embeds(pipe, "a dog"), atol=1e-6)


def test_two_text_encoders_are_refused_with_a_reason(pipe):
    sdxl = SimpleNamespace(tokenizer=pipe.tokenizer, text_encoder=pipe.text_encoder, text_encoder_2=pipe.text_encoder)
    assert pipeline_inputs(sdxl, "a fox", "") == {"prompt": "a fox", "negative_prompt": None}
    for prompt in ("a (fox)", " ".join(WORDS)):
        with pytest.raises(RequestError, match=r"SD 1\.x/2\.x"):
            pipeline_inputs(sdxl, prompt, "")


@pytest.mark.parametrize("model", ["pipe", "clip_like"])
def test_a_weighted_long_prompt_generates_the_same_picture_for_a_seed(model: str, request: pytest.FixtureRequest):
    pipe = request.getfixturevalue(model)

    def picture(prompt: str) -> np.ndarray:
        generator = torch.Generator("cpu").manual_seed(7)
        inputs = pipeline_inputs(pipe, prompt, "[ugly], (blurry:1.3)")
        result = pipe(**inputs, num_inference_steps=2, height=64, width=64, generator=generator, output_type="np")
        return result.images[0]

    weighted = "a (red:1.4) fox BREAK in [snow]"
    first = picture(weighted)
    assert first.shape == (64, 64, 3) and np.isfinite(first).all()
    assert np.array_equal(first, picture(weighted))
    assert not np.array_equal(first, picture("a red fox in snow"))


def test_the_engine_records_the_emphasis_and_weight_one_makes_the_plain_prompts_picture(tiny_settings, tmp_path):
    """Through the product's engine (PyTorch, then OpenVINO with a prompt of two chunks)."""
    from muselab.engines.image.engine import ImageEngine
    from muselab.schemas import ImageRequest

    engine = ImageEngine.load(tiny_settings.model_for("image"), offline=True, data_dir=tmp_path)

    def made(prompt: str, on=engine):
        result = on.generate(ImageRequest(prompt=prompt, seed=1, steps=3, speed="quality", negative_prompt="[dark]"))
        return result.request, np.asarray(result.outputs[0].image)

    weighted, image = made("a (fox:1.5)")
    assert weighted.emphasis == {"prompt": [("a ", 1.0), ("fox", 1.5)], "negative_prompt": [("dark", 1 / 1.1)]}
    assert weighted.prompt == "a (fox:1.5)"  # the syntax itself stays in the recipe
    _, one = made("a (fox:1.0)")
    assert np.array_equal(one, made("a fox")[1]) and not np.array_equal(one, image)
    openvino = ImageEngine.load(
        tiny_settings.model_for("image"), offline=True, data_dir=tmp_path, backend="openvino", openvino_cache=tmp_path
    )
    request, long = made(" ".join(WORDS[:20]) + ", (fox:1.3)", on=openvino)
    assert long.shape == (64, 64, 3) and long.std() > 0 and request.emphasis["prompt"][-1] == ("fox", 1.3)
