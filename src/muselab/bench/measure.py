"""What one configuration takes: its peak memory, its CPU time, its step times, and speed-ups that
the machine's drift between configurations cannot move."""

from __future__ import annotations

import gc
import resource
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

from muselab.engines.base import ProgressEvent


class PeakMemory:
    """Peak resident memory of one part: the kernel's high-water mark (VmHWM), reset at the start
    (Linux); on a GPU, torch's peak allocation. Only a part's own models and work are counted, as
    the previous part's are freed before it starts."""

    def __init__(self, device: str):
        self.device = device
        gc.collect()
        try:
            Path("/proc/self/clear_refs").write_text("5")
            self.reset = True
        except OSError:
            self.reset = False
        if device == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()

    def gib(self) -> float:
        if self.device == "cuda":
            return torch.cuda.max_memory_allocated() / 2**30
        try:
            for line in Path("/proc/self/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 2**20
        except OSError:
            pass
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


class StepTimes:
    """Times of the denoising steps of one generation, from its progress events or callbacks."""

    def __init__(self, stop_after: int | None = None, synchronize_gpu: bool = True):
        self.start = time.perf_counter()
        self.marks: list[float] = []
        self.stop_after = stop_after
        #: False where the timed code keeps the GPU within a step of its progress events itself
        #: (MusicGen's sampler): a full sync per token would undo its overlap of Python and GPU.
        self.synchronize_gpu = synchronize_gpu

    def on_progress(self, event: ProgressEvent) -> None:
        if event.stage == "generating":
            self.mark()

    def mark(self) -> None:
        if self.synchronize_gpu and torch.cuda.is_available():  # the GPU's work, not Python's queueing
            torch.cuda.synchronize()
        self.marks.append(time.perf_counter())
        if self.stop_after is not None and len(self.marks) >= self.stop_after:
            raise EnoughSteps()

    def step_seconds(self) -> float:
        """Median step, leaving out the first (it carries text encoding and set-up)."""
        intervals = [b - a for a, b in zip([self.start, *self.marks[:-1]], self.marks, strict=True)]
        return statistics.median(intervals[1:] or intervals)


class EnoughSteps(Exception):
    """Stops a baseline run once enough steps were timed (quick mode)."""


def alternated_speedups(reference: Callable[[], float], ours: Callable[[], float], rounds: int) -> list[float]:
    """`ours` against `reference`, timed in turn in one process (reference, ours, reference, ours,
    reference): each speed-up divides the mean of the two reference times around one of ours, so
    the machine's drift between configurations cancels to first order."""
    previous = reference()
    speedups = []
    for _ in range(rounds):
        mine, after = ours(), reference()
        speedups.append((previous + after) / 2 / mine)
        previous = after
    return speedups


class ProbedSteps:
    """Steps timed with a matmul probe after each (and one before the first): each step's share of
    the peak is taken against the mean of the probes on either side of it, the machine's speed
    while it ran."""

    def __init__(self, probe: Callable[[], float], flop: float):
        self.probe, self.flop = probe, flop
        self.speed = probe()
        self.shares: dict[str, list[float]] = {}

    def timed(self, name: str, step: Callable[[], float]) -> Callable[[], float]:
        """`step` (returning its seconds), its shares of the peak recorded under `name`."""
        shares = self.shares.setdefault(name, [])

        def run() -> float:
            seconds = step()
            after = self.probe()
            shares.append(self.flop / seconds / 1e9 / ((self.speed + after) / 2))
            self.speed = after
            return seconds

        return run
