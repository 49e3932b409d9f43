"""The OpenVINO path for MusicGen's decoder on the tiny models: the same clips as PyTorch, a one-time
cached conversion with progress, int8 weights from NNCF, clear errors, and cancellation while
converting."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from muselab.config import Settings
from muselab.devices import choose_placement, cpu_has_native_bf16
from muselab.engines import Cancelled, load_engine
from muselab.engines.music.engine import MusicEngine
from muselab.engines.music.openvino import OpenVinoMusicDecoder
from muselab.engines.music.tiny import build_musicgen_processor, tiny_musicgen_network
from muselab.engines.openvino_runtime import OpenVinoUnavailable, nncf_available, openvino_available
from muselab.schemas import MusicRequest

pytestmark = pytest.mark.skipif(not openvino_available(), reason="openvino is a dependency; installed by make setup")


def engines(
    stereo: bool = False, quantize: str = "none", dtype: torch.dtype = torch.float32
) -> tuple[MusicEngine, MusicEngine]:
    """The same random weights in `dtype` on PyTorch (unquantized) and on OpenVINO (`quantize`),
    built in memory: nothing cached."""
    processor = build_musicgen_processor()
    placement = choose_placement("cpu", str(dtype).removeprefix("torch."))
    first = tiny_musicgen_network(stereo=stereo).to(dtype)
    second = tiny_musicgen_network(stereo=stereo).to(dtype)
    second.load_state_dict(first.state_dict())
    on_torch = MusicEngine(first, processor, "tiny", placement, backend="torch")
    on_openvino = MusicEngine(second, processor, "tiny", placement, quantize=quantize, backend="openvino")
    return on_torch, on_openvino


@pytest.fixture(scope="module")
def mono() -> tuple[MusicEngine, MusicEngine]:
    return engines()


@pytest.mark.parametrize("guidance", [3.0, 1.0])
def test_openvino_draws_the_same_clip_as_pytorch(mono, guidance):
    """Unquantized, the OpenVINO decoder differs from PyTorch only by float rounding, so the same
    seed samples the same tokens: guided (2 rows a step) and unguided (1 row)."""
    on_torch, on_openvino = mono
    request = MusicRequest(prompt="calm piano", duration=1.0, seed=5, guidance=guidance)
    expected = on_torch.generate(request).outputs[0].audio
    got = on_openvino.generate(request).outputs[0].audio
    assert got.shape == expected.shape == (32000, 1)
    np.testing.assert_allclose(got, expected, atol=1e-5)
    assert isinstance(on_openvino.sampler.compiled, OpenVinoMusicDecoder)
    assert on_openvino.placement.dtype_name == "float32 (openvino)"


def test_a_second_clip_starts_from_an_empty_cache(mono):
    """The KV cache lives inside OpenVINO as state: each batch of clips must start it empty, and
    each clip of a batch attend to its own rows only, or clip 2 would differ from the same seed
    generated alone."""
    _, on_openvino = mono
    two = on_openvino.generate(MusicRequest(prompt="drums", duration=1.0, seed=7, num_clips=2))
    alone = on_openvino.generate(MusicRequest(prompt="drums", duration=1.0, seed=8))
    np.testing.assert_array_equal(two.outputs[1].audio, alone.outputs[0].audio)


def test_the_clips_of_a_request_run_as_one_batch_through_the_compiled_step(mono, monkeypatch):
    """Three guided clips: one compiled step a token with 6 rows (not three clips' worth of steps),
    and each clip the one its seed makes alone."""
    _, on_openvino = mono
    compiled = on_openvino.sampler.compiled
    real_start, rows = compiled.start, []

    def start(*args, **kwargs):
        step = real_start(*args, **kwargs)

        def counted(step_tokens, index):
            rows.append(step_tokens.shape[0])
            return step(step_tokens, index)

        return counted

    monkeypatch.setattr(compiled, "start", start)
    request = MusicRequest(prompt="drums", duration=1.0, seed=30, num_clips=3)
    together = on_openvino.generate(request)
    assert rows == [6] * on_openvino.tokens_for(1.0)
    for index, clip in enumerate(together.outputs):
        alone = on_openvino.generate(request.model_copy(update={"num_clips": 1, "seed": 30 + index}))
        np.testing.assert_array_equal(clip.audio, alone.outputs[0].audio)


def test_each_layer_scales_only_its_own_cross_attention_keys(mono):
    """Each layer's cross-attention keys and values are inputs of their own. Stacked in one tensor
    of all layers and indexed per layer, OpenVINO moved the keys' scaling above the indexing: every
    layer scaled every layer's keys, each token (24x the work with musicgen-small, growing with
    the clips of a batch and the prompt's length)."""
    _, on_openvino = mono
    compiled = on_openvino.sampler.compiled.compiled
    layers = len(on_openvino.sampler.decoder.layers)
    names = {port.get_any_name() for port in compiled.inputs}
    assert {f"cross_{kind}_{layer}" for layer in range(layers) for kind in ("key", "value")} <= names
    stacked = [
        op.get_friendly_name()
        for op in compiled.get_runtime_model().get_ordered_ops()
        for port in op.inputs()
        if port.get_partial_shape().rank.is_static and port.get_partial_shape().rank.get_length() > 4
    ]
    assert stacked == []


@pytest.mark.parametrize("seed", [7, 8, 9])
def test_a_clip_after_one_with_another_number_of_rows_is_unaffected(seed):
    """Unguided steps (1 row) and then a guided clip (2 rows) on one decoder: the guided clip must
    be what a fresh decoder makes. (The CPU plugin once kept stale cache state across the change
    and drew NaN logits with these weights.)"""
    torch.manual_seed(seed)
    _, used = engines(quantize="int8-dynamic")
    torch.manual_seed(seed)
    _, fresh = engines(quantize="int8-dynamic")
    inputs = used.processor(text=["a melody"], padding=True, return_tensors="pt")
    codes = torch.randint(0, 64, (4, 10), generator=torch.Generator().manual_seed(1))
    used.sampler.teacher_forced_logits(inputs.input_ids, inputs.attention_mask, codes)  # 1 row
    request = MusicRequest(prompt="calm piano", duration=1.0, seed=5)  # guided: 2 rows
    np.testing.assert_array_equal(used.generate(request).outputs[0].audio, fresh.generate(request).outputs[0].audio)


def test_teacher_forced_logits_match_the_plain_model(mono):
    """The step the sampler runs on either backend gives the plain forward pass's numbers."""
    on_torch, on_openvino = mono
    inputs = on_torch.processor(text=["a melody"], padding=True, return_tensors="pt")
    config = on_torch.network.config.decoder
    codes = torch.randint(0, config.vocab_size, (config.num_codebooks, 10), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        plain = on_torch.network(
            input_ids=inputs.input_ids, attention_mask=inputs.attention_mask, decoder_input_ids=codes
        ).logits
    for engine in (on_torch, on_openvino):
        logits = engine.sampler.teacher_forced_logits(inputs.input_ids, inputs.attention_mask, codes)
        torch.testing.assert_close(logits, plain, atol=1e-4, rtol=1e-4)


def test_stereo_models_match_too():
    on_torch, on_openvino = engines(stereo=True)
    request = MusicRequest(prompt="stereo drums", duration=1.0, seed=2)
    expected = on_torch.generate(request).outputs[0].audio
    got = on_openvino.generate(request).outputs[0].audio
    assert got.shape == expected.shape == (32000, 2)
    np.testing.assert_allclose(got, expected, atol=1e-5)


@pytest.mark.parametrize("quantize", ["int8", "int8-dynamic"])
def test_int8_openvino_weights_stay_close_to_float32_and_free_the_torch_decoder(quantize):
    on_torch, on_openvino = engines(quantize=quantize)
    assert on_openvino.placement.dtype_name == f"float32+{quantize} (openvino)"
    # The PyTorch decoder's weights are gone; only the cross-attention projections stay.
    layer = on_openvino.network.decoder.model.decoder.layers[0]
    assert isinstance(layer.fc1, torch.nn.Identity) and isinstance(layer.self_attn, torch.nn.Identity)
    assert isinstance(layer.encoder_attn.k_proj, torch.nn.Linear)
    inputs = on_torch.processor(text=["a melody"], padding=True, return_tensors="pt")
    codes = torch.randint(0, 64, (4, 10), generator=torch.Generator().manual_seed(1))
    exact = on_torch.sampler.teacher_forced_logits(inputs.input_ids, inputs.attention_mask, codes)
    int8 = on_openvino.sampler.teacher_forced_logits(inputs.input_ids, inputs.attention_mask, codes)
    snr = 10 * torch.log10((exact**2).sum() / ((int8 - exact) ** 2).sum())
    assert 20 < snr < 80  # int8: close, but not float rounding
    clip = on_openvino.generate(MusicRequest(prompt="calm piano", duration=1.0, seed=5)).outputs[0].audio
    assert clip.shape == (32000, 1) and np.isfinite(clip).all() and np.abs(clip).max() > 0


@pytest.mark.skipif(not cpu_has_native_bf16(), reason="bfloat16 is emulated (very slow) on this CPU")
def test_bfloat16_models_run_on_openvino_too():
    """Weights in bf16: the graph takes float32 cross-attention inputs, casts them, returns float32."""
    on_torch, on_openvino = engines(dtype=torch.bfloat16)
    assert on_openvino.placement.dtype_name == "bfloat16 (openvino)"
    inputs = on_torch.processor(text=["a melody"], padding=True, return_tensors="pt")
    codes = torch.randint(0, 64, (4, 10), generator=torch.Generator().manual_seed(1))
    expected = on_torch.sampler.teacher_forced_logits(inputs.input_ids, inputs.attention_mask, codes).float()
    got = on_openvino.sampler.teacher_forced_logits(inputs.input_ids, inputs.attention_mask, codes)
    assert got.dtype == torch.float32
    snr = 10 * torch.log10((expected**2).sum() / ((got - expected) ** 2).sum())
    assert snr > 20  # bf16 rounding in two different orders
    clip = on_openvino.generate(MusicRequest(prompt="calm piano", duration=1.0, seed=5)).outputs[0].audio
    assert clip.shape == (32000, 1) and np.isfinite(clip).all()


def test_auto_falls_back_to_pytorch_when_conversion_fails(monkeypatch):
    from muselab.engines.music import openvino as openvino_music
    from muselab.quantize import Int8Linear

    def broken(*args, **kwargs):
        raise RuntimeError("tracer exploded")

    monkeypatch.setattr(openvino_music, "convert_decoder", broken)
    processor, placement = build_musicgen_processor(), choose_placement("cpu", "float32")
    engine = MusicEngine(tiny_musicgen_network(), processor, "tiny", placement, quantize="int8", backend="auto")
    assert engine.placement.dtype_name == "float32+int8"  # PyTorch, with its own int8 decoder
    assert any(isinstance(m, Int8Linear) for m in engine.network.decoder.modules())
    assert engine.generate(MusicRequest(prompt="calm", duration=1.0, seed=1)).outputs[0].audio.shape == (32000, 1)
    with pytest.raises(OpenVinoUnavailable, match=r"tracer exploded.*--backend torch"):
        MusicEngine(tiny_musicgen_network(), processor, "tiny", placement, quantize="int8", backend="openvino")


@pytest.fixture
def ov_settings(tiny_dir: Path, tmp_path: Path) -> Settings:
    """The tiny models with a conversion cache of this test's own (so the first load converts)."""
    (tmp_path / "tiny-models").symlink_to(tiny_dir / "tiny-models")
    return Settings(data_dir=tmp_path, cache_dir=tmp_path / "cache", preset="tiny", offline=True, backend="auto")


def test_auto_converts_once_with_progress_then_reads_the_cache(ov_settings):
    events: list = []
    engine = load_engine("music", ov_settings, on_progress=events.append)
    assert engine.placement.backend == "openvino"  # auto on a CPU
    assert {event.stage for event in events} == {"converting"}
    assert "Converting the music decoder" in events[0].note
    folders = [p.name for p in ov_settings.openvino_cache.iterdir()]
    assert len(folders) == 1 and folders[0].startswith("musicgen-decoder-") and ".partial" not in folders[0]
    again: list = []
    second = load_engine("music", ov_settings, on_progress=again.append)
    assert again == [] and second.load_timings["convert_s"] < 0.5
    request = MusicRequest(prompt="calm piano", duration=1.0, seed=5)
    np.testing.assert_array_equal(engine.generate(request).outputs[0].audio, second.generate(request).outputs[0].audio)


@pytest.mark.parametrize("stage", ["Converting", "Saving", "Compiling"])
def test_a_cancel_while_converting_stops_and_never_leaves_half_a_model(ov_settings, stage):
    def cancel(event) -> None:
        if event.note.startswith(stage):
            raise Cancelled()

    with pytest.raises(Cancelled):
        load_engine("music", ov_settings, on_progress=cancel)
    cache = ov_settings.openvino_cache
    entries = list(cache.iterdir()) if cache.exists() else []
    assert not any(".partial" in entry.name for entry in entries)
    if stage == "Compiling":  # saved before the cancel: whole, and used by the next load
        assert len(entries) == 1 and (entries[0] / "model.bin").stat().st_size > 0
        events: list = []
        load_engine("music", ov_settings, on_progress=events.append)
        assert events == []
    else:
        assert entries == []


@pytest.mark.skipif(not nncf_available(), reason="nncf is a dependency; installed by make setup")
def test_backend_choice():
    from muselab.devices import Placement
    from muselab.engines.runtime import music_plan

    def backend(requested: str, device: str, quantize: str) -> str:
        placement = Placement(device, torch.float32, "a test's")
        plan = music_plan(Settings(backend=requested, quantize=quantize), placement, "facebook/musicgen-small")
        plan.require()
        assert plan.backend_reason
        return plan.backend

    assert backend("auto", "cpu", "int8-dynamic") == "openvino"
    assert backend("auto", "cpu", "none") == "torch"  # float32 would be held twice while converting
    assert backend("auto", "cuda", "int8") == "torch"
    assert backend("torch", "cpu", "int8") == "torch"
    assert backend("openvino", "cpu", "none") == "openvino"
    with pytest.raises(OpenVinoUnavailable, match="--backend torch"):
        backend("openvino", "cuda", "none")


def test_models_convert_does_the_music_conversion_ahead_of_time(cli_env, tmp_path):
    from conftest import run_cli

    env = {**cli_env, "MUSELAB_CACHE_DIR": str(tmp_path / "cache")}
    command = ["models", "convert", "--kind", "music", "--preset", "tiny", "--offline"]
    first = run_cli(command, env)
    assert first.returncode == 0, first.stderr
    assert "converted in" in first.stdout
    assert any(p.name.startswith("musicgen-decoder-") for p in (tmp_path / "cache" / "openvino").iterdir())
    second = run_cli(command, env)
    assert second.returncode == 0 and "already converted" in second.stdout
    wrong = run_cli(["models", "convert", "--kind", "video"], env)
    assert wrong.returncode == 2 and "--kind" in wrong.stderr
