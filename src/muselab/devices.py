"""Which device and dtype to run on, and why.

On CPUs the right dtype depends on the exact chip: with native bf16
(avx512_bf16 or AMX) bf16 is about twice as fast as fp32, while on AVX2-only
chips PyTorch emulates it and it is about 100x *slower*. So bf16 is chosen only
when the CPU advertises it natively.
"""

from __future__ import annotations

import functools
import platform
from dataclasses import dataclass
from pathlib import Path

import torch

from muselab.config import DeviceChoice, DtypeChoice

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_NATIVE_BF16_FLAGS = ("avx512_bf16", "amx_bf16")


@dataclass(frozen=True)
class Placement:
    device: str
    dtype: torch.dtype
    reason: str

    @property
    def dtype_name(self) -> str:
        return str(self.dtype).removeprefix("torch.")


@functools.cache
def cpu_flags() -> frozenset[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return frozenset()
    for line in text.splitlines():
        if line.startswith("flags"):
            return frozenset(line.split(":", 1)[1].split())
    return frozenset()


def cpu_has_native_bf16() -> bool:
    return any(flag in cpu_flags() for flag in _NATIVE_BF16_FLAGS)


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def choose_placement(device: DeviceChoice = "auto", dtype: DtypeChoice = "auto") -> Placement:
    """Pick a device and dtype; explicit choices win, `auto` picks the fastest safe one."""
    if device == "auto":
        if torch.cuda.is_available():
            device, why = "cuda", f"CUDA GPU found ({torch.cuda.get_device_name(0)})"
        elif getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            device, why = "mps", "Apple GPU (MPS) found"
        else:
            device, why = "cpu", "no GPU found"
    else:
        why = f"--device {device} was asked for"
        if device == "cuda" and not torch.cuda.is_available():
            raise DeviceError("CUDA was asked for but no CUDA GPU is visible to PyTorch; use --device cpu.")
        if device == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
            raise DeviceError("MPS was asked for but is not available here; use --device cpu.")

    if dtype != "auto":
        return Placement(device, _DTYPES[dtype], f"{why}; --dtype {dtype} was asked for")
    if device in ("cuda", "mps"):
        return Placement(device, torch.float16, f"{why}; float16 is the fast dtype on GPUs")
    if cpu_has_native_bf16():
        return Placement(device, torch.bfloat16, f"{why}; the CPU has native bf16 ({_bf16_flag()})")
    capability = torch.backends.cpu.get_cpu_capability()
    return Placement(
        device,
        torch.float32,
        f"{why}; the CPU ({capability}) has no native bf16, where bf16 runs far slower than float32",
    )


def _bf16_flag() -> str:
    return next(flag for flag in _NATIVE_BF16_FLAGS if flag in cpu_flags())


class DeviceError(RuntimeError):
    """The device the user asked for cannot be used."""
