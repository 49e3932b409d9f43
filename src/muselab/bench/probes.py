"""The machine: what it is, its practical ceilings (matmul, memory copy), and its speed right now.

The matmuls are `muselab.devices.matmul_gflops` measured afresh (`now=True`); it is called through
its module, so a test can stand in for every one of them at once.
"""

from __future__ import annotations

import os
import platform
import time
from typing import Any

import torch

from muselab import devices
from muselab.devices import Placement, cpu_has_native_bf16, cpu_name, physical_memory_gib, synchronize

#: The side of the matmul a peak is taken on: big enough for the machine's best.
PEAK_MATMUL_SIZE = 4096


def machine_info() -> dict[str, Any]:
    import diffusers
    import transformers

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {
        "cpu": cpu_name(),
        "cores": os.cpu_count(),
        "gpu": gpu,
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "native_bf16_flag": cpu_has_native_bf16(),
        "ram_gib": round(physical_memory_gib(), 1),
        "python": platform.python_version(),
        "diffusers": diffusers.__version__,
        "transformers": transformers.__version__,
    }


def measure_peaks(placement: Placement) -> dict[str, float]:
    """The practical ceilings: big matmuls in fp32 and bf16 (and fp16 on a GPU), a memory copy."""
    device = placement.device
    peaks = {
        "matmul_gflops_fp32": peak_matmul_gflops(torch.float32, device),
        "matmul_gflops_bf16": peak_matmul_gflops(torch.bfloat16, device),
        "copy_gbps": copy_gbps(device),
    }
    if device == "cuda":
        peaks["matmul_gflops_fp16"] = peak_matmul_gflops(torch.float16, device)
    return peaks


def peak_matmul_gflops(dtype: torch.dtype, device: str, repeats: int = 3) -> float:
    """Best of `repeats` peak-sized matmuls, measured now."""
    return devices.matmul_gflops(dtype, PEAK_MATMUL_SIZE, repeats, device=device, now=True)


def peak_for(peaks: dict[str, float], dtype: torch.dtype) -> float:
    name = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[dtype]
    return peaks[f"matmul_gflops_{name}"]


def speed_index(device: str = "cpu") -> float:
    """The machine's fp32 matmul speed right now (a 2048^3 product, best of 2, about 0.2 s).

    Taken before and after each timed part: parts run one after another, and on a shared machine
    the speed drifts, which moves a ratio between two parts as much as any change would."""
    return devices.matmul_gflops(torch.float32, 2048, 2, device=device, now=True)


def copy_gbps(device: str = "cpu", megabytes: int = 256) -> float:
    """Bytes read plus bytes written per second copying a 256 MB buffer (best of 3)."""
    source = torch.empty(megabytes * 2**20 // 4, device=device)
    target = torch.empty_like(source)
    target.copy_(source)
    best = float("inf")
    for _ in range(3):
        synchronize(device)
        started = time.perf_counter()
        target.copy_(source)
        synchronize(device)
        best = min(best, time.perf_counter() - started)
    return 2 * source.numel() * 4 / best / 1e9
