"""Where generation runs. The job service (`muselab.jobs`) owns the queue, the history, the files
and every front end; a `Workers` object runs one job's request on a model and reports its progress.

- `local.LocalWorkers` (the default): engines loaded in this process by a `ModelManager`.
- `ray_serve.RayWorkers` (``workers=ray``, ``pip install 'muselab[ray]'``): a Ray Serve deployment
  per model, whose replicas run the same `LocalWorkers` code; results come back here to be saved.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from muselab.config import Settings
from muselab.engines import CancelToken, Engine, ProgressEvent, load_engine
from muselab.engines.base import GenerationResult
from muselab.schemas import Request

ProgressCallback = Callable[[ProgressEvent], None]


@dataclass(frozen=True)
class Order:
    """One job as a worker needs it: its request names each model by the id or folder it loads."""

    job_id: str
    kind: str
    model: str  # the id or folder (a scene's two, joined by " + ")
    request: Request
    models: dict[str, str] = field(default_factory=dict)  # by kind, the models it loads


class Started(Protocol):
    """Told the resolved request once the engine has it (placement None), then where it runs once
    the model is loaded and the job starts (its time limit starts then)."""

    def __call__(self, request: Request, placement: dict[str, str] | None) -> None: ...


class WorkerLost(RuntimeError):
    """The process running the job died (a Ray replica killed, out of memory, its node gone)."""


def is_out_of_memory(exc: BaseException) -> bool:
    """Torch's, Python's or a library's way of saying memory ran out, wherever the job ran."""
    name = type(exc).__name__
    return name in ("OutOfMemoryError", "MemoryError") or "out of memory" in str(exc).lower()


class ClusterUnavailable(RuntimeError):
    """No Ray cluster at the address given; the message says how to start or name one."""


class Workers(Protocol):
    def run(
        self, order: Order, on_progress: ProgressCallback, cancel: CancelToken, started: Started
    ) -> GenerationResult:
        """Run `order` to the end and return what it made. A failure raises; where the engine
        finished some outputs first, the exception carries them as `partial` (a GenerationResult)."""
        ...

    def slots(self, kind: str, model: str) -> int:
        """Jobs for this model that may run at once."""
        ...

    def limit(self, kind: str, model: str) -> int | None:
        """Jobs for this model that may wait or run; more are refused as busy. None: no bound of its own."""
        ...

    def loaded(self) -> list[dict[str, str]]: ...

    def prepare(self, kinds: tuple[str, ...], stopped: Callable[[], bool], redact: Callable[[str], str]) -> None: ...

    def preparation(self) -> dict[str, dict[str, Any]]: ...

    def free_memory(self) -> None: ...

    def status(self) -> dict[str, Any]:
        """Where jobs run: for `GET /api/cluster` and `muselab cluster status`."""
        ...

    def close(self) -> None: ...


def workers_for(settings: Settings, loader: Callable[..., Engine] = load_engine) -> Workers:
    if settings.workers == "ray":
        host = settings.ray_address.rpartition(":")[0]
        if settings.ray_address in ("auto", "local") or host in ("127.0.0.1", "localhost", "[::1]"):
            # Read when Ray is imported: without it, Ray on Linux advertises the machine's
            # routable address even for a head started with --node-ip-address 127.0.0.1.
            os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
        from muselab.workers.ray_serve import RayWorkers

        return RayWorkers(settings)
    from muselab.workers.local import LocalWorkers

    return LocalWorkers(settings, loader)
