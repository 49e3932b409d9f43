"""The job service every front end shares: a bounded queue, a worker per model, progress,
cancellation, time limits, a model manager with LRU unloading, and a persistent history.

A request goes: `submit` -> queued (in memory and in SQLite) -> the model's worker runs it
through the engine -> files saved atomically -> outputs recorded -> `done`.
"""

from __future__ import annotations

import functools
import io
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from contextlib import suppress
from pathlib import Path
from typing import Any

from muselab import media
from muselab.config import Settings, hf_cache_dir, looks_like_path, model_label
from muselab.devices import DeviceError, flush_denormals
from muselab.engines import Cancelled, Engine, ModelUnavailable, ProgressEvent, load_engine
from muselab.families import family, kinds, model_kinds
from muselab.job import Job, OutOfMemory, QueueFull, SaveOptions
from muselab.loras import available as available_loras
from muselab.prompts import expand_one
from muselab.schemas import Request, RequestError, model_fields
from muselab.store import INTERRUPTED, HistoryStore
from muselab.uploads import from_history
from muselab.webhooks import Webhooks, check_url
from muselab.workers import Order, WorkerLost, is_out_of_memory, workers_for

__all__ = ["Job", "JobService", "OutOfMemory", "QueueFull", "SaveOptions"]

log = logging.getLogger("muselab.jobs")


class JobService:
    def __init__(
        self,
        settings: Settings,
        store: HistoryStore | None = None,
        *,
        loader: Callable[..., Engine] = load_engine,
    ):
        self.settings = settings
        self.store = store or HistoryStore.for_settings(settings)
        self.interrupted = self.store.recover_interrupted()
        # Where generation runs: this process (the default) or Ray Serve replicas (`muselab.workers`).
        self.workers = workers_for(settings, loader)
        self.models = getattr(self.workers, "models", None)  # the local workers' model manager
        self._lock = threading.Condition()
        self._jobs: dict[str, Job] = {}
        self._queues: dict[tuple[str, str], deque[Job]] = {}
        self._threads: dict[tuple[str, str], list[threading.Thread]] = {}
        self._running: dict[tuple[str, str], int] = {}
        self._pending = 0
        self._closed = False
        self.webhooks = Webhooks(self.store, settings)

    # ------------------------------------------------------------ submitting and watching

    def submit(
        self,
        request: Request,
        source: str = "api",
        save: SaveOptions | None = None,
        *,
        callback: str | None = None,
        batch: tuple[str, int] | None = None,
    ) -> Job:
        """Queue a request. Clients other than the CLI (this machine's own user) may name only the
        served models, unless the settings allow any (`check_client_models`). A dynamic prompt
        (`{a|b}`, `__wildcard__`) is expanded here, so the job, its history and its recipe hold
        the prompt that ran; `callback` must pass the webhook allow-list (`webhooks.check_url`)."""
        from muselab.store import new_id

        trusted = source == "cli"
        if not trusted:
            self.check_client_models(request)
        if callback is not None:
            callback = check_url(callback, self.settings)
        request = expand_one(request, self.settings)
        request = from_history(request, self.store)
        checked = family(request.kind).check
        if checked is not None:
            try:
                request = checked(request, self.settings)
            except RequestError as exc:
                raise RequestError(str(exc) if trusted else self.redact(str(exc))) from None
        # Every model the request names, by the id or folder it stands for; the request itself
        # names them by label. The models its family loads (a scene's two) also when unnamed.
        models: dict[str, str] = {}
        sources: dict[str, str] = {}
        labels: dict[str, str] = {}
        for name, kind in model_fields(type(request)).items():
            value = getattr(request, name)
            # Unnamed ones too: a folder used here is remembered by its label, so that a recipe,
            # which names it so, re-runs it (`_model_source`).
            stands_for = self._model_source(kind, value, trusted)
            if kind in kinds():
                models[kind] = stands_for
            if value:
                labels[name] = model_label(stands_for)
                sources[labels[name]] = stands_for
        if labels:
            request = request.model_copy(update=labels)
        model = " + ".join(source for kind, source in models.items() if kind in kinds())
        job = Job(
            id=new_id(),
            request=request,
            model=model,
            source=source,
            save=save or SaveOptions(),
            models=models,
            sources=sources,
            callback=callback,
            batch=batch,
        )
        key = (request.kind, model)
        with self._lock:
            if self._closed:
                raise QueueFull("muselab is shutting down")
            if self._pending >= self.settings.max_queue:
                raise QueueFull(
                    f"The queue is full ({self.settings.max_queue} jobs waiting or running); retry in a little while."
                )
            limit = self.workers.limit(*key)
            waiting, running = len(self._queues.get(key, ())), self._running.get(key, 0)
            if limit is not None and waiting + running >= limit:
                raise QueueFull(
                    f"The replicas of {job.label} are busy ({running} running, {waiting} waiting, at most {limit}: "
                    "replicas x MUSELAB_RAY_MAX_ONGOING + MUSELAB_RAY_MAX_QUEUED); retry in a little while."
                )
            self.store.add_job(
                job.id, job.kind, request.model_dump(mode="json"), source, batch=batch, callback=callback
            )
            self._pending += 1
            self._jobs[job.id] = job
            self._queues.setdefault(key, deque()).append(job)
            threads = [thread for thread in self._threads.get(key, []) if thread.is_alive()]
            if len(threads) < min(self.workers.slots(*key), len(self._queues[key]) + self._running.get(key, 0)):
                thread = threading.Thread(target=self._work, args=(key,), name=f"muselab-{key[0]}", daemon=True)
                threads.append(thread)
                thread.start()
            self._threads[key] = threads
            self._lock.notify_all()
        return job

    def _model_source(self, kind: str, name: str | None, trusted: bool = False) -> str:
        """The id or folder a request's model name stands for: a served model's label maps to what
        it labels; for this machine's own user (the CLI), so does the label of a folder used here
        before (a recipe names it so: `--from FILE` re-runs it); anything else is taken as it is."""
        if not name:
            source = self.settings.model_for(kind)
        else:
            source = (
                self.settings.served_models(kind).get(name)
                or (trusted and not looks_like_path(name) and self.store.model_folder(name))
                or name
            )
        if looks_like_path(source) or Path(source).expanduser().is_dir():
            self.store.remember_model_folder(model_label(source), str(Path(source).expanduser().resolve()))
        return source

    def check_client_models(self, request: Request) -> None:
        """Refuse a model a client may not name (see `Settings.allow_any_model`) before anything
        touches the file system, so a client cannot learn which folders exist."""
        if self.settings.allow_any_model:
            return
        problems = []
        for name, kind in model_fields(type(request)).items():
            value = getattr(request, name)
            served = self.settings.served_models(kind)
            if value and value not in served:
                problems.append(
                    f"  - {name}: must be one of the models this server offers: {', '.join(served)} (got {value!r}); "
                    "other hub ids and folders only where the server allows them (MUSELAB_ALLOW_ANY_MODEL=1)"
                )
        if problems:
            raise RequestError("Invalid request:\n" + "\n".join(problems))

    def redact(self, text: str) -> str:
        """`text` without this machine's folders (they name its user), and the configured models by
        their labels: error messages reach clients."""
        for folder, name in self._private_folders:
            text = text.replace(folder, name)
        return text

    @functools.cached_property
    def _private_folders(self) -> list[tuple[str, str]]:
        """What `redact` replaces, longest first; the settings do not change, so worked out once."""
        folders = {
            str(self.settings.outputs): "<outputs>",
            str(self.settings.loras): "<LoRA folder>",
            str(self.settings.data_dir): "<data folder>",
            str(self.settings.cache_dir): "<cache folder>",
            str(hf_cache_dir()): "<Hugging Face cache>",
            str(Path.home()): "~",
        }
        for kind in model_kinds():
            folders.update({source: label for label, source in self.settings.served_models(kind).items()})
        for folder in list(folders):
            with suppress(OSError):
                folders.setdefault(str(Path(folder).resolve()), folders[folder])
        return [(folder, folders[folder]) for folder in sorted(folders, key=len, reverse=True) if len(folder) > 1]

    def info(self) -> dict[str, Any]:
        """The models by kind (labels), the loaded ones, the preset, where and how they run (no
        folders, no versions) and how far their preparation is: the API's /api/info, the studio's
        front page."""
        from muselab.engines import describe_runtime

        return {
            "models": {kind: model_label(self.settings.model_for(kind)) for kind in kinds() if family(kind).load},
            "loaded": self.workers.loaded(),
            "preset": self.settings.preset,
            "runtime": describe_runtime(self.settings, public=True),
            "preparing": self.preparation(),
            "loras": [lora.name for lora in available_loras(self.settings.loras)],
            **({"ray": replicas()} if (replicas := getattr(self.workers, "replica_config", None)) else {}),
        }

    def estimate(self, request: Request, trusted: bool = False) -> dict[str, Any] | None:
        """How long `request` would take on this machine, per speed tier, with where each figure
        comes from (this machine's own runs, or its measured speed); None for a kind without tiers.
        Models are named as for `submit` (a client only the served ones, unless `trusted`)."""
        estimate = family(request.kind).estimate
        if estimate is None:
            return None
        if not trusted:
            self.check_client_models(request)
        sources = {
            name: self._model_source(kind, value, trusted)
            for name, kind in model_fields(type(request)).items()
            if (value := getattr(request, name))
        }
        request = request.model_copy(update=sources)
        return estimate(request, self.settings, self.store.run_times(request.kind))

    def snapshot(self, job: Job, with_preview: bool = False) -> dict[str, Any]:
        return job.snapshot(self.position(job), with_preview, self.redact)

    def job(self, job_id: str) -> Job | None:
        with self._lock:
            return self._jobs.get(job_id)

    def status(self, job_id: str, with_preview: bool = False) -> dict[str, Any] | None:
        """The job as clients see it: live while it is known in memory, else from history."""
        job = self.job(job_id)
        if job is not None:
            return self.snapshot(job, with_preview)
        stored = self.store.get_job(job_id)
        if stored is None:
            return None
        return {
            "id": stored["id"],
            "kind": stored["kind"],
            "status": stored["status"],
            "model": stored["model"],
            "source": stored["source"],
            "queue_position": None,
            "request": stored["request"],
            "error": None if stored["error"] is None else self.redact(stored["error"]),
            "error_kind": None,
            "progress": None,
            "outputs": stored["outputs"],
            "batch_id": stored.get("batch_id"),
        }

    def recent(self, status: str | None = None, limit: int = 50, offset: int = 0) -> list[dict[str, Any]]:
        """Jobs from history, newest first, as clients may see them (errors redacted, no process ids)."""
        rows = self.store.list_jobs(status, limit, offset)
        return [
            {**{k: v for k, v in row.items() if k != "pid"}, "error": row["error"] and self.redact(row["error"])}
            for row in rows
        ]

    def position(self, job: Job) -> int | None:
        """1 for the next job to run on its model, 0 when running or loading its model, None when
        finished."""
        with self._lock:
            if job.status == "running":
                return 0
            if job.status != "queued":
                return None
            queue = self._queues.get((job.kind, job.model), deque())
            # Out of the queue but still "queued": a worker took it and is loading (or converting)
            # its model, which can take a while; it is first, not lost.
            return next((i + 1 for i, queued in enumerate(queue) if queued is job), 0)

    def wait_for_change(self, job: Job, seen_version: int, timeout: float) -> int:
        """Block until the job changes (progress, status) or `timeout` passes; returns its version."""
        deadline = time.monotonic() + timeout
        with self._lock:
            while job.version == seen_version and not job.done.is_set():
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                self._lock.wait(remaining)
            return job.version

    def wait(self, job_id: str, timeout: float | None = None) -> dict[str, Any] | None:
        job = self.job(job_id)
        if job is not None:
            job.done.wait(timeout)
        return self.status(job_id)

    def cancel(self, job_id: str) -> bool:
        """Cancel a queued job (it never runs) or a running one (it stops within one step)."""
        job = self.job(job_id)
        if job is None or job.done.is_set():
            return False
        job.cancel.cancel()
        with self._lock:
            queue = self._queues.get((job.kind, job.model))
            if job.status == "queued" and queue is not None and job in queue:
                queue.remove(job)
                self._finish_unstarted(job)
        return True

    def active(self) -> list[dict[str, Any]]:
        with self._lock:
            jobs = [job for job in self._jobs.values() if not job.done.is_set()]
        return [self.snapshot(job) for job in jobs]

    def prepare(self, kinds: tuple[str, ...] = ("image", "music")) -> None:
        """Load the configured models in the background (`ModelManager.prepare`); stopping the
        service stops it between stages."""
        self.workers.prepare(kinds, stopped=lambda: self._closed, redact=self.redact)

    def preparation(self) -> dict[str, dict[str, Any]]:
        return self.workers.preparation()

    def cluster(self) -> dict[str, Any]:
        """Where jobs run (`Workers.status`), with each model's jobs running and waiting here and
        its recent throughput: `GET /api/cluster`, `muselab cluster status`."""
        status = self.workers.status()
        with self._lock:
            keys = set(self._queues) | {key for key, count in self._running.items() if count}
            queues = {key: (self._running.get(key, 0), len(self._queues.get(key, ()))) for key in keys}
        finished = self.store.throughput(600)
        status["queues"] = [
            {
                "kind": kind,
                "model": model_label(model),
                "running": running,
                "waiting": waiting,
            }
            for (kind, model), (running, waiting) in sorted(queues.items())
            if running or waiting
        ]
        status["recent"] = finished
        return self._redact_tree(status)

    def _redact_tree(self, value: Any) -> Any:
        if isinstance(value, str):
            return self.redact(value)
        if isinstance(value, dict):
            return {key: self._redact_tree(item) for key, item in value.items()}
        if isinstance(value, list):
            return [self._redact_tree(item) for item in value]
        return value

    @property
    def closed(self) -> bool:
        """Shutting down: no new jobs; a batch stops between items and is resumed at the next start."""
        return self._closed

    def stop_accepting(self) -> None:
        """The first half of `shutdown`, which returns at once: no new jobs, and every queued or
        running one stops (within a step) and is recorded as interrupted, with what it finished."""
        with self._lock:
            self._closed = True
            jobs = list(self._jobs.values())
            self._lock.notify_all()
        for job in jobs:
            self.cancel(job.id)

    def shutdown(self, timeout: float = 30) -> None:
        """Stop every job (see `stop_accepting`) and wait up to `timeout` seconds for the workers."""
        self.stop_accepting()
        deadline = time.monotonic() + timeout
        for threads in list(self._threads.values()):
            for thread in threads:
                thread.join(max(0.0, deadline - time.monotonic()))
        self.webhooks.close(max(0.0, min(5.0, deadline - time.monotonic())))
        self.workers.close()

    # ------------------------------------------------------------ running

    def _work(self, key: tuple[str, str]) -> None:
        flush_denormals()  # before this thread's first tensor operation (see `flush_denormals`)
        while True:
            with self._lock:
                queue = self._queues.get(key)
                if not queue:
                    threads = self._threads.get(key, [])
                    if threading.current_thread() in threads:
                        threads.remove(threading.current_thread())
                    return
                job = queue.popleft()
                self._running[key] = self._running.get(key, 0) + 1
            try:
                self._run(job)
            finally:
                with self._lock:
                    self._running[key] -= 1

    def _run(self, job: Job) -> None:
        if job.cancel.cancelled:
            self._finish_unstarted(job)
            return
        started = time.perf_counter()

        def on_progress(event: ProgressEvent) -> None:
            preview = None
            if event.preview is not None:
                buffer = io.BytesIO()
                event.preview.save(buffer, format="PNG")
                preview = buffer.getvalue()
            self._update(job, progress=event, preview_png=preview)

        on_progress.previews = True  # type: ignore[attr-defined]  # clients show them (`wants_previews`)

        try:
            result = self.workers.run(self._order(job), on_progress, job.cancel, functools.partial(self._started, job))
            self._finish(job, "succeeded", outputs=self._save(job, result), started=started)
        except Exception as exc:
            self._keep_partial(job, exc)
            self._failed(job, exc, started)

    def _keep_partial(self, job: Job, exc: Exception) -> None:
        """Save what the engine finished before it stopped (images of a batch, a scene's picture)."""
        partial = getattr(exc, "partial", None)
        if partial is not None:
            try:
                job.kept = self._save(job, partial)
            except Exception:  # the job still ends with what stopped it, not this
                log.exception("job %s: its finished outputs could not be kept", job.id)

    def _failed(self, job: Job, exc: Exception, started: float) -> None:
        if isinstance(exc, Cancelled):  # while loading (a one-time conversion stops between its stages), or generating
            self._stopped(job, job.kept, started)
            return
        if isinstance(exc, (ModelUnavailable, DeviceError)):
            job.error_kind, message = "model_unavailable", str(exc)
        elif isinstance(exc, WorkerLost):
            job.error_kind, message = "worker_lost", str(exc)
        elif isinstance(exc, RequestError):  # found only once the model is at hand (a LoRA that does not fit it)
            job.error_kind, message = "bad_request", self.redact(str(exc))
        elif is_out_of_memory(exc):
            self.workers.free_memory()
            job.error_kind = "out_of_memory"
            message = (
                "Out of memory. Memory was freed and the service keeps running; try a smaller size, "
                "fewer images or clips, a shorter duration, or a smaller model."
            )
        else:
            log.error("job %s failed", job.id, exc_info=exc)
            job.error_kind, message = "internal", f"{type(exc).__name__}: {exc}"
        self._finish(job, "failed", error=message, outputs=job.kept, started=started)

    def _finish_unstarted(self, job: Job) -> None:
        """A job stopped before it ran: interrupted by a shutdown, else cancelled by its user."""
        if self._closed:
            self._finish(job, "interrupted", error=INTERRUPTED)
        else:
            self._finish(job, "cancelled", error="cancelled before it started")

    def _started(self, job: Job, request: Request, placement: dict[str, str] | None) -> None:
        """The engine resolved the request (placement None); then the model is loaded and the job
        runs, and its time limit starts. Loading is not counted: a one-time conversion (minutes for
        a real model) stopped by a job's limit would never finish, and every later job would start
        it again. A job retried on another replica keeps the limit it started with."""
        job.resolved = request.model_dump(mode="json")
        if placement is None:
            return
        self.store.mark_running(job.id, job.label, placement["device"], placement["dtype"])
        if set(placement) - {"device", "dtype"}:
            job.runs_on = placement
        if job.time_limit is None:
            # A timer, not a check between steps: on OpenVINO the cancel stops even a step in progress.
            job.time_limit = threading.Timer(self.settings.job_timeout, self._expire, (job,))
            job.time_limit.daemon = True
            job.time_limit.start()
        self._update(job, status="running", progress=None)  # loading progress ends here

    @staticmethod
    def _expire(job: Job) -> None:
        job.timed_out.set()
        job.cancel.cancel()

    @staticmethod
    def _with_sources(job: Job) -> Request:
        """The request naming the id or folder of each model it loads, where it names them by label or
        not at all (the engine names them by label again when it resolves the request)."""
        request = job.request
        updates = {}
        for name, kind in model_fields(type(request)).items():
            value = getattr(request, name)
            if value in job.sources:
                updates[name] = job.sources[value]
            elif not value and kind in job.models:
                updates[name] = job.models[kind]
        return request.model_copy(update=updates) if updates else request

    def _order(self, job: Job) -> Order:
        return Order(job.id, job.kind, job.model, self._with_sources(job), dict(job.models))

    def _stopped(self, job: Job, kept: list[dict[str, Any]], started: float) -> None:
        if job.timed_out.is_set():
            job.error_kind = "timeout"
            message = (
                f"time limit of {self.settings.job_timeout:g} s reached before the job finished; ask for less "
                "(fewer steps or images, a smaller size, a shorter clip) or raise the limit "
                "(MUSELAB_JOB_TIMEOUT=SECONDS, or --job-timeout on muselab serve)"
            )
            self._finish(job, "failed", error=message, outputs=kept, started=started)
        elif self._closed:
            self._finish(job, "interrupted", error=INTERRUPTED, outputs=kept, started=started)
        else:
            self._finish(job, "cancelled", error="cancelled", outputs=kept, started=started)

    def _save(self, job: Job, result: Any) -> list[dict[str, Any]]:
        return media.save_outputs(
            result,
            job.save.output,
            self.settings.outputs / job.save.folder if job.save.folder else self.settings.outputs,
            audio_format=job.save.audio_format,
            normalize=job.save.normalize,
        )

    def _update(self, job: Job, **changes: Any) -> None:
        with self._lock:
            for name, value in changes.items():
                if name == "preview_png" and value is None:
                    continue
                setattr(job, name, value)
            if "progress" in changes:
                job.progress_at = time.monotonic()
            job.version += 1
            self._lock.notify_all()

    def _finish(
        self,
        job: Job,
        status: str,
        *,
        error: str | None = None,
        outputs: list[dict[str, Any]] = (),  # type: ignore[assignment]
        started: float | None = None,
    ) -> None:
        if job.time_limit is not None:
            job.time_limit.cancel()
        seconds = time.perf_counter() - started if started is not None else None
        records = self.store.finish_job(
            job.id, status, request=job.resolved, outputs=list(outputs), error=error, seconds=seconds
        )
        with self._lock:
            job.status, job.error, job.outputs = status, error, records
            job.version += 1
            self._pending -= 1
            job.done.set()
            self._lock.notify_all()
            self._forget_old_jobs()
        if job.callback:
            self.webhooks.deliver(job.callback, self.snapshot(job), job_id=job.id)

    def _forget_old_jobs(self, keep: int = 200) -> None:
        """Finished jobs stay in memory for a while (for status and SSE), then live in history only."""
        finished = [job for job in self._jobs.values() if job.done.is_set()]
        for job in finished[: max(0, len(finished) - keep)]:
            del self._jobs[job.id]
