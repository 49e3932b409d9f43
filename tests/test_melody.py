"""MusicGen Melody: the chroma of a melody clip in front of the decoder's tokens, through
muselab's token loop, against transformers' `MusicgenMelodyForConditionalGeneration.generate`."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from muselab.schemas import MusicRequest, RequestError

RATE = 32000


def tone(seconds: float, pitch: float) -> np.ndarray:
    t = np.arange(int(seconds * RATE)) / RATE
    return (0.4 * np.sin(2 * np.pi * pitch * t)).astype(np.float32)[None]


@pytest.fixture(scope="module")
def melody_engine(tiny_dir, tmp_path_factory):
    from muselab.devices import choose_placement
    from muselab.engines.music.melody import MelodyEngine
    from muselab.families import tiny_models

    folder = tiny_dir / "tiny-models" / tiny_models()["melody"].folder
    data = tmp_path_factory.mktemp("melody-data")
    return MelodyEngine.load(str(folder), choose_placement(), offline=True, data_dir=data)


def test_chroma_names_the_pitch_class_played(melody_engine):
    # C4, A4, E5: chroma classes 0, 9, 4 (C first, as librosa orders them).
    for pitch, pitch_class in ((261.63, 0), (440.0, 9), (659.26, 4)):
        chroma = melody_engine.melody_chroma(tone(3, pitch)[0], 0)
        assert chroma.shape == (1, 3 * RATE // 4096 + 1, 12)
        assert set(chroma[0].argmax(-1).tolist()) == {pitch_class}
        assert torch.equal(chroma.sum(-1), torch.ones(chroma.shape[:2]))  # one-hot, as transformers makes it


def test_a_window_gets_the_melody_from_where_it_starts(melody_engine):
    """Long pieces follow the melody on (audiocraft's rule): 30 s from the window's start, from
    the melody's start again where it ends."""
    melody = np.concatenate([tone(10, 261.63), tone(10, 440.0)], axis=1)  # C for 10 s, then A
    at_start = melody_engine.melody_chroma(melody[0], 0)[0].argmax(-1)
    later = melody_engine.melody_chroma(melody[0], 10.0)[0].argmax(-1)
    assert at_start[5] == 0 and at_start[-5] == 9  # the whole 20 s melody: C then A
    assert later[5] == 9 and later[80] == 0  # from 10 s: A, then C again (20 s on, wrapped)
    assert later.shape[0] == 235  # a whole 30 s window's chroma


@pytest.mark.parametrize("guidance", [3.0, 1.0])
@pytest.mark.parametrize("with_melody", [True, False])
def test_the_loop_follows_a_melody_exactly_as_transformers_generate(melody_engine, guidance, with_melody):
    """Same weights, seed and chroma: the same tokens, hence the same audio, as
    MusicgenMelodyForConditionalGeneration.generate (no melody: its "no melody" chroma)."""
    chroma = melody_engine.melody_chroma(tone(4, 440.0)[0], 0) if with_melody else None
    inputs = melody_engine.processor(["calm piano"], padding=True, return_tensors="pt")
    settings = {"guidance_scale": guidance, "temperature": 1.0, "top_k": 250}
    with torch.inference_mode():
        torch.manual_seed(5)
        extra = {} if chroma is None else {"input_features": chroma}
        reference = melody_engine.network.generate(**inputs, do_sample=True, max_new_tokens=60, **extra, **settings)
        torch.manual_seed(5)
        ours = melody_engine.sampler.generate(
            inputs["input_ids"], inputs["attention_mask"], max_new_tokens=60, top_p=1.0, chroma=chroma, **settings
        )
    assert ours.shape == reference.shape
    assert torch.equal(ours, reference)


def test_the_melody_steers_the_music(melody_engine):
    from muselab.uploads import InputStore

    store = InputStore(melody_engine.plan.inputs_dir)
    request = MusicRequest(prompt="calm piano", duration=2, seed=4)
    plain = melody_engine.generate(request).outputs[0].audio
    heard = {}
    for pitch in (261.63, 440.0):
        melody = store.keep_audio(tone(4, pitch), RATE)
        heard[pitch] = melody_engine.generate(request.model_copy(update={"melody": melody})).outputs[0].audio
        assert heard[pitch].shape == plain.shape == (2 * RATE, 1)
    assert not np.array_equal(heard[261.63], heard[440.0]) and not np.array_equal(heard[440.0], plain)


def test_a_long_melody_piece_is_made_in_windows(melody_engine):
    from muselab.uploads import InputStore

    melody = InputStore(melody_engine.plan.inputs_dir).keep_audio(tone(8, 440.0), RATE)
    request = MusicRequest(prompt="calm piano", duration=40, seed=4, melody=melody)
    events = []
    result = melody_engine.generate(request, on_progress=events.append)
    assert result.outputs[0].audio.shape == (40 * RATE, 1)
    assert len(melody_engine.windows(request)) == 2 and events[-1].step == melody_engine.steps(request)


def test_openvino_runs_the_melody_prefix_and_matches_pytorch(tiny_dir, tmp_path):
    """The melody model's OpenVINO step (the prefix in one call, then a token a call, KV cache in
    the runtime) draws the same tokens as PyTorch with float weights and cache, windows included;
    `auto` picks it with int8 weights."""
    pytest.importorskip("openvino")
    from muselab.engines.music.melody import MelodyEngine
    from muselab.families import tiny_models
    from muselab.uploads import InputStore

    folder = str(tiny_dir / "tiny-models" / tiny_models()["melody"].folder)
    on_torch = MelodyEngine.load(folder, offline=True, backend="torch", data_dir=tmp_path)
    on_openvino = MelodyEngine.load(folder, offline=True, backend="openvino", quantize="none", data_dir=tmp_path)
    assert on_openvino.plan.backend == "openvino" and on_openvino.sampler.compiled is not None
    melody = InputStore(on_torch.plan.inputs_dir).keep_audio(tone(4, 440.0), RATE)
    request = MusicRequest(prompt="calm piano", duration=35, seed=6, melody=melody)
    expected = on_torch.generate(request).outputs[0].audio
    got = on_openvino.generate(request).outputs[0].audio
    assert got.shape == expected.shape == (35 * RATE, 1)
    np.testing.assert_allclose(got, expected, atol=1e-5)
    auto = MelodyEngine.load(folder, offline=True, backend="auto", quantize="int8", data_dir=tmp_path)
    assert auto.plan.backend == "openvino"
    assert auto.generate(request.model_copy(update={"duration": 2})).outputs[0].audio.shape == (2 * RATE, 1)


def test_a_melody_for_a_model_that_cannot_follow_one_is_refused_before_anything_is_kept(tiny_settings, tmp_path):
    import base64
    import io

    import soundfile

    from muselab.config import Settings
    from muselab.jobs import JobService

    buffer = io.BytesIO()
    soundfile.write(buffer, tone(2, 440.0).T, RATE, format="WAV")
    clip = base64.b64encode(buffer.getvalue()).decode()
    settings = Settings(data_dir=tmp_path, music_model=tiny_settings.model_for("music"), offline=True)
    service = JobService(settings)
    try:
        with pytest.raises(RequestError, match=r"^melody: .* cannot follow a melody; use a melody model"):
            service.submit(MusicRequest(prompt="piano", duration=4, melody=clip), source="cli")
        not_audio = base64.b64encode(b"just some text, named melody.wav").decode()
        melody_folder = str(tiny_settings.tiny_models_dir / "tiny-musicgen-melody")
        with pytest.raises(RequestError, match=r"^melody: a WAV, FLAC, OGG or MP3 clip"):
            service.submit(
                MusicRequest(prompt="piano", duration=4, melody=not_audio, model=melody_folder), source="cli"
            )
        assert service.recent() == []
        assert not settings.inputs.exists() or not any(settings.inputs.iterdir())
    finally:
        service.shutdown()


def test_the_cli_follows_a_melody_file_and_from_remakes_it_to_the_same_bytes(cli_env, tmp_path, tiny_dir):
    import soundfile

    from conftest import run_cli

    soundfile.write(tmp_path / "hum.wav", tone(3, 440.0).T, RATE)
    model = str(tiny_dir / "tiny-models" / "tiny-musicgen-melody")
    args = ["music", "calm piano", "--model", model, "--melody", "hum.wav", "-d", "2", "--seed", "3"]
    made = run_cli([*args, "-o", "a.wav"], cli_env, tmp_path)
    assert made.returncode == 0, made.stderr
    again = run_cli(["music", "--from", "a.wav", "-o", "b.wav"], cli_env, tmp_path)
    assert again.returncode == 0, again.stderr
    assert (tmp_path / "a.wav").read_bytes() == (tmp_path / "b.wav").read_bytes()
    refused = run_cli(["music", "piano", "--preset", "tiny", "--melody", "hum.wav", "-o", "c.wav"], cli_env, tmp_path)
    assert refused.returncode == 2 and "melody: " in refused.stderr and "cannot follow a melody" in refused.stderr
    assert not (tmp_path / "c.wav").exists()


def test_a_stereo_melody_model_matches_transformers_generate_too(melody_engine):
    """musicgen-stereo-melody's shape: 8 interleaved codebooks (left, right) behind the same prefix."""
    from muselab.engines.music.melody import MelodySampler
    from muselab.engines.music.tiny import tiny_musicgen_melody_network

    network = tiny_musicgen_melody_network(stereo=True)
    chroma = melody_engine.melody_chroma(tone(4, 440.0)[0], 0)
    inputs = melody_engine.processor(["calm piano"], padding=True, return_tensors="pt")
    settings = {"guidance_scale": 3.0, "temperature": 1.0, "top_k": 250}
    with torch.inference_mode():
        torch.manual_seed(8)
        reference = network.generate(**inputs, input_features=chroma, do_sample=True, max_new_tokens=30, **settings)
        torch.manual_seed(8)
        ours = MelodySampler(network).generate(
            inputs["input_ids"], inputs["attention_mask"], max_new_tokens=30, top_p=1.0, chroma=chroma, **settings
        )
    assert ours.shape == reference.shape and ours.shape[1] == 2
    assert torch.equal(ours, reference)
