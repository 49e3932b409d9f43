"""Continuing a clip: untrusted audio uploads, the clip's codes through the token loop (PyTorch and
OpenVINO) against transformers' `generate`, and the front ends."""

from __future__ import annotations

import base64
import io
import json

import numpy as np
import pytest
import soundfile
import torch

from conftest import run_cli
from muselab.schemas import MusicRequest, RequestError
from muselab.uploads import InputStore, decode_audio

RATE = 32000


def a_clip(seconds: float = 0.5, rate: int = RATE, channels: int = 1, pitch: float = 220.0) -> np.ndarray:
    """A tone with an onset, (channels, samples)."""
    t = np.arange(int(seconds * rate)) / rate
    tone = (0.4 * np.sin(2 * np.pi * pitch * t) * np.minimum(1, t * 20)).astype(np.float32)
    return np.stack([tone * (1 - 0.3 * c) for c in range(channels)])


def wav_bytes(samples: np.ndarray, rate: int = RATE, format: str = "WAV") -> bytes:
    buffer = io.BytesIO()
    soundfile.write(buffer, samples.T, rate, format=format)
    return buffer.getvalue()


@pytest.mark.parametrize(
    ("data", "says"),
    [
        (b"plain text with a .wav name", "this is not one"),
        (wav_bytes(np.zeros((1, 8000 * 400), np.float32), 8000), "this one is 400 s long"),
        (wav_bytes(a_clip())[:30], "this is not one"),  # a truncated header
    ],
)
def test_bad_clips_are_refused_naming_the_field(data, says):
    with pytest.raises(RequestError, match=rf"^audio_prompt: a WAV, FLAC, OGG or MP3 clip .*{says}"):
        decode_audio(data, "audio_prompt")


def test_clips_decode_from_each_format_and_are_kept_by_hash(tmp_path):
    clip = a_clip(channels=2, rate=44100)
    for format in ("WAV", "FLAC", "OGG"):
        samples, rate = decode_audio(wav_bytes(clip, 44100, format), "audio_prompt")
        assert samples.shape == clip.shape and rate == 44100
        assert np.abs(samples - clip).max() < (0.05 if format == "OGG" else 1e-3)
    store = InputStore(tmp_path)
    reference = store.keep_audio(clip, 44100)
    assert store.keep_audio(clip, 44100) == reference and len(list(tmp_path.iterdir())) == 1
    samples, rate = store.load_audio(reference, "audio_prompt")
    assert np.array_equal(samples, clip) and rate == 44100
    with pytest.raises(RequestError, match="audio_prompt: expected a stored clip's 'sha256:"):
        store.load_audio("../../etc/passwd", "audio_prompt")


def test_the_loop_continues_a_clip_exactly_as_transformers_generate():
    """Same weights, seed and audio prompt: the same codes, hence the same audio, mono and stereo."""
    from muselab.engines.music.sampler import MusicgenSampler
    from muselab.engines.music.tiny import build_musicgen_processor, tiny_musicgen_network

    settings = {"guidance_scale": 3.0, "temperature": 1.0, "top_k": 250, "top_p": 1.0}
    for stereo in (False, True):
        network, processor = tiny_musicgen_network(stereo=stereo), build_musicgen_processor()
        processor.feature_extractor.feature_size = 2 if stereo else 1
        clip = a_clip(channels=2 if stereo else 1)
        inputs = processor(audio=clip if stereo else clip[0], sampling_rate=RATE, text=["calm piano"], padding=True)
        inputs = {key: torch.as_tensor(np.asarray(value)) for key, value in inputs.items()}
        encoder = network.audio_encoder
        with torch.inference_mode():
            sides = [encoder.encode(inputs["input_values"][:, s : s + 1]).audio_codes[0, 0] for s in range(len(clip))]
            codes = torch.stack(sides, dim=1).reshape(-1, sides[0].shape[1])  # left, right interleaved
            torch.manual_seed(3)
            reference = network.generate(**inputs, do_sample=True, max_new_tokens=40, **settings)
            torch.manual_seed(3)
            sampler = MusicgenSampler(network)
            ours = sampler.generate(
                inputs["input_ids"], inputs["attention_mask"], max_new_tokens=40, prompt_codes=codes, **settings
            )
        assert ours.shape == reference.shape and ours.shape[1] == len(clip)
        assert torch.equal(ours, reference), "stereo" if stereo else "mono"


@pytest.fixture(scope="module")
def engine(tiny_settings, tmp_path_factory):
    from muselab.engines.music.engine import MusicEngine

    data = tmp_path_factory.mktemp("continuation-data")
    return MusicEngine.load(tiny_settings.model_for("music"), offline=True, data_dir=data)


def test_a_continuation_starts_with_the_clip_and_depends_on_it(engine):
    from muselab.engines.music.continuation import prompt_codes

    store = InputStore(engine.plan.inputs_dir)
    noise = np.random.default_rng(1).normal(0, 0.3, (1, RATE // 2)).astype(np.float32)
    low, high = store.keep_audio(a_clip(pitch=220), RATE), store.keep_audio(noise, RATE)
    request = MusicRequest(prompt="calm piano", duration=1.5, seed=4, audio_prompt=low)
    steps = []
    result = engine.generate(request, on_progress=steps.append)
    audio = result.outputs[0].audio[:, 0]
    drawn = [event for event in steps if event.stage == "generating"]
    assert audio.shape == (int(1.5 * RATE),) and len(drawn) == engine.steps(request) == drawn[-1].total
    # The piece begins with the clip as EnCodec gives it back (its decoder sees a few frames
    # ahead, so the comparison stops short of the clip's end).
    codes, clip_samples = prompt_codes(engine, request)
    with torch.inference_mode():
        round_trip = engine.network.audio_encoder.decode(codes[None, None], [None]).audio_values[0, 0].numpy()
    head = clip_samples // 2
    np.testing.assert_allclose(audio[:head], round_trip[:head], atol=1e-4)
    other = engine.generate(request.model_copy(update={"audio_prompt": high})).outputs[0].audio[:, 0]
    assert np.abs(other[clip_samples:] - audio[clip_samples:]).mean() > 1e-3  # the new part follows the clip
    again = engine.generate(request).outputs[0].audio[:, 0]
    assert np.array_equal(again, audio)
    new = engine.generate(request.model_copy(update={"new_only": True})).outputs[0].audio[:, 0]
    assert np.array_equal(new, audio[clip_samples:])
    longer = store.keep_audio(a_clip(seconds=1.2), RATE)
    with pytest.raises(RequestError, match=r"duration: the piece \(1 s\) includes the clip it continues \(1.2 s\)"):
        engine.generate(request.model_copy(update={"duration": 1.0, "audio_prompt": longer}))


def test_a_stereo_clip_at_another_rate_is_fitted_to_the_model(engine):
    from muselab.engines.music.continuation import fitted

    clip = a_clip(channels=2, rate=44100)
    mono = fitted(clip, 44100, RATE, 1)
    assert mono.shape == (1, int(0.5 * RATE)) or abs(mono.shape[1] - 0.5 * RATE) <= 64
    reference = InputStore(engine.plan.inputs_dir).keep_audio(clip, 44100)
    result = engine.generate(MusicRequest(prompt="x", duration=1.0, seed=1, audio_prompt=reference))
    assert result.outputs[0].audio.shape == (RATE, 1)


def test_openvino_continues_a_clip_as_pytorch_does(tmp_path):
    from muselab.devices import choose_placement
    from muselab.engines.music.engine import MusicEngine
    from muselab.engines.music.tiny import build_musicgen_processor, tiny_musicgen_network

    placement = choose_placement("cpu", "float32")
    first, second = tiny_musicgen_network(), tiny_musicgen_network()
    second.load_state_dict(first.state_dict())
    on_torch = MusicEngine(first, build_musicgen_processor(), "tiny", placement, backend="torch", data_dir=tmp_path)
    on_openvino = MusicEngine(
        second, build_musicgen_processor(), "tiny", placement, backend="openvino", data_dir=tmp_path
    )
    clip = InputStore(on_torch.plan.inputs_dir).keep_audio(a_clip(), RATE)
    request = MusicRequest(prompt="calm piano", duration=1.0, seed=6, audio_prompt=clip)
    expected = on_torch.generate(request).outputs[0].audio
    got = on_openvino.generate(request).outputs[0].audio
    assert got.shape == expected.shape == (RATE, 1)
    np.testing.assert_allclose(got, expected, atol=1e-5)


def test_the_cli_and_api_continue_a_file_and_refuse_bad_ones(cli_env, tmp_path, tiny_dir):
    from test_api import make_client, wait_done

    (tmp_path / "start.wav").write_bytes(wav_bytes(a_clip()))
    args = ["music", "calm piano", "--preset", "tiny", "--continue", "start.wav", "-d", "1", "--seed", "3"]
    made = run_cli([*args, "-o", "a.wav"], cli_env, tmp_path)
    assert made.returncode == 0, made.stderr
    assert soundfile.info(str(tmp_path / "a.wav")).frames == RATE
    again = run_cli(["music", "--from", "a.wav", "--preset", "tiny", "-o", "b.wav"], cli_env, tmp_path)
    assert again.returncode == 0, again.stderr
    assert soundfile.read(tmp_path / "a.wav")[0].tolist() == soundfile.read(tmp_path / "b.wav")[0].tolist()
    (tmp_path / "notes.wav").write_text("not a clip")
    bad = run_cli([*args[:4], "--continue", "notes.wav", "-o", "c.wav"], cli_env, tmp_path)
    assert bad.returncode == 2 and "audio_prompt:" in bad.stderr and not (tmp_path / "c.wav").exists()

    (tmp_path / "api").mkdir()
    with make_client(tiny_dir, tmp_path / "api") as client:
        clip = "data:audio/wav;base64," + base64.b64encode(wav_bytes(a_clip())).decode()
        job = client.post("/api/jobs/music", json={"prompt": "drums", "duration": 1, "seed": 2, "audio_prompt": clip})
        assert job.status_code == 202, job.text
        status = wait_done(client, job.json()["id"])
        assert status["status"] == "succeeded", status.get("error")
        assert status["request"]["audio_prompt"].startswith("sha256:")
        long_clip = base64.b64encode(wav_bytes(a_clip(seconds=1.5))).decode()
        too_long = client.post("/api/jobs/music", json={"prompt": "drums", "duration": 1, "audio_prompt": long_clip})
        assert too_long.status_code == 422 and "duration: the piece" in too_long.text
        text = base64.b64encode(b"hello").decode()
        refused = client.post("/api/jobs/music", json={"prompt": "drums", "audio_prompt": text})
        assert refused.status_code == 422 and "audio_prompt:" in refused.text
        stored = list((tmp_path / "api" / "data" / "inputs").iterdir())
        assert len(stored) == 1  # the good clip only
        recipe = json.loads(json.dumps(status["request"]))
        assert recipe["new_only"] is False


def test_the_api_continues_a_clip_from_the_history_by_its_output_id(tiny_dir, tmp_path):
    """'Continue this' through the API: a clip in the history named by its output id, no upload."""
    from test_api import make_client, wait_done

    with make_client(tiny_dir, tmp_path) as client:
        first = client.post("/api/jobs/music", json={"prompt": "drums", "duration": 1, "seed": 2})
        made = wait_done(client, first.json()["id"])
        assert made["status"] == "succeeded", made.get("error")
        output_id = made["outputs"][0]["id"]
        job = client.post(
            "/api/jobs/music",
            json={"prompt": "drums", "duration": 2, "seed": 2, "audio_prompt": f"output:{output_id}"},
        )
        assert job.status_code == 202, job.text
        status = wait_done(client, job.json()["id"])
        assert status["status"] == "succeeded", status.get("error")
        assert status["request"]["audio_prompt"].startswith("sha256:")  # kept by hash: the recipe re-runs it
        missing = client.post(
            "/api/jobs/music", json={"prompt": "drums", "duration": 2, "audio_prompt": "output:" + "0" * 32}
        )
        assert missing.status_code == 422 and "audio_prompt: no output" in missing.text


def test_the_api_takes_clips_as_multipart_files(tiny_dir, tmp_path):
    """POST /api/jobs/KIND/files: the JSON request in a `request` part, each clip a file part,
    checked as base64 ones are."""
    from test_api import make_client, wait_done

    with make_client(tiny_dir, tmp_path) as client:
        request = json.dumps({"prompt": "drums", "duration": 2, "seed": 2})
        files = {"audio_prompt": ("start.wav", wav_bytes(a_clip()), "audio/wav")}
        job = client.post("/api/jobs/music/files", data={"request": request}, files=files)
        assert job.status_code == 202, job.text
        status = wait_done(client, job.json()["id"])
        assert status["status"] == "succeeded", status.get("error")
        assert status["request"]["audio_prompt"].startswith("sha256:") and status["request"]["duration"] == 2
        text = {"audio_prompt": ("notes.wav", b"not a clip", "audio/wav")}
        refused = client.post("/api/jobs/music/files", data={"request": request}, files=text)
        assert refused.status_code == 422 and "audio_prompt: a WAV, FLAC, OGG or MP3 clip" in refused.text
        stray = {"prompt": ("p.txt", b"x", "text/plain")}
        refused = client.post("/api/jobs/music/files", data={"request": request}, files=stray)
        assert refused.status_code == 422 and "prompt: not a file field" in refused.text
        assert len(list((tmp_path / "data" / "inputs").iterdir())) == 1  # the good clip only
