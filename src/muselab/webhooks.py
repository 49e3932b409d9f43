"""Job-done webhooks: when a job or a batch that names a callback URL ends, its status JSON is
POSTed there, signed, retried with backoff a bounded number of times, each delivery recorded in
the history (the `deliveries` table beside the jobs).

A callback may only name a host on the settings' allow-list (`webhook_hosts`): with none, there are
no webhooks. A server that POSTs wherever a client asks becomes a way to reach the machines behind
it (the SSRF class of Gradio's CVE-2024-47167), so redirects are not followed and the environment's
proxies are not used either.

Headers say what it is: `X-Muselab-Event` (job or batch), `X-Muselab-Delivery` (its id, the same
on each retry) and `X-Muselab-Attempt`. The signature is GitHub's scheme: `X-Muselab-Signature:
sha256=<hex HMAC-SHA256 of the body with the settings' `webhook_secret`>`; a receiver checks it
with `verify`.
"""

from __future__ import annotations

import hashlib
import heapq
import hmac
import json
import logging
import os
import threading
import time
from typing import Any
from urllib.parse import urlsplit

from muselab import __version__
from muselab.schemas import RequestError
from muselab.store import HistoryStore, new_id, now, process_alive

log = logging.getLogger("muselab.webhooks")

SIGNATURE_HEADER = "X-Muselab-Signature"
MAX_URL_CHARS = 2000
ATTEMPT_TIMEOUT = 10.0
MAX_DELAY = 300.0

SCHEMA = """
CREATE TABLE IF NOT EXISTS deliveries (
    id TEXT PRIMARY KEY,
    job_id TEXT,
    batch_id TEXT,
    url TEXT NOT NULL,
    body TEXT NOT NULL,
    status TEXT NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    response_code INTEGER,
    error TEXT,
    pid INTEGER,
    created_at TEXT NOT NULL,
    updated_at TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS deliveries_job ON deliveries(job_id);
CREATE INDEX IF NOT EXISTS deliveries_batch ON deliveries(batch_id);
"""


def sign(body: bytes, secret: str) -> str:
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


def verify(body: bytes, secret: str, header: str | None) -> bool:
    """What a receiver does with a delivery: true when `header` is `body`'s signature."""
    return header is not None and hmac.compare_digest(sign(body, secret), header)


def check_url(url: str, settings: Any, field: str = "callback_url") -> str:
    """`url` when this server may POST to it, else a RequestError naming `field` and what it takes."""
    problem = None
    parts = urlsplit(url) if len(url) <= MAX_URL_CHARS else None
    allowed = [host.lower() for host in settings.webhook_hosts]
    if parts is None:
        problem = f"at most {MAX_URL_CHARS} characters"
    elif parts.scheme not in ("http", "https") or not parts.hostname:
        problem = "an http:// or https:// URL"
    elif parts.username is not None or parts.password is not None:
        problem = "a URL without a user name or password in it"
    elif not allowed:
        problem = (
            "nothing on this server: webhooks are off until its settings name the hosts callbacks may go to "
            "(MUSELAB_WEBHOOK_HOSTS)"
        )
    elif not settings.webhook_secret:
        problem = "nothing on this server: webhooks need a signing key first (MUSELAB_WEBHOOK_SECRET)"
    else:
        host = parts.hostname.lower()
        try:
            port = parts.port or (443 if parts.scheme == "https" else 80)
        except ValueError:
            port = None
        bracketed = f"[{host}]" if ":" in host else host
        if port is None:
            problem = "a URL with a port from 1 to 65535"
        elif host not in allowed and f"{bracketed}:{port}" not in allowed:
            # The list itself is not shown: it may name machines a client has no business knowing.
            problem = f"a URL on a host on this server's allow-list (MUSELAB_WEBHOOK_HOSTS); {bracketed}:{port} is not"
    if problem:
        raise RequestError(f"Invalid request:\n  - {field}: must be {problem}")
    return url


class Webhooks:
    """Deliveries for one job service: a thread that POSTs each, retrying with backoff; those still
    pending when a process stopped are sent by the next one that opens the history."""

    def __init__(self, store: HistoryStore, settings: Any):
        self.store = store
        self.settings = settings
        store.connection().executescript(SCHEMA)  # its table, in the history's database
        self._due: list[tuple[float, str]] = []
        self._lock = threading.Condition()
        self._thread: threading.Thread | None = None
        self._closed = False
        self._deadline = 0.0
        self._resume()

    def deliver(self, url: str, payload: dict[str, Any], *, job_id: str | None = None, batch_id: str | None = None):
        """Record a delivery of `payload` to `url` and send it soon (never on the caller's thread)."""
        delivery = new_id()
        with self.store.transaction() as db:
            db.execute(
                "INSERT INTO deliveries (id, job_id, batch_id, url, body, status, pid, created_at, updated_at) "
                "VALUES (?, ?, ?, ?, ?, 'pending', ?, ?, ?)",
                (delivery, job_id, batch_id, url, json.dumps(payload), os.getpid(), now(), now()),
            )
        self._schedule(delivery, 0.0)
        return delivery

    def deliveries(self, *, job_id: str | None = None, batch_id: str | None = None) -> list[dict[str, Any]]:
        """Each delivery of a job's or a batch's status: where, how it went, how many tries."""
        column, value = ("job_id", job_id) if job_id else ("batch_id", batch_id)
        rows = (
            self.store.connection()
            .execute(
                "SELECT id, url, status, attempts, response_code, error, updated_at FROM deliveries "
                f"WHERE {column}=? ORDER BY created_at",
                (value,),
            )
            .fetchall()
        )
        return [dict(row) for row in rows]

    def close(self, timeout: float = 5.0) -> None:
        """Send what falls due within `timeout` seconds (a CLI job's callback, as the command ends),
        then stop; the rest stays recorded as pending, for the next start."""
        with self._lock:
            self._closed = True
            self._deadline = time.monotonic() + timeout
            self._lock.notify_all()
        if self._thread is not None:
            self._thread.join(timeout + ATTEMPT_TIMEOUT)

    # ------------------------------------------------------------ sending

    def _resume(self) -> None:
        rows = self.store.connection().execute("SELECT id, pid FROM deliveries WHERE status='pending'").fetchall()
        for row in rows:
            if process_alive(row["pid"]):
                continue  # another live process (a server beside this CLI) sends it
            with self.store.transaction() as db:
                db.execute("UPDATE deliveries SET pid=? WHERE id=?", (os.getpid(), row["id"]))
            self._schedule(row["id"], 0.0)

    def _schedule(self, delivery: str, delay: float) -> None:
        with self._lock:
            heapq.heappush(self._due, (time.monotonic() + delay, delivery))
            if self._thread is None:
                self._thread = threading.Thread(target=self._send_loop, name="muselab-webhooks", daemon=True)
                self._thread.start()
            self._lock.notify_all()

    def _send_loop(self) -> None:
        import httpx

        # No proxies from the environment, no redirects: the request goes to the allowed host only.
        with httpx.Client(timeout=ATTEMPT_TIMEOUT, follow_redirects=False, trust_env=False) as client:
            while True:
                with self._lock:
                    while not self._due or self._due[0][0] > time.monotonic():
                        until = self._due[0][0] if self._due else None
                        if self._closed:
                            if until is None or until > self._deadline:
                                return
                        elif until is None:
                            self._lock.wait()
                            continue
                        self._lock.wait(max(0.0, (until or self._deadline) - time.monotonic()))
                    _, delivery = heapq.heappop(self._due)
                try:
                    self._attempt(client, delivery)
                except Exception:  # a delivery must never stop the others
                    log.exception("webhook delivery %s", delivery)

    def _attempt(self, client: Any, delivery: str) -> None:
        row = self.store.connection().execute("SELECT * FROM deliveries WHERE id=?", (delivery,)).fetchone()
        if row is None or row["status"] != "pending":
            return
        body = row["body"].encode()
        attempt = row["attempts"] + 1
        headers = {
            "Content-Type": "application/json",
            "User-Agent": f"muselab/{__version__}",
            SIGNATURE_HEADER: sign(body, self.settings.webhook_secret or ""),
            "X-Muselab-Event": "batch" if row["batch_id"] and not row["job_id"] else "job",
            "X-Muselab-Delivery": delivery,
            "X-Muselab-Attempt": str(attempt),
        }
        code, error = None, None
        try:
            response = client.post(row["url"], content=body, headers=headers)
            code = response.status_code
        except Exception as exc:  # refused, timed out, reset
            error = f"{type(exc).__name__}: {exc}"
        if code is not None and 200 <= code < 300:
            status = "delivered"
        else:
            error = error or f"answered {code}"
            retryable = code is None or code >= 500 or code in (408, 429)
            status = "pending" if retryable and attempt <= self.settings.webhook_retries else "failed"
        with self.store.transaction() as db:
            db.execute(
                "UPDATE deliveries SET status=?, attempts=?, response_code=?, error=?, updated_at=? WHERE id=?",
                (status, attempt, code, error, now(), delivery),
            )
        if status == "pending":
            self._schedule(delivery, min(self.settings.webhook_backoff * 2 ** (attempt - 1), MAX_DELAY))
