"""Real `muselab serve` processes on 127.0.0.1: load beyond the queue, kill -9 and restart, bind rules."""

from __future__ import annotations

import os
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from conftest import run_cli


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Server:
    """A real server process; always stopped by the test that starts it."""

    def __init__(self, data_dir: Path, tiny_dir: Path, args: tuple[str, ...] = (), **env: str):
        self.data_dir, self.port, self.args = data_dir, free_port(), args
        self.url = f"http://127.0.0.1:{self.port}"
        models = data_dir / "tiny-models"
        if not models.exists():
            data_dir.mkdir(parents=True, exist_ok=True)
            models.symlink_to(tiny_dir / "tiny-models")
        self.env = {
            **{k: v for k, v in os.environ.items() if not k.startswith("MUSELAB_")},
            "MUSELAB_DATA_DIR": str(data_dir),
            "MUSELAB_CACHE_DIR": os.environ["MUSELAB_CACHE_DIR"],
            "HF_HUB_OFFLINE": "1",
            "PYTHONUNBUFFERED": "1",
            **env,
        }
        self.process: subprocess.Popen | None = None

    def start(self, timeout: float = 90) -> Server:
        self.process = subprocess.Popen(
            [sys.executable, "-m", "muselab", "serve", "--preset", "tiny", "--port", str(self.port), *self.args],
            env=self.env,
            stdout=subprocess.DEVNULL,
            # A file, not a pipe nobody reads while the server runs: a full pipe would stall it.
            stderr=self.log.open("a"),
            text=True,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.process.poll() is None, self.errors
            try:
                if httpx.get(self.url + "/healthz", timeout=2).status_code == 200:
                    return self
            except httpx.TransportError:
                time.sleep(0.2)
        raise AssertionError("server did not start")

    def kill9(self) -> None:
        assert self.process is not None
        self.process.kill()
        self.process.wait(10)

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(20)
            except subprocess.TimeoutExpired:
                self.kill9()

    @property
    def log(self) -> Path:
        return self.data_dir / f"server-{self.port}.log"

    @property
    def errors(self) -> str:
        """What the server wrote to its standard error."""
        return self.log.read_text() if self.log.exists() else ""

    @property
    def outputs(self) -> Path:
        return self.data_dir / "outputs"


@pytest.fixture
def servers():
    started: list[Server] = []
    yield started
    for server in started:
        server.stop()


def wait_status(client: httpx.Client, job_id: str, wanted: set[str], timeout: float = 90) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = client.get(f"/api/jobs/{job_id}").json()
        if status["status"] in wanted and (status["status"] != "running" or status["progress"]):
            return status
        time.sleep(0.05)
    raise AssertionError(f"job {job_id} never reached {wanted}")


def test_more_clients_than_the_queue_holds(tmp_path, tiny_dir, servers):
    server = Server(tmp_path / "data", tiny_dir, MUSELAB_MAX_QUEUE="3")
    servers.append(server.start())
    clients = 12

    def one_client(number: int) -> httpx.Response:
        body = {"prompt": f"load test {number}", "steps": 2, "seed": number}
        return httpx.post(f"{server.url}/api/jobs/image?wait=true", json=body, timeout=120)

    with ThreadPoolExecutor(clients) as pool:
        responses = list(pool.map(one_client, range(clients)))
    done = [r.json() for r in responses if r.status_code == 200]
    busy = [r for r in responses if r.status_code == 429]
    assert len(done) + len(busy) == clients  # every request ended with a result or a clear busy answer
    assert done and busy
    assert all("queue is full" in r.json()["error"]["message"] and r.headers["retry-after"] for r in busy)
    assert all(job["status"] == "succeeded" and len(job["outputs"]) == 1 for job in done)
    job_ids = [job["id"] for job in done]
    assert len(set(job_ids)) == len(job_ids)  # nothing duplicated

    with httpx.Client(base_url=server.url) as client:
        recorded = client.get("/api/jobs?limit=200").json()["recent"]
        listed = client.get("/api/outputs?limit=200").json()["outputs"]
    assert sorted(job["id"] for job in recorded) == sorted(job_ids)  # nothing lost, busy ones never recorded
    # The database agrees with the files on disk, both ways.
    rows = sqlite3.connect(server.data_dir / "history.sqlite3").execute("SELECT path FROM outputs").fetchall()
    on_disk = sorted(p.name for p in server.outputs.iterdir())
    assert sorted(Path(row[0]).name for row in rows) == on_disk == sorted(o["filename"] for o in listed)
    assert len(on_disk) == len(done)


def test_kill_minus_9_mid_job_then_restart(tmp_path, tiny_dir, servers):
    server = Server(tmp_path / "data", tiny_dir)
    servers.append(server.start())
    with httpx.Client(base_url=server.url, timeout=60) as client:
        finished = client.post("/api/jobs/image?wait=true", json={"prompt": "kept", "steps": 2, "seed": 1}).json()
        running = client.post("/api/jobs/image", json={"prompt": "doomed", "steps": 150, "num_images": 8}).json()
        wait_status(client, running["id"], {"running"})
    server.kill9()

    servers.append(server.start())
    with httpx.Client(base_url=server.url, timeout=60) as client:
        assert client.get(f"/api/jobs/{finished['id']}").json()["status"] == "succeeded"
        interrupted = client.get(f"/api/jobs/{running['id']}").json()
        assert interrupted["status"] == "interrupted" and "retry" in interrupted["error"]
        kept = finished["outputs"][0]
        assert client.get(f"/api/outputs/{kept['id']}/file").status_code == 200
        files = sorted(p.name for p in server.outputs.iterdir())
        assert files == [kept["filename"]]  # no partial or temporary file visible
        fresh = client.post("/api/jobs/music?wait=true", json={"prompt": "after", "duration": 1}).json()
        assert fresh["status"] == "succeeded"
    statuses = {job["id"]: job["status"] for job in run_cli_jobs(server)}
    assert statuses[running["id"]] == "interrupted" and statuses[finished["id"]] == "succeeded"


def run_cli_jobs(server: Server) -> list[dict]:
    import json

    done = run_cli(["jobs", "--json"], server.env)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def test_non_loopback_bind_without_token_refuses_to_start(tmp_path, tiny_dir):
    env = Server(tmp_path / "data", tiny_dir).env
    done = run_cli(["serve", "--host", "0.0.0.0", "--port", str(free_port())], env, timeout=60)
    assert done.returncode == 2
    assert "Refusing to listen on 0.0.0.0 without a token" in done.stderr
    assert "MUSELAB_API_TOKEN" in done.stderr and "--token" in done.stderr


def _closed_within(sock: socket.socket, seconds: float, trickle: bytes = b"") -> float | None:
    """Seconds until the server closes `sock` (sending `trickle` a byte every 0.25 s meanwhile),
    or None if it is still open after `seconds`."""
    started = time.monotonic()
    sock.settimeout(0.25)
    position = 0
    while time.monotonic() - started < seconds:
        try:
            if trickle:
                sock.sendall(trickle[position % len(trickle) : position % len(trickle) + 1])
                position += 1
            if sock.recv(4096) == b"":
                return time.monotonic() - started
        except TimeoutError:
            continue
        except (BrokenPipeError, ConnectionResetError):
            return time.monotonic() - started
    return None


def test_slow_clients_are_dropped_and_the_server_goes_on(tmp_path, tiny_dir, servers):
    """A slowloris holding connections with unfinished headers, or a body trickled a byte at a
    time, is cut off after MUSELAB_CLIENT_TIMEOUT; without the limit it would hold on for ever."""
    server = Server(tmp_path / "data", tiny_dir, MUSELAB_CLIENT_TIMEOUT="2").start()
    servers.append(server)
    with socket.create_connection(("127.0.0.1", server.port)) as silent:
        assert (_closed_within(silent, 12) or 99) < 8  # connects and says nothing
    with socket.create_connection(("127.0.0.1", server.port)) as slowloris:
        slowloris.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n")
        assert (_closed_within(slowloris, 12, trickle=b"X-Padding: aaaaaaaa\r\n") or 99) < 8
    with socket.create_connection(("127.0.0.1", server.port)) as slow_body:
        slow_body.sendall(
            b"POST /api/jobs/image HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            b'Content-Length: 200\r\n\r\n{"prompt": '
        )
        slow_body.settimeout(12)
        started = time.monotonic()
        answer = slow_body.recv(4096)
        assert answer.startswith(b"HTTP/1.1 408") and time.monotonic() - started < 8, answer[:200]
    with httpx.Client(base_url=server.url) as client:
        assert client.get("/healthz").status_code == 200
        assert client.get("/api/jobs").json()["recent"] == []  # the trickled body started no job


def test_sigterm_mid_job_stops_the_server_cleanly_and_records_the_job_interrupted(tmp_path, tiny_dir, servers):
    server = Server(tmp_path / "data", tiny_dir)
    servers.append(server.start())
    with httpx.Client(base_url=server.url, timeout=60) as client:
        running = client.post("/api/jobs/image", json={"prompt": "long", "steps": 150, "num_images": 8}).json()
        waiting = client.post("/api/jobs/image", json={"prompt": "queued", "steps": 2}).json()
        wait_status(client, running["id"], {"running"})
    assert server.process is not None
    stopped_at = time.monotonic()
    server.process.send_signal(signal.SIGTERM)
    server.process.wait(10)
    assert time.monotonic() - stopped_at < 10
    errors = server.errors
    assert server.process.returncode in (0, -signal.SIGTERM), errors  # not an abort (-6)
    assert "terminate called" not in errors and "Traceback" not in errors
    rows = dict(sqlite3.connect(server.data_dir / "history.sqlite3").execute("SELECT id, status FROM jobs").fetchall())
    assert rows == {running["id"]: "interrupted", waiting["id"]: "interrupted"}
    assert not list(server.outputs.glob("*.png")) and not list(server.outputs.glob(".*.part"))
