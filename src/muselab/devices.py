"""Which device and dtype to run on, and why.

On CPUs the right dtype depends on the exact chip, and the flags alone do not tell:
- AVX2-only chips emulate bf16, about 100x *slower* than fp32;
- some chips with avx512_bf16 (2-core AMD EPYC here) run bf16 matmuls twice as fast as fp32;
- others with the same flag (2-core Intel Xeon here, AMX not exposed) run them at *half* fp32's
  speed, because their fp32 units are that much wider.
So bf16 is considered only when the CPU advertises it natively, and then a short matmul probe
(a few milliseconds) decides between the two.
"""

from __future__ import annotations

import functools
import os
import platform
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from muselab.config import DeviceChoice, DtypeChoice


def flush_denormals() -> bool:
    """Make this thread treat floats below 1.2e-38 as zero (x86's FTZ and DAZ; False where the CPU
    cannot). Left on, arithmetic on such "denormal" numbers takes a slow path in the CPU: a matmul
    whose input held them ran 200x slower here (11.3 s against 57 ms), and trained weights and
    sharp softmaxes do produce them (random weights rarely do, so the benchmark cannot show it).

    The setting is per thread, and a thread's OpenMP helpers copy it when they start, at its first
    parallel operation: so it is called first thing in the threads that run models (the job
    service's workers, the benchmark's parts), not on import, where it would change the numbers of
    whatever else runs in the importing thread (Hypothesis, for one, refuses to run under it)."""
    return torch.set_flush_denormal(True)


_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_NATIVE_BF16_FLAGS = ("avx512_bf16", "amx_bf16")


@dataclass(frozen=True)
class Placement:
    device: str
    dtype: torch.dtype
    reason: str
    #: "int8" when linear layers hold int8 weights (`muselab.quantize`, or NNCF on OpenVINO).
    quantize: str = "none"
    #: "openvino" when OpenVINO runs the heavy part (`engines/image/openvino.py`, `engines/music/openvino.py`).
    backend: str = "torch"

    @property
    def dtype_name(self) -> str:
        """The number format as recorded with every output: "float32", "float32+int8", or
        "float32 (openvino)" when OpenVINO computes it."""
        name = str(self.dtype).removeprefix("torch.")
        if self.quantize != "none":
            name = f"{name}+{self.quantize}"
        return name if self.backend == "torch" else f"{name} ({self.backend})"


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
    if not cpu_has_native_bf16():
        capability = torch.backends.cpu.get_cpu_capability()
        return Placement(
            device,
            torch.float32,
            f"{why}; the CPU ({capability}) has no native bf16, where bf16 runs far slower than float32",
        )
    fp32, bf16 = matmul_gflops(torch.float32), matmul_gflops(torch.bfloat16)
    measured = f"a matmul probe ran float32 at {fp32:.0f} and bfloat16 at {bf16:.0f} GFLOP/s"
    if bf16 > BF16_MARGIN * fp32:
        return Placement(device, torch.bfloat16, f"{why}; the CPU has native bf16 ({_bf16_flag()}) and {measured}")
    return Placement(
        device, torch.float32, f"{why}; the CPU has {_bf16_flag()}, but {measured}, so float32 is faster here"
    )


#: bf16 must beat fp32 by this factor to be chosen: it also costs precision.
BF16_MARGIN = 1.15


def _bf16_flag() -> str:
    return next(flag for flag in _NATIVE_BF16_FLAGS if flag in cpu_flags())


def matmul_gflops(
    dtype: torch.dtype, size: int = 1024, repeats: int = 4, *, device: str = "cpu", now: bool = False
) -> float:
    """The speed of a `size`-square matmul in `dtype` on `device`, in GFLOP/s, best of `repeats`.

    By default the dtype probe: measured once per process (about 50 ms in all). float32 and
    bfloat16 on a CPU are measured in turn, round by round, each keeping its best: a busy moment
    on a shared machine then slows both instead of tipping the choice (it once picked bf16, half
    float32's speed on that chip, during a loaded test run).

    With `now`, measured afresh: the benchmark's peaks, and the machine's speed around each timed
    part, which drifts on a shared machine. A CPU that emulates bf16 (about 100x slower) then gets
    one 1024 matmul at most: a big one would take minutes."""
    if not now:
        return _measured_once(dtype, size, repeats, device)
    if device == "cpu" and dtype == torch.bfloat16 and not cpu_has_native_bf16():
        size, repeats = min(size, 1024), 1
    return measure_matmul_gflops(dtype, device, size, repeats)


@functools.cache
def _measured_once(dtype: torch.dtype, size: int, repeats: int, device: str) -> float:
    if device == "cpu" and dtype in _PROBED:
        return _probe_in_turn(size, repeats)[_PROBED.index(dtype)]
    return measure_matmul_gflops(dtype, device, size, repeats)


_PROBED = (torch.float32, torch.bfloat16)


@functools.cache
def _probe_in_turn(size: int, repeats: int) -> tuple[float, ...]:
    best = [0.0] * len(_PROBED)
    for _ in range(repeats):
        for index, dtype in enumerate(_PROBED):
            best[index] = max(best[index], measure_matmul_gflops(dtype, "cpu", size, repeats=1))
    return tuple(best)


def measure_matmul_gflops(dtype: torch.dtype, device: str = "cpu", size: int = 1024, repeats: int = 4) -> float:
    """Best-of-`repeats` speed of a square matmul in `dtype`, in GFLOP/s, measured now."""
    a = torch.randn(size, size, device=device).to(dtype)
    b = torch.randn(size, size, device=device).to(dtype)
    torch.mm(a, b)  # thread pool start-up and kernel selection
    best = float("inf")
    for _ in range(repeats):
        synchronize(device)
        started = time.perf_counter()
        torch.mm(a, b)
        synchronize(device)
        best = min(best, time.perf_counter() - started)
    return 2 * size**3 / best / 1e9


def physical_memory_gib() -> float:
    """This machine's RAM, or 0 where the platform cannot say."""
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") / 2**30
    except (ValueError, OSError, AttributeError):
        return 0.0


def synchronize(device: str) -> None:
    """Wait for queued GPU work, so a timer reads the work and not its launch."""
    if device == "cuda":
        torch.cuda.synchronize()


class DeviceError(RuntimeError):
    """The device the user asked for cannot be used."""
