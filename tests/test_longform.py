"""Pieces longer than the model's context: windows that each continue the piece so far
(audiocraft's extend_stride), one code sequence decoded in cross-faded chunks, one progress bar,
and the finished windows kept when the piece is stopped."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from muselab.engines.base import CancelToken
from muselab.engines.music.longform import DECODE_CHUNK, Window, decode_chunks, windows
from muselab.schemas import MusicRequest


def test_windows_follow_audiocraft_extend_stride():
    # 75 s at 50 frames a second (and the spare frame), 30 s windows, 18 s of new audio each after the first.
    plan = windows(3751, 0, 1501, 900)
    assert plan == [Window(0, 1501), Window(601, 900), Window(601, 900), Window(601, 450)]
    assert sum(window.new for window in plan) == 3751
    # A clip to continue is the first window's prompt; a long one only its end.
    assert windows(3751, 250, 1501, 900)[0] == Window(250, 1251)
    assert windows(3751, 1000, 1501, 900)[0] == Window(601, 900)
    # A piece that fits is one window, the clip whole, as transformers' generate makes it.
    assert windows(1501, 1000, 1501, 900) == [Window(1000, 501)]


def test_decode_chunks_cover_the_piece_without_a_sliver():
    for frames in (1550, 1551, 3000, 3020, 3751, 15001):
        chunks = decode_chunks(frames)
        assert chunks[0][0] == 0 and chunks[-1][1] == frames
        assert all(a[1] == b[0] for a, b in itertools.pairwise(chunks))
        assert all(DECODE_CHUNK // 30 <= end - start <= DECODE_CHUNK + 50 for start, end in chunks)


@pytest.fixture(scope="module")
def long_piece(music_engine):
    """A 75 s piece from the tiny model (30 s context), and its progress."""
    engine = music_engine
    events = []
    request = MusicRequest(prompt="a long drone", duration=75, seed=11)
    result = engine.generate(request, on_progress=events.append)
    return engine, request, result, events


def test_a_75_second_piece_is_75_seconds_with_one_progress_bar(long_piece):
    engine, request, result, events = long_piece
    audio = result.outputs[0].audio
    assert audio.shape == (75 * engine.sample_rate, 1)
    assert engine.context < 75 * engine.frame_rate  # the tiny model's window is 30 s, as the real ones'
    totals = {event.total for event in events}
    assert totals == {engine.steps(request)}  # one bar for every window and the decoding
    steps = [event.step for event in events]
    assert steps == sorted(steps) and steps[-1] == engine.steps(request)
    assert {"generating", "decoding"} <= {event.stage for event in events}
    assert all(event.eta is not None for event in events if event.stage == "generating")


def test_windows_are_stitched_without_a_click(long_piece):
    engine, _, result, _ = long_piece
    audio = result.outputs[0].audio[:, 0]
    rate = engine.sample_rate
    jumps = np.abs(np.diff(audio))
    # Window seams (30, 48, 66 s) and decoding chunk seams (30, 60 s).
    for seconds in (30.0, 48.0, 60.0, 66.0):
        seam = round(seconds * rate)
        around = np.concatenate(
            [jumps[seam - rate // 2 : seam - rate // 100], jumps[seam + rate // 100 : seam + rate // 2]]
        )
        assert jumps[seam - rate // 100 : seam + rate // 100].max() <= around.max(), seconds


def test_chunked_decoding_matches_decoding_at_once(long_piece):
    import torch

    engine = long_piece[0]

    codes = torch.randint(0, 64, (engine.num_codebooks, 3751))
    chunked = engine.sampler.decode_codes(codes)
    whole = engine.sampler._decode_at_once(codes)
    assert chunked.shape == whole.shape
    assert (chunked - whole).abs().max() < 0.02 * whole.abs().max()


def test_a_long_piece_begins_with_the_30_second_piece_of_its_seed(long_piece):
    engine, request, result, _ = long_piece
    short = engine.generate(request.model_copy(update={"duration": 30.0})).outputs[0].audio
    assert engine.steps(request.model_copy(update={"duration": 30.0})) == engine.tokens_for(30.0)  # one window
    first = round(29 * engine.sample_rate)
    assert np.abs(result.outputs[0].audio[:first] - short[:first]).max() < 1e-3 * np.abs(short).max() + 1e-6


def test_a_stopped_long_piece_keeps_its_finished_windows(long_piece):
    from muselab.engines.base import Cancelled

    engine, request, _, _ = long_piece
    cancel = CancelToken()
    first_window = engine.tokens_for(30.0)

    def on_progress(event):
        if event.step > first_window + 100:  # well into the second window
            cancel.cancel()

    with pytest.raises(Cancelled) as stopped:
        engine.generate(request, on_progress=on_progress, cancel=cancel)
    (kept,) = stopped.value.completed
    assert kept.stopped_at == pytest.approx(1501 / engine.frame_rate, abs=0.01)
    assert kept.audio.shape[0] == round(kept.stopped_at * engine.sample_rate)


def test_the_service_saves_a_stopped_piece_with_its_recipe(tiny_settings, tmp_path):
    """A stopped long piece is saved, and its recipe says where it stopped."""
    import time

    from muselab.config import Settings
    from muselab.jobs import JobService
    from muselab.media import read_metadata

    settings = Settings(data_dir=tmp_path, music_model=tiny_settings.model_for("music"), backend="torch", offline=True)
    service = JobService(settings)
    try:
        job = service.submit(MusicRequest(prompt="a long drone", duration=40, seed=3), source="cli")
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            progress = service.status(job.id)["progress"]
            if progress and progress["step"] > 1600:  # into the second window
                service.cancel(job.id)
                break
            time.sleep(0.05)
        status = service.wait(job.id, timeout=120)
        assert status["status"] == "cancelled"
        (output,) = status["outputs"]
        (path,) = tmp_path.rglob(output["filename"])
        recipe = read_metadata(path)["recipe"]
        assert recipe == output["recipe"]
        assert recipe["request"]["duration"] == 40 and recipe["stopped_at"] == pytest.approx(30.02, abs=0.01)
    finally:
        service.shutdown()
