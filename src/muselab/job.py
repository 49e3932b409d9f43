"""One job's life as the service keeps it: the request, where its files go, its progress, its
status and outputs, and the snapshot every front end reads (`Job.snapshot`)."""

from __future__ import annotations

import base64
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from muselab.config import model_label
from muselab.engines.base import CancelToken, ProgressEvent
from muselab.schemas import Request
from muselab.store import OutputRecord


class QueueFull(RuntimeError):
    """The queue holds as many jobs as it may; the client should retry later."""


class OutOfMemory(RuntimeError):
    pass


@dataclass
class SaveOptions:
    """Where a job's files go. Only the CLI sets `output`; remote clients never choose paths."""

    output: Path | None = None
    audio_format: str | None = None
    normalize: bool = False
    # A folder inside the outputs folder, chosen by the service (a batch's), never by a client.
    folder: str | None = None


@dataclass
class Job:
    id: str
    request: Request  # as clients see it: models by label (`model_label`), never by folder
    model: str  # the id or folder the engine loads (a scene's two, joined by " + ")
    source: str
    save: SaveOptions = field(default_factory=SaveOptions)
    # The models the job loads, by kind (the scene's two), as ids or folders.
    models: dict[str, str] = field(default_factory=dict)
    # Each model label the client named in `request`, and the id or folder it stands for.
    sources: dict[str, str] = field(default_factory=dict)
    status: str = "queued"
    created: float = field(default_factory=time.time)
    cancel: CancelToken = field(default_factory=CancelToken)
    progress: ProgressEvent | None = None
    preview_png: bytes | None = None
    error: str | None = None
    error_kind: str | None = None  # model_unavailable, out_of_memory, timeout, internal
    resolved: dict[str, Any] | None = None
    # Outputs saved before the job stopped short (images of a batch, a scene's picture).
    kept: list[dict[str, Any]] = field(default_factory=list)
    outputs: list[OutputRecord] = field(default_factory=list)
    done: threading.Event = field(default_factory=threading.Event)
    version: int = 0
    progress_at: float = field(default_factory=time.monotonic)  # when `progress` last changed
    # The time limit: started once the job's model is loaded (see `JobService._started`).
    time_limit: threading.Timer | None = None
    timed_out: threading.Event = field(default_factory=threading.Event)
    # Where its status is POSTed when it ends (`muselab.webhooks`), checked against the allow-list.
    callback: str | None = None
    # The batch it is an item of (`muselab.batches`): the batch's id and the item's place.
    batch: tuple[str, int] | None = None
    # Where it runs when that is not this process: a Ray replica and its node, and why it moved
    # to another one (`muselab.workers.ray_serve`).
    runs_on: dict[str, str] | None = None

    @property
    def kind(self) -> str:
        return self.request.kind

    @property
    def label(self) -> str:
        """The model as clients see it."""
        return model_label(self.model)

    def snapshot(
        self, position: int | None = None, with_preview: bool = False, redact: Callable[[str], str] = str
    ) -> dict[str, Any]:
        """The job as clients see it; `redact` takes the machine's folders out of error messages."""
        progress = self.progress
        # Times as of now, not as of the last event: a one-time conversion reports a stage every
        # minute or so, and a bar whose seconds stand still for that long looks frozen.
        since = time.monotonic() - self.progress_at
        data: dict[str, Any] = {
            "id": self.id,
            "kind": self.kind,
            "status": self.status,
            "model": self.label,
            "source": self.source,
            "queue_position": position,
            "request": self.resolved or self.request.model_dump(mode="json"),
            "error": None if self.error is None else redact(self.error),
            "error_kind": self.error_kind,
            "progress": None
            if progress is None
            else {
                "stage": progress.stage,
                "step": progress.step,
                "total": progress.total,
                "fraction": round(progress.fraction, 4),
                "elapsed": round(progress.elapsed + since, 3),
                "eta": None if progress.eta is None else round(max(progress.eta - since, 0.0), 3),
                "item": progress.item,
                "items": progress.items,
                "note": progress.note,
            },
            "outputs": [record.public() for record in self.outputs],
            "batch_id": self.batch[0] if self.batch else None,
        }
        if self.runs_on:
            data["runs_on"] = self.runs_on
        if with_preview and self.preview_png:
            data["preview"] = "data:image/png;base64," + base64.b64encode(self.preview_png).decode()
        return data
