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


class StepCounter:
    """Counts the decoder's steps and the rows each one runs, from a hook on the first LM head
    (one call a step, rows x hidden)."""

    def __init__(self, engine):
        self.rows: list[int] = []
        self.handle = engine.sampler.lm_heads[0].register_forward_hook(self.hook)

    def hook(self, module, args, output) -> None:
        self.rows.append(args[0].shape[0])

    def __enter__(self) -> StepCounter:
        return self

    def __exit__(self, *exc) -> None:
        self.handle.remove()


@pytest.mark.parametrize("guidance", [3.0, 1.0])
def test_the_clips_of_a_request_sample_in_one_batch_and_match_clips_made_alone(music_engine, guidance):
    """Clip i of a batch is the very clip seed + i makes by itself (`--from` re-runs one clip that
    way), and the batch runs the decoder once a token for all the clips, not once per clip."""
    request = MusicRequest(prompt="warm synth", duration=1, seed=40, num_clips=3, guidance=guidance)
    tokens = music_engine.tokens_for(1.0)
    with StepCounter(music_engine) as batched:
        together = music_engine.generate(request)
    with StepCounter(music_engine) as single:
        alone = [music_engine.generate(request.model_copy(update={"num_clips": 1, "seed": 40 + i})) for i in range(3)]
    assert [clip.seed for clip in together.outputs] == [40, 41, 42]
    for clip, reference in zip(together.outputs, alone, strict=True):
        assert np.array_equal(clip.audio, reference.outputs[0].audio)
    assert len({clip.audio.tobytes() for clip in together.outputs}) == 3  # three seeds, three clips
    rows = 2 if guidance > 1 else 1  # guided: a conditional and an unconditional row per clip
    assert batched.rows == [3 * rows] * tokens
    assert single.rows == [rows] * (3 * tokens)


def test_batches_are_capped_and_a_cancel_keeps_the_batches_already_made(music_engine, monkeypatch):
    """Past MAX_BATCH_CLIPS the clips go in several batches; a cancel in the second keeps the first's."""
    from muselab.engines.music import engine as music_module

    monkeypatch.setattr(music_module, "MAX_BATCH_CLIPS", 2)
    request = MusicRequest(prompt="drums", duration=1, seed=3, num_clips=3)
    tokens = music_engine.tokens_for(1.0)
    with StepCounter(music_engine) as counter:
        result = music_engine.generate(request)
    assert counter.rows == [4] * tokens + [2] * tokens  # two guided clips, then one
    alone = music_engine.generate(request.model_copy(update={"num_clips": 1, "seed": 5}))
    assert np.array_equal(result.outputs[2].audio, alone.outputs[0].audio)

    cancel = CancelToken()

    def on_progress(event):
        if event.item == 2 and event.stage == "generating":
            cancel.cancel()

    with pytest.raises(Cancelled) as caught:
        music_engine.generate(request, on_progress, cancel)
    assert [clip.seed for clip in caught.value.completed] == [3, 4]
    assert np.array_equal(caught.value.completed[1].audio, result.outputs[1].audio)


def test_a_batch_stays_within_its_memory_budget(music_engine, monkeypatch):
    from muselab.engines.music import engine as music_module

    request = MusicRequest(prompt="drums", duration=30, seed=3, num_clips=8)
    tokens = music_engine.tokens_for(30)
    assert music_engine.clips_per_batch(request, tokens) == music_module.MAX_BATCH_CLIPS == 4
    one_clip = music_engine.sampler.cache_bytes(2, 1 + tokens)
    monkeypatch.setattr(music_module, "BATCH_CACHE_BYTES", 3 * one_clip)
    assert music_engine.clips_per_batch(request, tokens) == 3
    monkeypatch.setattr(music_module, "BATCH_CACHE_BYTES", one_clip // 2)
    assert music_engine.clips_per_batch(request, tokens) == 1  # never none


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
    # Both clips sample in one batch: each token is a step of each, one event for the two.
    assert [e.step for e in generating] == list(range(2, 2 * tokens + 1, 2))
    assert [e.stage for e in events].count("decoding") == 2
    assert events[-1].stage == "decoding" and events[-1].step == events[-1].total == 2 * tokens
    assert all(e.eta is None or e.eta >= 0 for e in events)
    assert [e.item for e in generating] == [0] * tokens
    assert [e.item for e in events if e.stage == "decoding"] == [0, 1]


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


def test_off_values_really_turn_sampling_filters_off(music_engine, monkeypatch):
    """0 for top-k/top-p and guidance <= 1 must build no filter at all (not the checkpoint's defaults)."""
    from muselab.engines.music import sampler as musicgen_sampler

    built = []
    original = musicgen_sampler._logits_processors

    def spy(*args):
        built.append(original(*args))
        return built[-1]

    monkeypatch.setattr(musicgen_sampler, "_logits_processors", spy)
    music_engine.generate(MusicRequest(prompt="x", duration=1, seed=1, top_k=0, top_p=0, guidance=0.5))
    assert [type(p).__name__ for p in built[0]] == []
    music_engine.generate(MusicRequest(prompt="x", duration=1, seed=1, top_k=7, top_p=0.5, guidance=2, temperature=0.5))
    assert [type(p).__name__ for p in built[1]] == [
        "ClassifierFreeGuidanceLogitsProcessor",
        "TemperatureLogitsWarper",
        "TopKLogitsWarper",
        "TopPLogitsWarper",
    ]


@pytest.mark.parametrize(
    "settings",
    [
        {"guidance_scale": 3.0, "temperature": 1.0, "top_k": 250, "top_p": 1.0},
        {"guidance_scale": 1.0, "temperature": 0.7, "top_k": 5, "top_p": 0.9},
    ],
)
def test_the_lean_sampler_draws_the_same_audio_as_transformers_generate(music_engine, settings):
    """Same weights, same seed: the fast loop must be a faster way to the very same clip."""
    import copy

    import torch

    from muselab.engines.music.sampler import MusicgenSampler

    network, processor = music_engine.network, music_engine.processor
    if music_engine.placement.device != "cpu":  # bit-equal logits need the same kernels on both sides
        network = copy.deepcopy(network).cpu().float()
    inputs = processor(text=["calm piano"], padding=True, return_tensors="pt")
    with torch.inference_mode():
        torch.manual_seed(3)
        reference = network.generate(**inputs, do_sample=True, max_new_tokens=60, **settings)
        torch.manual_seed(3)
        ours = MusicgenSampler(network).generate(inputs.input_ids, inputs.attention_mask, max_new_tokens=60, **settings)
    assert ours.shape == reference.shape
    assert torch.equal(ours, reference)


@pytest.mark.parametrize("quantize", ["int8", "int8-dynamic"])
def test_int8_weights_make_a_clip_of_the_same_length_and_say_so(tiny_settings, quantize):
    import torch

    from muselab.engines.music.engine import MusicEngine
    from muselab.quantize import Int8Linear

    engine = MusicEngine.load(tiny_settings.model_for("music"), offline=True, quantize=quantize)
    linears = [m for m in engine.network.decoder.modules() if isinstance(m, Int8Linear)]
    assert linears and all(m.weight.dtype == torch.int8 for m in linears)
    result = engine.generate(MusicRequest(prompt="calm piano", duration=1, seed=1))
    assert result.outputs[0].audio.shape == (32000, 1)
    assert result.dtype.endswith(f"+{quantize}")
    # Weight-only int8 batches clips exactly; int8-dynamic on PyTorch quantizes a layer's input
    # with one scale for all its rows, so there clips sample one at a time to stay reproducible.
    with StepCounter(engine) as counter:
        two = engine.generate(MusicRequest(prompt="calm piano", duration=1, seed=1, num_clips=2))
    assert set(counter.rows) == ({4} if quantize == "int8" else {2})
    alone = engine.generate(MusicRequest(prompt="calm piano", duration=1, seed=2))
    assert np.array_equal(two.outputs[0].audio, result.outputs[0].audio)
    assert np.array_equal(two.outputs[1].audio, alone.outputs[0].audio)


def test_the_lean_sampler_matches_generate_for_a_stereo_model_too():
    """Stereo MusicGen interleaves left and right codebooks (8 of them) in its delay pattern."""
    import torch

    from muselab.engines.music.sampler import MusicgenSampler
    from muselab.engines.music.tiny import build_musicgen_processor, tiny_musicgen_network

    network = tiny_musicgen_network(stereo=True)
    inputs = build_musicgen_processor()(text=["stereo drums"], padding=True, return_tensors="pt")
    settings = {"guidance_scale": 3.0, "temperature": 1.0, "top_k": 20, "top_p": 1.0}
    with torch.inference_mode():
        torch.manual_seed(9)
        reference = network.generate(**inputs, do_sample=True, max_new_tokens=30, **settings)
        torch.manual_seed(9)
        ours = MusicgenSampler(network).generate(inputs.input_ids, inputs.attention_mask, max_new_tokens=30, **settings)
    assert reference.shape[1] == 2  # left and right
    assert torch.equal(ours, reference)


def test_the_fixed_shape_step_gives_the_logits_of_the_growing_cache(music_engine):
    """The CUDA graph's step (fixed shapes, cache written at a tensor position, masked attention)
    must compute what the CPU loop's step computes, position after position."""
    import torch

    sampler, device = music_engine.sampler, music_engine.placement.device
    inputs = music_engine.processor(text=["calm piano", "fast drums"], padding=True, return_tensors="pt").to(device)
    length, rows = 12, 4  # two prompts, guided: conditional and unconditional rows
    tokens = torch.randint(0, 64, (length, rows, sampler.num_codebooks), generator=torch.Generator().manual_seed(2))
    tokens = tokens.to(device)
    exact = music_engine.placement.dtype == torch.float32  # float16 on a GPU: a few units in the third digit
    tolerance = {"rtol": 1e-4, "atol": 1e-5} if exact else {"rtol": 1e-2, "atol": 1e-2}
    with torch.inference_mode():
        cross = sampler._encode_text(inputs.input_ids, inputs.attention_mask)
        growing = sampler._stepper(rows, length, cross)
        run, step_tokens, position = sampler.static_step(rows, length, cross)
        for index in range(length):
            expected = growing(tokens[index], index)
            step_tokens.copy_(tokens[index])
            position.fill_(index)
            torch.testing.assert_close(run(), expected, **tolerance)
        assert not torch.allclose(expected, growing(tokens[0], 0))  # positions really differ


@pytest.mark.skipif("not __import__('torch').cuda.is_available()")
def test_on_a_cuda_gpu_tokens_replay_a_captured_graph_with_the_eager_logits(music_engine):
    import copy

    import torch

    from muselab.engines.music.sampler import CudaGraphStep, MusicgenSampler

    sampler = MusicgenSampler(copy.deepcopy(music_engine.network).cuda().float())  # float32: tight comparison
    inputs = music_engine.processor(text=["calm piano"], padding=True, return_tensors="pt").to("cuda")
    codes = torch.randint(0, 64, (sampler.num_codebooks, 20), device="cuda")
    with torch.inference_mode():
        cross = sampler._encode_text(inputs.input_ids, inputs.attention_mask)
        assert isinstance(sampler._stepper(1, 20, cross), CudaGraphStep)
        graphed = sampler.teacher_forced_logits(inputs.input_ids, inputs.attention_mask, codes)
        sampler.cuda_graphs = False
        eager = sampler.teacher_forced_logits(inputs.input_ids, inputs.attention_mask, codes)
        torch.testing.assert_close(graphed, eager, rtol=1e-4, atol=1e-4)
        sampler.cuda_graphs = True
        torch.manual_seed(5)
        audio = sampler.generate(
            inputs.input_ids,
            inputs.attention_mask,
            max_new_tokens=30,
            guidance_scale=3.0,
            temperature=1.0,
            top_k=20,
            top_p=1.0,
        )
    assert audio.shape[0] == 1 and torch.isfinite(audio).all()


def test_the_cuda_graph_setting_reaches_the_sampler(tiny_settings):
    """MUSELAB_CUDA_GRAPHS=0 is the way out should a GPU misbehave under graph replay."""
    from muselab.engines import load_engine

    engine = load_engine("music", tiny_settings.model_copy(update={"cuda_graphs": False}))
    assert engine.sampler.cuda_graphs is False
    assert load_engine("music", tiny_settings).sampler.cuda_graphs is True


def test_nan_scores_refuse_the_clip_with_a_way_out_instead_of_crashing(music_engine, monkeypatch):
    """On a GPU, NaN probabilities reaching `multinomial` kill the process's CUDA context (every later
    job fails); the sampler must refuse that clip with a clear error and stay usable."""
    import torch

    from muselab.engines.music.sampler import NonFiniteScores

    sampler = music_engine.sampler
    real_logits = sampler.logits

    def overflowing(*args, **kwargs):
        logits = real_logits(*args, **kwargs)
        return torch.full_like(logits, float("nan"))

    monkeypatch.setattr(sampler, "logits", overflowing)
    with pytest.raises(NonFiniteScores, match="--dtype float32"):
        music_engine.generate(MusicRequest(prompt="calm piano", duration=1, seed=1))
    monkeypatch.undo()
    result = music_engine.generate(MusicRequest(prompt="calm piano", duration=1, seed=1))
    assert np.isfinite(result.outputs[0].audio).all()
