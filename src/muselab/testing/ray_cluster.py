"""A throwaway Ray cluster on 127.0.0.1 for the tests and the scaling benchmark: started with
`ray start --head --block`, stopped with every process it made."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

#: Every socket on 127.0.0.1 (see docs/SCALING.md), and no usage report.
LOOPBACK_ONLY = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_USAGE_STATS_ENABLED": "0"}
RAY = str(Path(sys.executable).with_name("ray"))


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _descendants(pid: int) -> list[int]:
    """Every process under `pid`. Ray's workers get process groups of their own, and outlive a
    raylet that is killed, so killing the head's group is not enough."""
    table = subprocess.run(["ps", "-eo", "pid=,ppid="], capture_output=True, text=True).stdout.split()
    children: dict[int, list[int]] = {}
    for child, parent in zip(table[::2], table[1::2], strict=True):
        children.setdefault(int(parent), []).append(int(child))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


class LocalRayCluster:
    """`with LocalRayCluster(cpus=8) as address:` a head on 127.0.0.1 at `address` (HOST:PORT)."""

    def __init__(self, cpus: int, timeout: float = 90):
        self.cpus, self.timeout = cpus, timeout
        self.address = f"127.0.0.1:{_free_port()}"
        self.head: subprocess.Popen | None = None

    def __enter__(self) -> str:
        os.environ.update(LOOPBACK_ONLY)  # this process connects too (the service, a test)
        temp = tempfile.mkdtemp(prefix="mlray", dir="/tmp")  # short: Ray's socket paths live under it
        command = [
            RAY, "start", "--head", "--block", "--node-ip-address", "127.0.0.1",
            "--port", self.address.rsplit(":", 1)[1], "--disable-usage-stats", "--include-dashboard", "false",
            "--num-cpus", str(self.cpus), "--temp-dir", temp,
        ]  # fmt: skip
        self.head = subprocess.Popen(
            command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
        )
        deadline = time.monotonic() + self.timeout
        while subprocess.run([RAY, "status", "--address", self.address], capture_output=True, timeout=60).returncode:
            if self.head.poll() is not None or time.monotonic() > deadline:
                self.__exit__()
                raise RuntimeError(f"the Ray head did not start on {self.address}")
            time.sleep(1)
        return self.address

    def __exit__(self, *exc: object) -> None:
        if self.head is None:
            return
        processes = [self.head.pid, *_descendants(self.head.pid)]
        for pid in processes:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        self.head.wait(10)
        self.head = None
