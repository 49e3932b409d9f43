"""Device and dtype choice: bf16 only where the CPU has it natively and a probe finds it faster."""

from __future__ import annotations

import pytest
import torch

from muselab import devices


@pytest.fixture
def cpu_only(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)


def test_avx2_only_cpu_gets_float32(cpu_only, monkeypatch):
    monkeypatch.setattr(devices, "cpu_flags", lambda: frozenset({"avx2", "fma", "avx512f"}))
    placement = devices.choose_placement()
    assert (placement.device, placement.dtype) == ("cpu", torch.float32)
    assert "no native bf16" in placement.reason


def fake_probe(monkeypatch, fp32: float, bf16: float) -> None:
    speeds = {torch.float32: fp32, torch.bfloat16: bf16}
    monkeypatch.setattr(devices, "matmul_gflops", lambda dtype: speeds[dtype])


@pytest.mark.parametrize("flag", ["avx512_bf16", "amx_bf16"])
def test_native_bf16_cpu_gets_bfloat16_when_the_probe_finds_it_faster(cpu_only, monkeypatch, flag):
    monkeypatch.setattr(devices, "cpu_flags", lambda: frozenset({"avx2", flag}))
    fake_probe(monkeypatch, fp32=182, bf16=399)  # 2-core AMD EPYC
    placement = devices.choose_placement()
    assert (placement.device, placement.dtype) == ("cpu", torch.bfloat16)
    assert flag in placement.reason and placement.dtype_name == "bfloat16"
    assert "182" in placement.reason and "399" in placement.reason


def test_native_bf16_that_is_slower_than_float32_is_not_used(cpu_only, monkeypatch):
    monkeypatch.setattr(devices, "cpu_flags", lambda: frozenset({"avx512_bf16"}))
    fake_probe(monkeypatch, fp32=376, bf16=186)  # 2-core Intel Xeon without AMX
    placement = devices.choose_placement()
    assert placement.dtype == torch.float32
    assert "float32 is faster here" in placement.reason


def test_the_probe_measures_real_matmuls():
    assert devices.matmul_gflops(torch.float32, size=256, repeats=2) > 1.0


def test_explicit_dtype_wins(cpu_only, monkeypatch):
    monkeypatch.setattr(devices, "cpu_flags", lambda: frozenset({"avx512_bf16"}))
    placement = devices.choose_placement("cpu", "float32")
    assert placement.dtype == torch.float32 and "--dtype float32" in placement.reason


def test_cuda_gets_float16_when_present(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda index=0: "Fake GPU")
    placement = devices.choose_placement()
    assert (placement.device, placement.dtype) == ("cuda", torch.float16)
    assert "Fake GPU" in placement.reason


def test_asking_for_a_missing_gpu_is_a_clear_error(cpu_only):
    with pytest.raises(devices.DeviceError, match="use --device cpu"):
        devices.choose_placement("cuda")
    with pytest.raises(devices.DeviceError, match="MPS"):
        devices.choose_placement("mps")


def test_this_machine_reads_its_cpu_flags():
    flags = devices.cpu_flags()
    assert not flags or "sse2" in flags or "neon" in flags or "asimd" in flags


def test_auto_quantize_uses_int8_only_where_it_buys_speed():
    from muselab.engines.runtime import image_quantize, music_quantize
    from muselab.quantize import fbgemm_available

    assert music_quantize("auto", "cpu")[0] == ("int8-dynamic" if fbgemm_available() else "int8")
    assert music_quantize("auto", "cuda")[0] == "none"
    assert image_quantize("auto")[0] == "none"
    assert image_quantize("int8")[0] == "int8"
    assert image_quantize("int8-dynamic")[0] == "int8"  # images: the same int8 either way
    assert music_quantize("none", "cpu")[0] == "none"
    assert all(reason for reason in (music_quantize("auto", "cpu")[1], image_quantize("auto")[1]))


def test_a_machine_getting_less_busy_during_the_probe_does_not_tip_it_to_bfloat16(cpu_only, monkeypatch):
    """The probe measures float32 and bf16 in turn: a machine whose speed changes while it measures
    (a shared one, CI) slows both alike. Measured one after the other, this ramp would have shown
    bf16 twice as fast as float32 on a chip where it is half as fast."""
    monkeypatch.setattr(devices, "cpu_flags", lambda: frozenset({"avx512_bf16"}))
    calls = []

    def measure(dtype, device="cpu", size=1024, repeats=4):
        calls.append(dtype)
        ramp = (len(calls) / 8) ** 2  # from busy to free over the probe's 8 measurements
        return (376 if dtype == torch.float32 else 186) * ramp

    monkeypatch.setattr(devices, "measure_matmul_gflops", measure)
    devices._measured_once.cache_clear()
    devices._probe_in_turn.cache_clear()
    try:
        placement = devices.choose_placement()
    finally:
        devices._measured_once.cache_clear()
        devices._probe_in_turn.cache_clear()
    assert calls[:4] == [torch.float32, torch.bfloat16] * 2  # in turn
    assert placement.dtype == torch.float32
