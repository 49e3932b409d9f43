"""Files carry their recipe (A1111 PNG text, WAV/FLAC/OGG comments) and are written safely."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from PIL import Image
from PIL.PngImagePlugin import PngInfo

from muselab import media
from muselab.engines import GenerationResult, ImageOutput, MusicOutput
from muselab.schemas import ImageRequest, MusicRequest


def image_result(**changes) -> GenerationResult:
    request = ImageRequest(
        prompt="a red fox in snow, watercolor",
        negative_prompt="blurry, low quality",
        width=64,
        height=96,
        steps=25,
        guidance=7.5,
        scheduler="DPM++ 2M Karras",
        seed=1234,
        model="CompVis/stable-diffusion-v1-4",
    ).model_copy(update=changes)
    picture = Image.new("RGB", (64, 96), (200, 80, 20))
    return GenerationResult(request, [ImageOutput(picture, request.seed)], "stable-diffusion-v1-4", "cpu", "float32", 1)


def music_result(prompt="calm piano", seconds=1.0, seed=7) -> GenerationResult:
    request = MusicRequest(prompt=prompt, duration=seconds, seed=seed, model="facebook/musicgen-small")
    t = np.arange(int(32000 * seconds)) / 32000
    audio = (0.3 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)[:, None]
    return GenerationResult(request, [MusicOutput(audio, 32000, seed)], "musicgen-small", "cpu", "float32", 1)


def test_png_carries_a1111_parameters_and_full_recipe(tmp_path):
    [path] = media.save_result(image_result(), tmp_path / "fox.png", tmp_path)
    text = Image.open(path).text
    assert text["parameters"] == (
        "a red fox in snow, watercolor\n"
        "Negative prompt: blurry, low quality\n"
        "Steps: 25, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 7.5, Seed: 1234, Size: 64x96, "
        "Model: stable-diffusion-v1-4, Version: muselab 0.1.0"
    )
    recipe = json.loads(text["muselab"])
    assert recipe["request"]["prompt"] == "a red fox in snow, watercolor"
    assert recipe["request"]["num_images"] == 1 and recipe["flagged"] is False


def test_a1111_parameters_round_trip(tmp_path):
    [path] = media.save_result(image_result(), tmp_path / "fox.png", tmp_path)
    parsed = media.parse_a1111_parameters(Image.open(path).text["parameters"])
    assert parsed == {
        "prompt": "a red fox in snow, watercolor",
        "negative_prompt": "blurry, low quality",
        "steps": 25,
        "guidance": 7.5,
        "seed": 1234,
        "width": 64,
        "height": 96,
        "scheduler": "DPM++ 2M Karras",
        "model_name": "stable-diffusion-v1-4",
    }


def test_multiline_prompt_and_quoted_values_round_trip():
    request = image_result(prompt="line one\nline two", scheduler="Euler a").request.model_dump()
    text = media.a1111_parameters(request, 'my, "odd" model')
    parsed = media.parse_a1111_parameters(text)
    assert parsed["prompt"] == "line one\nline two"
    assert parsed["scheduler"] == "Euler a"
    assert parsed["model_name"] == 'my, "odd" model'


def test_a_png_from_another_tool_is_read_through_its_parameters(tmp_path):
    info = PngInfo()
    info.add_text("parameters", "a castle\nSteps: 30, Sampler: Euler a, CFG scale: 6, Seed: 99, Size: 512x768")
    path = tmp_path / "a1111.png"
    Image.new("RGB", (8, 8)).save(path, pnginfo=info)
    assert media.request_from_file(path) == {
        "prompt": "a castle",
        "steps": 30,
        "scheduler": "Euler a",
        "guidance": 6.0,
        "seed": 99,
        "width": 512,
        "height": 768,
        "kind": "image",
    }


@pytest.mark.parametrize("extension", ["wav", "flac", "ogg"])
def test_audio_recipe_round_trip(tmp_path, extension):
    [path] = media.save_result(music_result(), tmp_path / f"piano.{extension}", tmp_path)
    meta = media.read_metadata(path)
    assert meta["recipe"]["request"]["prompt"] == "calm piano"
    assert meta["recipe"]["request"]["seed"] == 7
    assert meta["recipe"]["sample_rate"] == 32000 == meta["sample_rate"]
    assert meta["duration"] == pytest.approx(1.0, abs=1 / 50)


def test_wav_is_16_bit_pcm_and_other_readers_see_the_title(tmp_path):
    [path] = media.save_result(music_result(), tmp_path / "piano.wav", tmp_path)
    info = sf.info(str(path))
    assert (info.format, info.subtype, info.samplerate, info.frames) == ("WAV", "PCM_16", 32000, 32000)
    with sf.SoundFile(str(path)) as handle:
        assert handle.title == "calm piano"
    audio, _ = sf.read(str(path))
    assert np.abs(audio).max() == pytest.approx(0.3, abs=1e-3)


def test_a_2000_character_prompt_survives_in_wav(tmp_path):
    prompt = "strings, " * 222
    [path] = media.save_result(music_result(prompt=prompt[:2000].strip()), tmp_path, tmp_path)
    assert media.read_metadata(path)["recipe"]["request"]["prompt"] == prompt[:2000].strip()


def test_loudness_normalisation_levels_and_limits():
    quiet = np.full((1000, 1), 0.01, dtype=np.float32)
    loud = media.normalize_loudness(quiet)
    assert 20 * np.log10(np.sqrt(np.mean(loud**2))) == pytest.approx(-16, abs=0.1)
    spiky = np.zeros((1000, 1), dtype=np.float32)
    spiky[0] = 0.05
    assert np.abs(media.normalize_loudness(spiky)).max() == pytest.approx(10 ** (-1 / 20), rel=1e-4)


def test_names_come_from_prompt_and_seed_and_never_overwrite(tmp_path):
    result = image_result(prompt="A Red Fox, in the SNOW!!")
    first = media.save_result(result, None, tmp_path)
    second = media.save_result(result, None, tmp_path)
    assert first == [tmp_path / "a-red-fox-in-the-snow-1234.png"]
    assert second == [tmp_path / "a-red-fox-in-the-snow-1234-2.png"]
    explicit = tmp_path / "keep.png"
    explicit.write_bytes(b"precious")
    assert media.save_result(result, explicit, tmp_path) == [tmp_path / "keep-2.png"]
    assert explicit.read_bytes() == b"precious"


def test_several_outputs_to_one_name_are_numbered(tmp_path):
    result = image_result()
    result.outputs.append(ImageOutput(result.outputs[0].image, 1235))
    paths = media.save_result(result, tmp_path / "fox.png", tmp_path)
    assert [p.name for p in paths] == ["fox-1.png", "fox-2.png"]
    assert [media.read_metadata(p)["recipe"]["request"]["seed"] for p in paths] == [1234, 1235]


def test_slug_of_a_prompt_without_latin_letters():
    assert media.slugify("日本の海") == "untitled"
    assert len(media.slugify("word " * 40)) <= 48


def test_a_failed_write_leaves_nothing_behind(tmp_path):
    def explode(handle):
        handle.write(b"half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        media.write_new_file(tmp_path / "x.png", explode)
    assert list(tmp_path.iterdir()) == []


def test_wrong_extensions_are_refused_before_any_work():
    with pytest.raises(ValueError, match=r"end in \.png"):
        media.output_extension("image", Path("fox.jpg"))
    with pytest.raises(ValueError, match="use one of wav, flac, ogg"):
        media.output_extension("music", Path("song.mp3"))
    with pytest.raises(ValueError, match="does not match"):
        media.output_extension("music", Path("song.wav"), "flac")
    assert media.output_extension("music", Path("song"), "ogg") == "ogg"


def test_files_without_a_recipe_are_explained(tmp_path):
    plain = tmp_path / "plain.png"
    Image.new("RGB", (4, 4)).save(plain)
    with pytest.raises(media.MetadataError, match="carries no generation recipe"):
        media.read_metadata(plain)
    with pytest.raises(media.MetadataError, match="No such file"):
        media.read_metadata(tmp_path / "missing.wav")
    text = tmp_path / "notes.txt"
    text.write_text("hi")
    with pytest.raises(media.MetadataError, match=r"reads recipes from \.png, \.wav"):
        media.read_metadata(text)


def test_writes_are_atomic_links(tmp_path, monkeypatch):
    """The final name appears only once the data is complete (a link of the finished temp file)."""
    seen = []
    real_link = os.link

    def watching_link(src, dst):
        seen.append(Path(src).read_bytes())
        return real_link(src, dst)

    monkeypatch.setattr(os, "link", watching_link)
    path = media.write_new_file(tmp_path / "a.bin", lambda handle: handle.write(b"complete"))
    assert seen == [b"complete"] and path.read_bytes() == b"complete"
    assert [p.name for p in tmp_path.iterdir()] == ["a.bin"]


def test_fast_decoder_is_written_as_a1111_vae_and_read_back(tmp_path):
    [path] = media.save_result(image_result(decoder="fast"), tmp_path / "fox.png", tmp_path)
    text = Image.open(path).text["parameters"]
    assert "VAE: TAESD" in text
    assert media.parse_a1111_parameters(text)["decoder"] == "fast"


@pytest.mark.parametrize(("umask", "mode"), [(0o022, 0o644), (0o027, 0o640), (0o077, 0o600)])
def test_written_files_follow_the_umask(tmp_path, umask, mode):
    """Outputs get the mode any other program's new file gets: under 022 another account or a web
    server can read them (mkstemp alone would leave them 0600)."""
    previous = os.umask(umask)
    try:
        result = image_result()
        written = [
            media.write_new_file(tmp_path / "a.txt", lambda handle: handle.write(b"x")),
            *media.save_result(result, tmp_path / "a.png", tmp_path),
        ]
    finally:
        os.umask(previous)
    assert [oct(path.stat().st_mode & 0o777) for path in written] == [oct(mode)] * 2
