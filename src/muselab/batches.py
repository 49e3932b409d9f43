"""Batches: many requests run as one (a prompt list, a dynamic prompt's every combination, a
comparison grid), each item a normal job of the job service, with one progress, one cancel, one
outputs folder and one history group.

A batch and its items are rows beside the jobs (`batches`, `batch_items`); each job of an item
names the batch and the item in its own row, written in the same transaction that queues it. So
after any stop, a kill -9 included, the history says exactly which items ended: a restart (the
next `muselab serve` or studio on the same data folder, or `muselab batch --resume ID`) runs the
others, and no item runs twice.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
import threading
import time
from contextlib import suppress
from pathlib import Path
from typing import Any

from muselab import grid as grids
from muselab.families import family
from muselab.job import QueueFull, SaveOptions
from muselab.jobs import JobService
from muselab.media import SOFTWARE, output_name, save_image, slugify
from muselab.prompts import DynamicMode, expand_all
from muselab.schemas import RequestError, parse_request
from muselab.store import new_id, now, process_alive
from muselab.webhooks import check_url

log = logging.getLogger("muselab.batches")

SCHEMA = """
CREATE TABLE IF NOT EXISTS batches (
    id TEXT PRIMARY KEY,
    name TEXT,
    status TEXT NOT NULL,
    source TEXT NOT NULL,
    total INTEGER NOT NULL,
    callback TEXT,
    folder TEXT,
    output TEXT,
    grid TEXT,
    grid_output TEXT,
    pid INTEGER,
    created_at TEXT NOT NULL,
    finished_at TEXT
);
CREATE TABLE IF NOT EXISTS batch_items (
    batch_id TEXT NOT NULL REFERENCES batches(id),
    item INTEGER NOT NULL,
    kind TEXT NOT NULL,
    request TEXT NOT NULL,
    PRIMARY KEY (batch_id, item)
);
"""

#: An item whose latest job ended so is not run again; "interrupted" (a stop) or none is.
ENDED = ("succeeded", "failed", "cancelled")
#: The item of a grid's own picture (its job is in the batch's history group, outside its items).
GRID_ITEM = -1

# Batches this process is running, whichever service runs them: a second service over the same
# history (the studio's and a test's) must not run one again.
_running: set[str] = set()
_running_lock = threading.Lock()


def batches_for(service: JobService) -> BatchService:
    """The batch service of `service` (one each, made when first asked)."""
    with _running_lock:
        found = service.__dict__.get("_batch_service")
        if found is None:
            found = service.__dict__["_batch_service"] = BatchService(service)
    return found


class BatchService:
    def __init__(self, service: JobService):
        self.service = service
        self.store = service.store
        self.store.connection().executescript(SCHEMA)
        self._cancelled: set[str] = set()

    # ------------------------------------------------------------ submitting

    def submit(
        self,
        requests: list[Any],
        *,
        source: str = "api",
        name: str | None = None,
        callback: str | None = None,
        dynamic: DynamicMode = "random",
        save: SaveOptions | None = None,
        grid: dict[str, Any] | None = None,
    ) -> str:
        """Record a batch of `requests` (each expanded first when `dynamic` is combinatorial) and
        start running it; its id. Refused as a whole, before anything is recorded, when a callback
        is not allowed, the items are too many, or an item names a model a client may not."""
        settings = self.service.settings
        if callback is not None:
            callback = check_url(callback, settings)
        limit = settings.max_batch_items
        items = [
            expanded
            for request in requests
            for expanded in (expand_all(request, settings, limit) if dynamic == "combinatorial" else [request])
        ]
        if not items:
            raise RequestError("Invalid request:\n  - items: a batch needs at least one request")
        if len(items) > limit:
            raise RequestError(
                f"Invalid request:\n  - items: at most {limit} jobs a batch (this one makes {len(items)}); "
                "split it, or raise MUSELAB_MAX_BATCH_ITEMS"
            )
        if source != "cli":
            for item in items:
                self.service.check_client_models(item)
        batch_id = new_id()
        title = name or items[0].prompt
        folder = f"batches/{dt.date.today().isoformat()}-{slugify(title, 32)}-{batch_id[:6]}"
        output = save.output if save is not None and save.output is not None else None
        with self.store.transaction() as db:
            db.execute(
                "INSERT INTO batches (id, name, status, source, total, callback, folder, output, grid, pid, "
                "created_at) VALUES (?, ?, 'running', ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    batch_id,
                    (name or "")[:200] or None,
                    source,
                    len(items),
                    callback,
                    folder,
                    None if output is None else str(output),
                    None if grid is None else json.dumps(grid),
                    os.getpid(),
                    now(),
                ),
            )
            db.executemany(
                "INSERT INTO batch_items (batch_id, item, kind, request) VALUES (?, ?, ?, ?)",
                [(batch_id, index, item.kind, item.model_dump_json()) for index, item in enumerate(items)],
            )
        self._start(batch_id)
        return batch_id

    def submit_grid(
        self,
        base: dict[str, Any],
        x: Any,
        y: Any = None,
        *,
        source: str = "api",
        name: str | None = None,
        callback: str | None = None,
        save: SaveOptions | None = None,
    ) -> str:
        """A comparison grid: `base` (a request's fields, with its kind) with the field of `x` (and of
        `y`) set to each of its values; every cell a job, one seed for all of them."""
        kind = base.get("kind", "image")
        try:
            request_type = family(kind).request
        except KeyError:
            raise RequestError(f"Invalid request:\n  - kind: no kind {kind!r}") from None
        x_axis = grids.Axis.parse(x, request_type, "x")
        y_axis = None if y in (None, "") else grids.Axis.parse(y, request_type, "y")
        base = {**base, "kind": kind}
        if "prompt" not in base and x_axis.field != "prompt" and (y_axis is None or y_axis.field != "prompt"):
            raise RequestError("Invalid request:\n  - prompt: a grid needs a prompt (or a prompt axis)")
        cells, seed = grids.cell_requests(base, request_type, x_axis, y_axis)
        spec = {
            "kind": kind,
            "request": {**base, "seed": seed},
            "x": x_axis.public(),
            "y": None if y_axis is None else y_axis.public(),
        }
        return self.submit(
            cells, source=source, name=name or f"grid: {cells[0].prompt}", callback=callback, save=save, grid=spec
        )

    # ------------------------------------------------------------ following and stopping

    def status(self, batch_id: str) -> dict[str, Any] | None:
        """The batch as clients see it: counts, progress with its ETA, the item running now, and each
        item's status and outputs (no local paths)."""
        row = self.store.connection().execute("SELECT * FROM batches WHERE id=?", (batch_id,)).fetchone()
        if row is None:
            return None
        items = self._items(batch_id)
        jobs = self._latest_jobs(batch_id)
        outputs: dict[str, list[dict[str, Any]]] = {}
        for record in reversed(self.store.list_outputs(batch_id=batch_id, limit=1_000_000)):
            outputs.setdefault(record.job_id, []).append(record.public())
        listed, counts, current, seconds = [], dict.fromkeys((*ENDED, "running", "queued", "pending"), 0), None, []
        for item, kind, request in items:
            job = jobs.get(item)
            state = job["status"] if job else "pending"
            state = "pending" if state == "interrupted" else state
            counts[state] = counts.get(state, 0) + 1
            if job and state in ("running", "queued") and current is None:
                current = self.service.status(job["id"])
            if job and state == "succeeded" and job["seconds"]:
                seconds.append(job["seconds"])
            listed.append(
                {
                    "item": item,
                    "kind": kind,
                    # As it ran: a dynamic prompt's pick, once its job has made it.
                    "prompt": job["prompt"] if job and job["prompt"] else request.get("prompt"),
                    "status": state,
                    "job_id": job["id"] if job else None,
                    "error": self.service.redact(job["error"]) if job and job["error"] else None,
                    "outputs": outputs.get(job["id"], []) if job else [],
                }
            )
        ended = sum(counts[state] for state in ENDED)
        total = row["total"]
        elapsed = _seconds_since(row["created_at"], row["finished_at"])
        status = {
            "id": row["id"],
            "name": row["name"],
            "title": row["name"] or (items[0][2].get("prompt") if items else None),
            "status": row["status"],
            "source": row["source"],
            "created_at": row["created_at"],
            "finished_at": row["finished_at"],
            "total": total,
            "done": ended,
            "counts": counts,
            "progress": {
                "fraction": round(ended / total, 4) if total else 1.0,
                "elapsed": round(elapsed, 3),
                "eta": _eta(row["status"], total - ended, seconds, current),
            },
            "current": current,
            "items": listed,
            "folder": row["folder"],
            "callback_url": row["callback"],
            "deliveries": self.service.webhooks.deliveries(batch_id=batch_id) if row["callback"] else [],
            "grid": None,
        }
        if row["grid"]:
            spec = json.loads(row["grid"])
            grid_output = self.store.get_output(row["grid_output"]) if row["grid_output"] else None
            status["grid"] = {**spec, "output": grid_output.public() if grid_output else None}
        return status

    def recent(self, limit: int = 50) -> list[dict[str, Any]]:
        """The latest batches, newest first, without their items: what a list of them shows."""
        rows = (
            self.store.connection()
            .execute(
                "SELECT b.*, (SELECT json_extract(request, '$.prompt') FROM batch_items "
                "WHERE batch_id=b.id ORDER BY item LIMIT 1) AS first_prompt "
                "FROM batches b ORDER BY created_at DESC LIMIT ?",
                (limit,),
            )
            .fetchall()
        )
        found = []
        for row in rows:
            states = [job["status"] for job in self._latest_jobs(row["id"]).values()]
            done = sum(state in ENDED for state in states)
            found.append(
                {
                    "id": row["id"],
                    "name": row["name"],
                    "title": row["name"] or row["first_prompt"],
                    "status": row["status"],
                    "source": row["source"],
                    "created_at": row["created_at"],
                    "finished_at": row["finished_at"],
                    "total": row["total"],
                    "done": done,
                    "counts": {state: states.count(state) for state in ENDED},
                    "grid": json.loads(row["grid"]) if row["grid"] else None,
                }
            )
        return found

    def cancel(self, batch_id: str) -> bool:
        """Stop a batch: its running item stops within a step, the others never start. False when it
        had already ended."""
        row = self.store.connection().execute("SELECT status FROM batches WHERE id=?", (batch_id,)).fetchone()
        if row is None or row["status"] != "running":
            return False
        self._cancelled.add(batch_id)
        for job in self._latest_jobs(batch_id).values():
            if job["status"] in ("queued", "running"):
                self.service.cancel(job["id"])
        with _running_lock:
            running_here = batch_id in _running
        if not running_here:  # left running by a process that is gone: nothing to stop but the record
            self._finish(batch_id, "cancelled")
        return True

    def folder(self, batch_id: str) -> Path:
        """Where the batch's files are on this machine (for its own user, the CLI; never clients)."""
        row = self.store.connection().execute("SELECT output, folder FROM batches WHERE id=?", (batch_id,)).fetchone()
        return Path(row["output"]) if row["output"] else self.service.settings.outputs / row["folder"]

    def wait(self, batch_id: str, timeout: float | None = None) -> dict[str, Any] | None:
        deadline = None if timeout is None else time.monotonic() + timeout
        while deadline is None or time.monotonic() < deadline:
            with _running_lock:
                if batch_id not in _running:
                    break
            time.sleep(0.1)
        return self.status(batch_id)

    # ------------------------------------------------------------ resuming

    def unfinished(self) -> list[str]:
        """Batches a process that is gone left running (what `resume()` with no id would take)."""
        rows = self.store.connection().execute("SELECT id, pid FROM batches WHERE status='running'").fetchall()
        with _running_lock:
            return [row["id"] for row in rows if row["id"] not in _running and not process_alive(row["pid"])]

    def resume(self, batch_id: str | None = None) -> list[str]:
        """Run what is left of `batch_id` (any batch not running elsewhere, a cancelled one too), or
        with no id, of every batch a stopped process left running; the ids it resumed."""
        if batch_id is not None:
            rows = self.store.connection().execute("SELECT id, pid, status FROM batches WHERE id=?", (batch_id,))
        else:
            rows = self.store.connection().execute("SELECT id, pid, status FROM batches WHERE status='running'")
        resumed = []
        for row in rows.fetchall():
            if process_alive(row["pid"]):
                continue  # a live process (a server beside this CLI) runs it
            with self.store.transaction() as db:
                claimed = db.execute(
                    "UPDATE batches SET pid=?, status='running', finished_at=NULL WHERE id=? AND pid IS ?",
                    (os.getpid(), row["id"], row["pid"]),
                ).rowcount
            if claimed and self._start(row["id"], rerun_cancelled=batch_id is not None):
                resumed.append(row["id"])
        return resumed

    # ------------------------------------------------------------ running

    def _start(self, batch_id: str, rerun_cancelled: bool = False) -> bool:
        with _running_lock:
            if batch_id in _running:
                return False
            _running.add(batch_id)
        self._cancelled.discard(batch_id)
        thread = threading.Thread(
            target=self._run, args=(batch_id, rerun_cancelled), name=f"muselab-batch-{batch_id[:6]}", daemon=True
        )
        thread.start()
        return True

    def _run(self, batch_id: str, rerun_cancelled: bool) -> None:
        try:
            self._run_items(batch_id, rerun_cancelled)
        except Exception:  # a broken record, say: the batch ends as failed rather than running forever
            log.exception("batch %s stopped", batch_id)
            with suppress(Exception):
                self._finish(batch_id, "failed")
        finally:
            with _running_lock:
                _running.discard(batch_id)

    def _run_items(self, batch_id: str, rerun_cancelled: bool) -> None:
        row = self.store.connection().execute("SELECT * FROM batches WHERE id=?", (batch_id,)).fetchone()
        save = SaveOptions(output=Path(row["output"]) if row["output"] else None, folder=row["folder"])
        done_states = ("succeeded", "failed") if rerun_cancelled else ENDED
        for item, kind, data in self._items(batch_id):
            if batch_id in self._cancelled or self.service.closed:
                break
            latest = self._latest_jobs(batch_id).get(item)
            if latest is not None and latest["status"] in done_states:
                continue
            request = parse_request(family(kind).request, data)
            job = self._submit_item(batch_id, item, request, row, save)
            if job is not None:
                job.done.wait()
        if self.service.closed and batch_id not in self._cancelled:
            return  # stopped with the service: the next start resumes it
        self._finish(batch_id, "cancelled" if batch_id in self._cancelled else None)

    def _submit_item(self, batch_id: str, item: int, request: Any, row: Any, save: SaveOptions) -> Any:
        """The item's job, queued when the queue has room; an item the service refuses is recorded as
        a failed job of its own, so that the batch goes on and its status says why."""
        while True:
            if batch_id in self._cancelled or self.service.closed:
                return None
            try:
                job = self.service.submit(
                    request, source=row["source"], save=save, callback=row["callback"], batch=(batch_id, item)
                )
                if batch_id in self._cancelled:  # cancelled while this item was being queued
                    self.service.cancel(job.id)
                return job
            except QueueFull:
                time.sleep(0.5)
            except RequestError as exc:
                job_id = new_id()
                self.store.add_job(
                    job_id, request.kind, request.model_dump(mode="json"), row["source"], batch=(batch_id, item)
                )
                self.store.finish_job(job_id, "failed", error=self.service.redact(str(exc)))
                return None

    def _finish(self, batch_id: str, status: str | None) -> None:
        jobs = self._latest_jobs(batch_id)
        if status is None:
            states = [job["status"] for job in jobs.values()]
            status = "succeeded" if states and all(state == "succeeded" for state in states) else "failed"
        row = self.store.connection().execute("SELECT * FROM batches WHERE id=?", (batch_id,)).fetchone()
        grid_output = None
        if row["grid"] and status != "cancelled":
            try:
                grid_output = self._save_grid(batch_id, json.loads(row["grid"]), row, jobs)
            except Exception:  # the cells are kept whatever happens to their picture
                log.exception("batch %s: the grid picture could not be made", batch_id)
        with self.store.transaction() as db:
            db.execute(
                "UPDATE batches SET status=?, finished_at=?, grid_output=COALESCE(?, grid_output) WHERE id=?",
                (status, now(), grid_output, batch_id),
            )
        if row["callback"]:
            payload = self.status(batch_id) or {}
            self.service.webhooks.deliver(row["callback"], payload, batch_id=batch_id)

    def _save_grid(self, batch_id: str, spec: dict[str, Any], row: Any, jobs: dict[int, dict[str, Any]]) -> str | None:
        """The grid picture of an image grid, recorded in the batch's history group with a recipe
        that names the grid (`muselab grid --from FILE` makes it again)."""
        if family(spec["kind"]).output != "image":
            return None
        from PIL import Image

        cells, first_recipe = [], None
        for item, _, _ in self._items(batch_id):
            job = jobs.get(item)
            first = None
            if job is not None and job["status"] == "succeeded":
                found = self.store.list_outputs(job_id=job["id"], limit=1)
                if found and found[0].path.suffix == ".png":
                    first = found[0]
            if first is None:
                cells.append(None)
                continue
            first_recipe = first_recipe or first.recipe
            with Image.open(first.path) as image:
                cells.append(image.convert("RGB"))
        if first_recipe is None:
            return None  # no cell made a picture: nothing to lay out
        x = grids.Axis(spec["x"]["field"], tuple(spec["x"]["values"]))
        y = grids.Axis(spec["y"]["field"], tuple(spec["y"]["values"])) if spec.get("y") else None
        picture = grids.draw(cells, x, y)
        # As A1111 does, the picture's parameters are its first cell's; the grid itself is in "grid".
        request = first_recipe["request"]
        recipe = {**first_recipe, "software": SOFTWARE, "grid": spec}
        path = save_image(
            picture, recipe, self.folder(batch_id) / output_name(f"grid {request['prompt']}", request["seed"], "png")
        )
        job_id = new_id()
        self.store.add_job(job_id, spec["kind"], request, row["source"], batch=(batch_id, GRID_ITEM))
        described = {"path": path, "kind": spec["kind"], "prompt": request["prompt"], "seed": request["seed"]}
        records = self.store.finish_job(
            job_id, "succeeded", request=request, outputs=[{**described, "recipe": recipe}], seconds=0.0
        )
        return records[0].id

    # ------------------------------------------------------------ reading the records

    def _items(self, batch_id: str) -> list[tuple[int, str, dict[str, Any]]]:
        rows = (
            self.store.connection()
            .execute("SELECT item, kind, request FROM batch_items WHERE batch_id=? ORDER BY item", (batch_id,))
            .fetchall()
        )
        return [(row["item"], row["kind"], json.loads(row["request"])) for row in rows]

    def _latest_jobs(self, batch_id: str) -> dict[int, dict[str, Any]]:
        """Each item's latest job (an item interrupted by a stop has a second one once resumed)."""
        rows = (
            self.store.connection()
            .execute(
                "SELECT id, batch_item, status, error, seconds, json_extract(request, '$.prompt') AS prompt "
                "FROM jobs WHERE batch_id=? AND batch_item>=0 "
                "ORDER BY created_at, rowid",
                (batch_id,),
            )
            .fetchall()
        )
        return {row["batch_item"]: dict(row) for row in rows}


def _eta(status: str, remaining: int, seconds: list[float], current: dict[str, Any] | None) -> float | None:
    """The seconds left: the item running now by its own ETA, each one after it at the mean of
    those that ended here (unknown until one has, unless the running one can tell)."""
    if status != "running" or remaining <= 0:
        return 0.0 if status != "running" else None
    progress = (current or {}).get("progress") or {}
    current_eta = progress.get("eta")
    per_item = sum(seconds) / len(seconds) if seconds else None
    if per_item is None and current_eta is not None and progress.get("elapsed") is not None:
        per_item = progress["elapsed"] + current_eta
    if per_item is None:
        return None
    later = remaining - (1 if current is not None else 0)
    return round((current_eta if current_eta is not None else 0.0) + later * per_item, 1)


def _seconds_since(start: str, end: str | None) -> float:
    began = dt.datetime.fromisoformat(start)
    ended = dt.datetime.fromisoformat(end) if end else dt.datetime.now(dt.UTC)
    return max(0.0, (ended - began).total_seconds())
