"""The music engine on the tiny MusicGen: length, seeds, progress, cancel."""

from __future__ import annotations

import numpy as np
import pytest

from muselab.engines import Cancelled, CancelToken
from muselab.schemas import MusicRequest


@pytest.mark.parametrize("duration", [1.0, 2.0, 3.3])
def test_audio_has_the_requested_length_at_the_model_rate(music_engine, duration):
    result = music_engine.generate(MusicRequest(prompt="calm piano", duration=duration, seed=1))
    audio = result.outputs[0].audio
    assert result.outputs[0].sample_rate == 32000 == music_engine.sample_rate
    assert audio.shape == (round(duration * 32000), 1)
    assert audio.dtype == np.float32 and np.abs(audio).max() > 0


def test_same_seed_gives_identical_audio(music_engine):
    request = MusicRequest(prompt="calm piano", duration=1, seed=5)
    first, second = music_engine.generate(request), music_engine.generate(request)
    assert np.array_equal(first.outputs[0].audio, second.outputs[0].audio)
    other = music_engine.generate(request.model_copy(update={"seed": 6}))
    assert not np.array_equal(first.outputs[0].audio, other.outputs[0].audio)


def test_clip_i_uses_seed_plus_i(music_engine):
    both = music_engine.generate(MusicRequest(prompt="drums", duration=1, seed=20, num_clips=2))
    assert [clip.seed for clip in both.outputs] == [20, 21]
    single = music_engine.generate(MusicRequest(prompt="drums", duration=1, seed=21))
    assert np.array_equal(both.outputs[1].audio, single.outputs[0].audio)


def test_sampling_settings_change_the_output(music_engine):
    base = MusicRequest(prompt="drums", duration=1, seed=2)
    reference = music_engine.generate(base).outputs[0].audio
    for change in ({"temperature": 0.3}, {"top_k": 5}, {"top_p": 0.5}, {"guidance": 1.0}):
        changed = music_engine.generate(base.model_copy(update=change)).outputs[0].audio
        assert not np.array_equal(reference, changed), change


def test_progress_events_per_token_then_decoding(music_engine):
    events = []
    music_engine.generate(MusicRequest(prompt="calm", duration=1, seed=1, num_clips=2), on_progress=events.append)
    tokens = music_engine.tokens_for(1.0)
    generating = [e for e in events if e.stage == "generating"]
    assert [e.step for e in generating] == list(range(1, 2 * tokens + 1))
    assert [e.stage for e in events].count("decoding") == 2
    assert events[-1].stage == "decoding" and events[-1].step == events[-1].total == 2 * tokens
    assert all(e.eta is None or e.eta >= 0 for e in events)
    assert [e.item for e in generating[:tokens]] == [0] * tokens


def test_cancel_stops_within_one_token(music_engine):
    cancel = CancelToken()
    seen = []

    def on_progress(event):
        seen.append(event.step)
        if event.step == 10:
            cancel.cancel()

    with pytest.raises(Cancelled) as caught:
        music_engine.generate(MusicRequest(prompt="calm", duration=10, seed=1), on_progress, cancel)
    assert seen[-1] == 10
    assert caught.value.completed == []


def test_a_cancel_before_start_does_no_work(music_engine):
    cancel = CancelToken()
    cancel.cancel()
    seen = []
    with pytest.raises(Cancelled):
        music_engine.generate(MusicRequest(prompt="calm", duration=5, seed=1), seen.append, cancel)
    assert seen == []


def test_off_values_really_turn_sampling_filters_off(music_engine):
    """0 for top-k/top-p and guidance <= 1 must not fall back to the checkpoint's defaults."""
    from transformers import GenerationConfig

    seen = {}
    original = music_engine.network.generate

    def spy(**kwargs):
        config = GenerationConfig.from_dict({**music_engine.network.generation_config.to_dict(), **kwargs})
        seen.update(top_k=config.top_k, top_p=config.top_p, guidance=config.guidance_scale)
        return original(**kwargs)

    music_engine.network.generate = spy
    try:
        music_engine.generate(MusicRequest(prompt="x", duration=1, seed=1, top_k=0, top_p=0, guidance=0.5))
    finally:
        del music_engine.network.generate
    assert seen == {"top_k": 0, "top_p": 1.0, "guidance": 1.0}
