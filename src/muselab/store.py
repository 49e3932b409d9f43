"""History: every job and output in SQLite, the files under the data folder, with feedback.

The database (WAL mode, busy timeout) lives at ``<data_dir>/history.sqlite3``; output files
under ``<data_dir>/outputs`` (or the configured output folder). A file is written atomically
*before* its row is committed, so history never points at a missing or half-written file.
"""

from __future__ import annotations

import csv
import datetime as dt
import io
import json
import os
import sqlite3
import threading
import uuid
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    id TEXT PRIMARY KEY,
    kind TEXT NOT NULL,
    status TEXT NOT NULL,
    source TEXT NOT NULL,
    request TEXT NOT NULL,
    model TEXT,
    device TEXT,
    dtype TEXT,
    seed INTEGER,
    error TEXT,
    pid INTEGER,
    created_at TEXT NOT NULL,
    started_at TEXT,
    finished_at TEXT,
    seconds REAL
);
CREATE INDEX IF NOT EXISTS jobs_status ON jobs(status);
CREATE TABLE IF NOT EXISTS outputs (
    id TEXT PRIMARY KEY,
    job_id TEXT NOT NULL REFERENCES jobs(id),
    kind TEXT NOT NULL,
    path TEXT NOT NULL,
    prompt TEXT NOT NULL,
    seed INTEGER NOT NULL,
    flagged INTEGER NOT NULL DEFAULT 0,
    recipe TEXT NOT NULL,
    size_bytes INTEGER NOT NULL,
    created_at TEXT NOT NULL,
    thumb INTEGER,
    stars INTEGER,
    comment TEXT,
    feedback_at TEXT
);
CREATE INDEX IF NOT EXISTS outputs_created ON outputs(created_at);
CREATE INDEX IF NOT EXISTS outputs_job ON outputs(job_id);
CREATE TABLE IF NOT EXISTS model_folders (
    label TEXT PRIMARY KEY,
    path TEXT NOT NULL,
    used_at TEXT NOT NULL
);
"""

#: A job of a batch (`muselab.batches`) names it and its place in it; a job may name a webhook.
JOB_COLUMNS_ADDED = {"batch_id": "TEXT", "batch_item": "INTEGER", "callback": "TEXT"}

ACTIVE = ("queued", "running")
INTERRUPTED = "muselab stopped before this job finished; submit it again to retry"
FINAL = ("succeeded", "failed", "cancelled", "interrupted")


def process_alive(pid: int | None) -> bool:
    if not pid or pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


#: A job's seconds from the start of its generation (its model loaded) to its end, in SQL.
RAN_SECONDS = "(julianday(finished_at) - julianday(started_at)) * 86400"


def now() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="milliseconds")


def new_id() -> str:
    return uuid.uuid4().hex


@dataclass(frozen=True)
class OutputRecord:
    id: str
    job_id: str
    kind: str
    path: Path
    prompt: str
    seed: int
    flagged: bool
    recipe: dict[str, Any]
    size_bytes: int
    created_at: str
    thumb: int | None
    stars: int | None
    comment: str | None
    feedback_at: str | None

    def public(self) -> dict[str, Any]:
        """What clients may see: no local paths."""
        return {
            "id": self.id,
            "job_id": self.job_id,
            "kind": self.kind,
            "filename": self.path.name,
            "prompt": self.prompt,
            "seed": self.seed,
            "flagged": self.flagged,
            "recipe": self.recipe,
            "size_bytes": self.size_bytes,
            "created_at": self.created_at,
            "feedback": {
                "thumb": self.thumb,
                "stars": self.stars,
                "comment": self.comment,
                "at": self.feedback_at,
            },
        }


#: What makes a spreadsheet read a cell as a formula (OWASP's CSV injection list).
FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")


def spreadsheet_safe(value: Any) -> Any:
    """A text cell that would start a formula, with a leading apostrophe (as OWASP recommends), so
    Excel, LibreOffice and Google Sheets show it as the text it is; numbers are left alone."""
    if isinstance(value, str) and value.startswith(FORMULA_STARTS):
        return "'" + value
    return value


class FeedbackError(ValueError):
    pass


@dataclass(frozen=True)
class Deletion:
    """What deleting an output did: its history row always goes; its file only if the history owns it."""

    id: str
    file_deleted: bool
    message: str

    def public(self) -> dict[str, Any]:
        return {"id": self.id, "deleted": True, "file_deleted": self.file_deleted, "message": self.message}


class HistoryStore:
    def __init__(self, database: Path, outputs_dir: Path):
        self.database = Path(database)
        self.outputs_dir = Path(outputs_dir)
        self.database.parent.mkdir(parents=True, exist_ok=True)
        self.outputs_dir.mkdir(parents=True, exist_ok=True)
        self._local = threading.local()
        self.connection().executescript(SCHEMA)
        self._add_columns("jobs", JOB_COLUMNS_ADDED)
        self.connection().execute("CREATE INDEX IF NOT EXISTS jobs_batch ON jobs(batch_id, batch_item)")

    def _add_columns(self, table: str, columns: dict[str, str]) -> None:
        """Columns added since a history was first made, added to an older one when it is opened."""
        have = {row["name"] for row in self.connection().execute(f"PRAGMA table_info({table})")}
        for name, declaration in columns.items():
            if name not in have:
                with suppress(sqlite3.OperationalError):  # another process added it just now
                    self.connection().execute(f"ALTER TABLE {table} ADD COLUMN {name} {declaration}")

    @classmethod
    def for_settings(cls, settings: Any) -> HistoryStore:
        """The store a muselab with these settings uses: <data_dir>/history.sqlite3 and its outputs."""
        return cls(settings.data_dir / "history.sqlite3", settings.outputs)

    # ------------------------------------------------------------ plumbing

    def connection(self) -> sqlite3.Connection:
        """This thread's connection: for reads (writes go through `transaction`)."""
        connection = getattr(self._local, "connection", None)
        if connection is None:
            connection = sqlite3.connect(self.database, timeout=30, isolation_level=None)
            connection.row_factory = sqlite3.Row
            connection.execute("PRAGMA journal_mode=WAL")
            connection.execute("PRAGMA busy_timeout=30000")
            connection.execute("PRAGMA synchronous=NORMAL")
            connection.execute("PRAGMA foreign_keys=ON")
            self._local.connection = connection
        return connection

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """A transaction: committed on success, rolled back on error (also for the tables of
        `muselab.batches` and `muselab.webhooks`, which keep theirs in this database)."""
        db = self.connection()
        db.execute("BEGIN IMMEDIATE")
        try:
            yield db
        except BaseException:
            db.execute("ROLLBACK")
            raise
        db.execute("COMMIT")

    # ------------------------------------------------------------ jobs

    def add_job(
        self,
        job_id: str,
        kind: str,
        request: dict[str, Any],
        source: str,
        *,
        batch: tuple[str, int] | None = None,
        callback: str | None = None,
    ) -> None:
        """A queued job; one of a batch names the batch and its item in the same row, so that a
        restart knows which items ran, whenever the process was killed."""
        batch_id, batch_item = batch or (None, None)
        with self.transaction() as db:
            db.execute(
                "INSERT INTO jobs (id, kind, status, source, request, pid, created_at, batch_id, batch_item, callback) "
                "VALUES (?, ?, 'queued', ?, ?, ?, ?, ?, ?, ?)",
                (job_id, kind, source, json.dumps(request), os.getpid(), now(), batch_id, batch_item, callback),
            )

    def mark_running(self, job_id: str, model: str, device: str, dtype: str) -> None:
        with self.transaction() as db:
            db.execute(
                "UPDATE jobs SET status='running', started_at=?, model=?, device=?, dtype=? WHERE id=?",
                (now(), model, device, dtype, job_id),
            )

    def finish_job(
        self,
        job_id: str,
        status: str,
        *,
        request: dict[str, Any] | None = None,
        outputs: list[dict[str, Any]] = (),  # type: ignore[assignment]
        error: str | None = None,
        seconds: float | None = None,
    ) -> list[OutputRecord]:
        """Close a job and record its outputs (files already on disk) in one transaction."""
        created = now()
        with self.transaction() as db:
            sets = "status=?, finished_at=?, error=?, seconds=?"
            values: list[Any] = [status, created, error, seconds]
            if request is not None:
                sets += ", request=?, seed=?"
                values += [json.dumps(request), request.get("seed")]
            db.execute(f"UPDATE jobs SET {sets} WHERE id=?", (*values, job_id))
            ids = []
            for output in outputs:
                output_id = new_id()
                ids.append(output_id)
                path = Path(output["path"])
                db.execute(
                    "INSERT INTO outputs (id, job_id, kind, path, prompt, seed, flagged, recipe, size_bytes, "
                    "created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (
                        output_id,
                        job_id,
                        output["kind"],
                        self._relative(path),
                        output["prompt"],
                        output["seed"],
                        int(output.get("flagged", False)),
                        json.dumps(output["recipe"]),
                        path.stat().st_size,
                        created,
                    ),
                )
        return [self.get_output(output_id) for output_id in ids]  # type: ignore[misc]

    def get_job(self, job_id: str) -> dict[str, Any] | None:
        row = self.connection().execute("SELECT * FROM jobs WHERE id=?", (job_id,)).fetchone()
        if row is None:
            return None
        job = dict(row)
        job["request"] = json.loads(job["request"])
        # In the order they were made (list_outputs gives newest first).
        job["outputs"] = [o.public() for o in reversed(self.list_outputs(job_id=job_id, limit=1000))]
        return job

    def list_jobs(self, status: str | None = None, limit: int = 50, offset: int = 0) -> list[dict[str, Any]]:
        query, args = "SELECT id FROM jobs", []
        if status:
            query += " WHERE status=?"
            args.append(status)
        query += " ORDER BY created_at DESC LIMIT ? OFFSET ?"
        rows = self.connection().execute(query, (*args, limit, offset)).fetchall()
        return [self.get_job(row["id"]) for row in rows]  # type: ignore[misc]

    def run_times(self, kind: str, limit: int = 200) -> list[dict[str, Any]]:
        """This machine's latest succeeded jobs of `kind`, newest first: the resolved request, the
        model's label, how it ran (`dtype`, e.g. "float32 (openvino)") and the seconds it ran once
        its model was loaded (loading and conversions not counted)."""
        rows = (
            self.connection()
            .execute(
                f"SELECT request, model, dtype, {RAN_SECONDS} AS seconds "
                "FROM jobs WHERE kind=? AND status='succeeded' AND started_at IS NOT NULL "
                "ORDER BY created_at DESC LIMIT ?",
                (kind, limit),
            )
            .fetchall()
        )
        return [{**dict(row), "request": json.loads(row["request"])} for row in rows]

    def throughput(self, seconds: float) -> list[dict[str, Any]]:
        """Jobs that ended in the last `seconds`, by kind and model (its label): how many succeeded
        and failed, jobs a minute, and the mean seconds a succeeded one ran once its model was loaded."""
        rows = (
            self.connection()
            .execute(
                "SELECT kind, model, SUM(status='succeeded') AS succeeded, SUM(status='failed') AS failed, "
                "AVG(CASE WHEN status='succeeded' AND started_at IS NOT NULL "
                f"THEN {RAN_SECONDS} END) AS mean_seconds "
                "FROM jobs WHERE finished_at IS NOT NULL AND julianday('now') - julianday(finished_at) < ? "
                "AND model IS NOT NULL GROUP BY kind, model ORDER BY kind, model",
                (seconds / 86400,),
            )
            .fetchall()
        )
        return [
            {
                **dict(row),
                "window_seconds": seconds,
                "jobs_per_minute": round(row["succeeded"] / (seconds / 60), 2),
                "mean_seconds": row["mean_seconds"] and round(row["mean_seconds"], 2),
            }
            for row in rows
        ]

    def recover_interrupted(self) -> list[str]:
        """After a crash: jobs left queued or running by a process that is gone are marked interrupted.

        Jobs of another live process sharing this data folder (a server, say) are left alone.
        """
        with self.transaction() as db:
            rows = db.execute("SELECT id, pid FROM jobs WHERE status IN ('queued', 'running')").fetchall()
            lost = [row["id"] for row in rows if not process_alive(row["pid"])]
            db.executemany(
                "UPDATE jobs SET status='interrupted', finished_at=?, error=? WHERE id=?",
                [(now(), INTERRUPTED, job_id) for job_id in lost],
            )
        if not any(process_alive(row["pid"]) for row in rows):
            for stray in self.outputs_dir.rglob(".*.part"):
                stray.unlink(missing_ok=True)  # temporary files of writes that never completed
        return lost

    # ------------------------------------------------------------ local model folders

    def remember_model_folder(self, label: str, path: str) -> None:
        """Files and answers name a local model by its folder's name (its label); this machine's
        history keeps where that folder is, so `--from FILE` re-runs it here."""
        with self.transaction() as db:
            db.execute(
                "INSERT INTO model_folders (label, path, used_at) VALUES (?, ?, ?) "
                "ON CONFLICT(label) DO UPDATE SET path=excluded.path, used_at=excluded.used_at",
                (label, path, now()),
            )

    def model_folder(self, label: str) -> str | None:
        row = self.connection().execute("SELECT path FROM model_folders WHERE label=?", (label,)).fetchone()
        return row["path"] if row else None

    # ------------------------------------------------------------ outputs

    def _relative(self, path: Path) -> str:
        resolved = path.resolve()
        try:
            return str(resolved.relative_to(self.outputs_dir.resolve()))
        except ValueError:
            return str(resolved)

    def _record(self, row: sqlite3.Row) -> OutputRecord:
        path = Path(row["path"])
        if not path.is_absolute():
            path = self.outputs_dir / path
        return OutputRecord(
            id=row["id"],
            job_id=row["job_id"],
            kind=row["kind"],
            path=path,
            prompt=row["prompt"],
            seed=row["seed"],
            flagged=bool(row["flagged"]),
            recipe=json.loads(row["recipe"]),
            size_bytes=row["size_bytes"],
            created_at=row["created_at"],
            thumb=row["thumb"],
            stars=row["stars"],
            comment=row["comment"],
            feedback_at=row["feedback_at"],
        )

    def get_output(self, output_id: str) -> OutputRecord | None:
        row = self.connection().execute("SELECT * FROM outputs WHERE id=?", (output_id,)).fetchone()
        return self._record(row) if row else None

    def list_outputs(
        self,
        *,
        kind: str | None = None,
        text: str | None = None,
        min_stars: int | None = None,
        thumb: int | None = None,
        job_id: str | None = None,
        batch_id: str | None = None,
        limit: int = 50,
        offset: int = 0,
    ) -> list[OutputRecord]:
        clauses, args = [], []
        if batch_id:
            clauses.append("job_id IN (SELECT id FROM jobs WHERE batch_id = ?)")
            args.append(batch_id)
        if kind:
            clauses.append("kind=?")
            args.append(kind)
        if text:
            clauses.append("prompt LIKE ? ESCAPE '\\'")
            escaped = text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
            args.append(f"%{escaped}%")
        if min_stars is not None:
            clauses.append("stars >= ?")
            args.append(min_stars)
        if thumb is not None:
            clauses.append("thumb = ?")
            args.append(thumb)
        if job_id:
            clauses.append("job_id = ?")
            args.append(job_id)
        where = f" WHERE {' AND '.join(clauses)}" if clauses else ""
        rows = (
            self.connection()
            .execute(
                f"SELECT * FROM outputs{where} ORDER BY created_at DESC, rowid DESC LIMIT ? OFFSET ?",
                (*args, limit, offset),
            )
            .fetchall()
        )
        return [self._record(row) for row in rows]

    def count_outputs(self) -> int:
        return self.connection().execute("SELECT COUNT(*) FROM outputs").fetchone()[0]

    def owned_file(self, record: OutputRecord) -> Path | None:
        """The output's file if it is one inside this history's outputs folder, links resolved; else
        None. The one rule for what the history may read out to clients and may delete: a file the
        CLI wrote elsewhere (`-o`), or a link out of the folder, is not the history's."""
        root = self.outputs_dir.resolve()
        try:
            real = record.path.resolve(strict=True)
        except OSError:
            return None
        return real if real.is_relative_to(root) and real.is_file() else None

    def delete_output(self, output_id: str) -> Deletion | None:
        """Forget an output, and delete its file if the history owns it (`owned_file`). None if
        there was no such output."""
        record = self.get_output(output_id)
        if record is None:
            return None
        owned = self.owned_file(record)
        with self.transaction() as db:
            db.execute("DELETE FROM outputs WHERE id=?", (output_id,))
        if owned is not None:
            owned.unlink(missing_ok=True)
            return Deletion(output_id, True, f"Deleted {record.path.name}.")
        if record.path.is_symlink() or record.path.exists():
            message = (
                f"Removed {record.path.name} from the history; the file is outside the outputs folder, so it was kept."
            )
        else:
            message = f"Removed {record.path.name} from the history; its file was already gone."
        return Deletion(output_id, False, message)

    def set_feedback(
        self, output_id: str, thumb: int | None = None, stars: int | None = None, comment: str | None = None
    ) -> OutputRecord | None:
        if thumb not in (None, -1, 0, 1):
            raise FeedbackError("thumb must be 1 (up), -1 (down) or 0 (clear)")
        if stars is not None and not 1 <= stars <= 5:
            raise FeedbackError("stars must be a whole number from 1 to 5")
        if comment is not None and len(comment) > 2000:
            raise FeedbackError("comment must be at most 2000 characters")
        with self.transaction() as db:
            changed = db.execute(
                "UPDATE outputs SET thumb=COALESCE(?, thumb), stars=COALESCE(?, stars), "
                "comment=COALESCE(?, comment), feedback_at=? WHERE id=?",
                (thumb, stars, comment, now(), output_id),
            ).rowcount
        return self.get_output(output_id) if changed else None

    # ------------------------------------------------------------ export

    EXPORT_COLUMNS = (
        "id",
        "job_id",
        "kind",
        "filename",
        "prompt",
        "seed",
        "flagged",
        "created_at",
        "thumb",
        "stars",
        "comment",
        "recipe",
    )

    def export(self, fmt: str = "jsonl") -> str:
        """History and feedback as JSON Lines or CSV, oldest first."""
        rows = []
        offset = 0
        while batch := self.list_outputs(limit=500, offset=offset):
            rows.extend(batch)
            offset += len(batch)
        rows.reverse()
        flat = []
        for record in rows:
            public = record.public()
            flat.append(
                {
                    **{k: public[k] for k in ("id", "job_id", "kind", "filename", "prompt", "seed", "flagged")},
                    "created_at": record.created_at,
                    "thumb": record.thumb,
                    "stars": record.stars,
                    "comment": record.comment,
                    "recipe": record.recipe,
                }
            )
        if fmt == "jsonl":
            return "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in flat)
        if fmt == "csv":
            buffer = io.StringIO()
            writer = csv.DictWriter(buffer, fieldnames=self.EXPORT_COLUMNS, quoting=csv.QUOTE_ALL)
            writer.writeheader()
            for row in flat:
                cells = {**row, "recipe": json.dumps(row["recipe"], ensure_ascii=False)}
                writer.writerow({key: spreadsheet_safe(value) for key, value in cells.items()})
            return buffer.getvalue()
        raise ValueError("export format must be jsonl or csv")
