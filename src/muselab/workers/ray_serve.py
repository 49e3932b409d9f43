"""Generation on a Ray Serve cluster (``workers=ray``): one Serve application per model, whose
replicas run the same code as the local workers (`LocalWorkers`), while the job service that
submitted the job keeps its queue, history and files.

A job travels as an `Order` to `Replica.run`, a streaming method: it yields the job's progress
(steps, previews), where it runs, and at the end its result (pictures, audio) or its error, which
the service saves or records as if it had run here. A cancel goes through a small actor every
replica reads (`CancelBoard`), so an engine stops within one step and still hands back what it
finished. A replica that dies takes its job with it: the job runs once more (on a replica Serve
starts in its place or another one), and fails with `WorkerLost` if that one dies too.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import socket
import tempfile
import threading
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

from muselab.config import Settings, model_label
from muselab.devices import DeviceError, flush_denormals
from muselab.engines import Cancelled, CancelToken, ModelUnavailable, ProgressEvent
from muselab.engines.base import GenerationResult
from muselab.schemas import RequestError
from muselab.workers import ClusterUnavailable, Order, ProgressCallback, Started, WorkerLost, is_out_of_memory

try:
    import ray
    from ray import serve
    from ray.exceptions import RayActorError
    from ray.serve import api as serve_api
    from ray.serve.exceptions import BackPressureError, ReplicaUnavailableError
except ImportError as exc:  # pragma: no cover - only without the extra
    raise ImportError("workers=ray needs Ray Serve: pip install 'muselab[ray]'") from exc

log = logging.getLogger("muselab.workers")

NAMESPACE = "muselab"
BOARD = "muselab-cancel-board"
#: Seconds between a replica's looks at the cancel board while its job runs.
CANCEL_POLL = 0.2


@ray.remote(num_cpus=0)
class CancelBoard:
    """Ids of cancelled jobs. Replicas ask about theirs a few times a second; an id is forgotten an
    hour after its cancel, long after any job it names has stopped."""

    def __init__(self) -> None:
        self._cancelled: dict[str, float] = {}

    def cancel(self, job_id: str) -> None:
        now = time.monotonic()
        self._cancelled = {job: at for job, at in self._cancelled.items() if now - at < 3600}
        self._cancelled[job_id] = now

    def is_cancelled(self, job_id: str) -> bool:
        return job_id in self._cancelled


def _describe(exc: BaseException) -> dict[str, Any]:
    """An engine's failure as plain data: the caller raises the same kind of error from it."""
    if isinstance(exc, Cancelled):
        kind = "cancelled"
    elif isinstance(exc, ModelUnavailable):
        kind = "model_unavailable"
    elif isinstance(exc, DeviceError):
        kind = "device"
    elif isinstance(exc, RequestError):
        kind = "bad_request"
    elif is_out_of_memory(exc):
        kind = "out_of_memory"
    else:
        kind = "internal"
    message = str(exc) if kind != "internal" else f"{type(exc).__name__}: {exc}"
    return {"kind": kind, "message": message, "partial": getattr(exc, "partial", None)}


def _rebuild(error: dict[str, Any]) -> Exception:
    kinds: dict[str, Callable[[str], Exception]] = {
        "cancelled": lambda message: Cancelled(),
        "model_unavailable": ModelUnavailable,
        "device": DeviceError,
        "bad_request": RequestError,
        "out_of_memory": MemoryError,
        "internal": RuntimeError,
    }
    exc = kinds[error["kind"]](error["message"])
    exc.partial = error["partial"]  # type: ignore[attr-defined]
    return exc


@serve.deployment
class Replica:
    """One copy of a model on the cluster; its jobs run as they would in a local service."""

    def __init__(self, settings: Settings, kind: str, model: str):
        from muselab.workers.local import LocalWorkers

        self.kind, self.model = kind, model
        self.local = LocalWorkers(settings)
        self.board = ray.get_actor(BOARD, namespace=NAMESPACE)
        replica = serve.get_replica_context().replica_id.unique_id
        self.where = {"replica": replica, "node": ray.util.get_node_ip_address()}

    def warm(self) -> dict[str, str]:
        """Load the model now, so the first job finds it loaded; where it runs."""
        flush_denormals()
        with self.local.models.use(self.kind, self.model) as engine:
            return {"device": engine.placement.device, "dtype": engine.placement.dtype_name, **self.where}

    async def run(self, order: Order) -> AsyncIterator[tuple[str, Any]]:
        loop = asyncio.get_running_loop()
        events: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()
        cancel = CancelToken()

        def send(kind: str, payload: Any) -> None:
            loop.call_soon_threadsafe(events.put_nowait, (kind, payload))

        def on_progress(event: ProgressEvent) -> None:
            send("progress", event)

        on_progress.previews = True  # type: ignore[attr-defined]  # the service shows them

        def started(request: Any, placement: dict[str, str] | None) -> None:
            send("started", (request, placement and {**placement, **self.where}))

        def work() -> None:
            flush_denormals()  # per thread, before its first tensor operation
            try:
                send("result", self.local.run(order, on_progress, cancel, started))
            except BaseException as exc:
                error = _describe(exc)
                if error["kind"] == "out_of_memory":
                    self.local.free_memory()
                send("error", error)

        threading.Thread(target=work, name=f"muselab-{order.kind}", daemon=True).start()
        next_look = time.monotonic()
        try:
            while True:
                try:
                    kind, payload = await asyncio.wait_for(events.get(), CANCEL_POLL)
                except TimeoutError:
                    kind, payload = "", None
                if not cancel.cancelled and time.monotonic() >= next_look:
                    next_look = time.monotonic() + CANCEL_POLL
                    if await self.board.is_cancelled.remote(order.job_id):
                        cancel.cancel()
                if kind:
                    yield kind, payload
                if kind in ("result", "error"):
                    return
        finally:
            cancel.cancel()  # the caller went away: stop generating for no one


def app_name(kind: str, model: str) -> str:
    return f"muselab-{kind}-{hashlib.sha256(model.encode()).hexdigest()[:10]}"


def _connect(address: str) -> None:
    if ray.is_initialized():
        return
    if address == "auto":
        # The cluster `ray start` made on this machine, as ray.init finds it; a stale record of
        # one that was stopped would have it retry for a minute or more.
        record = Path(tempfile.gettempdir()) / "ray" / "ray_current_cluster"
        found = os.environ.get("RAY_ADDRESS") or (record.read_text().strip() if record.exists() else "")
        if not found:
            raise ClusterUnavailable(_no_cluster(address, RuntimeError("no cluster was started on this machine")))
    else:
        found = address
    host, _, port = found.rpartition(":")
    if host and port.isdigit():
        # Ray retries an address that does not answer for a minute or more: ask it first.
        try:
            socket.create_connection((host.strip("[]"), int(port)), timeout=5).close()
        except OSError as exc:
            raise ClusterUnavailable(_no_cluster(address, exc)) from None
    try:
        ray.init(
            address=None if address == "local" else address,
            namespace=NAMESPACE,
            log_to_driver=False,
            include_dashboard=False if address == "local" else None,
            configure_logging=False,
        )
    except (ConnectionError, RuntimeError) as exc:
        raise ClusterUnavailable(_no_cluster(address, exc)) from None


def _no_cluster(address: str, exc: BaseException) -> str:
    return (
        f"No Ray cluster at {address!r} ({exc}). Start one with `ray start --head` (see docs/SCALING.md), "
        "name its head with --ray-address HOST:PORT (MUSELAB_RAY_ADDRESS), or use 'local' to start one here."
    )


class RayWorkers:
    def __init__(self, settings: Settings):
        self.settings = settings
        logging.getLogger("ray.serve").setLevel(logging.WARNING)  # its per-call lines are not for users
        _connect(settings.ray_address)
        # No HTTP proxy of Serve's own: requests come in through this service, which checks them.
        serve.start(proxy_location="Disabled")
        self.board = CancelBoard.options(  # type: ignore[attr-defined]
            name=BOARD, namespace=NAMESPACE, get_if_exists=True, lifetime="detached"
        ).remote()
        low, _, high = settings.ray_replicas.partition("-")
        self.min_replicas, self.max_replicas = int(low), max(int(high or low), 1)
        self._lock = threading.Lock()
        self._handles: dict[tuple[str, str], Any] = {}
        self._deploying: dict[tuple[str, str], threading.Event] = {}
        self._seen: dict[tuple[str, str], dict[str, dict[str, str]]] = {}  # replicas by id, where they run
        self.preparing: dict[str, dict[str, Any]] = {}

    # ------------------------------------------------------------ deployments

    def _options(self) -> dict[str, Any]:
        settings = self.settings
        options: dict[str, Any] = {
            "ray_actor_options": {"num_cpus": settings.ray_num_cpus, "num_gpus": settings.ray_num_gpus},
            "max_ongoing_requests": settings.ray_max_ongoing,
            # This service holds its own waiting jobs (`limit`) and sends a model's replicas only as
            # many as they run at once; Serve's bound is for the callers it does not see (another
            # service sharing the deployment) and a `warm`.
            "max_queued_requests": -1 if settings.ray_max_queued < 0 else settings.ray_max_queued + 1,
        }
        if self.min_replicas == self.max_replicas:
            options["num_replicas"] = self.max_replicas
        else:
            options["autoscaling_config"] = {
                "min_replicas": self.min_replicas,
                "max_replicas": self.max_replicas,
                "target_ongoing_requests": settings.ray_max_ongoing,
            }
        return options

    def _handle(self, kind: str, model: str, on_progress: ProgressCallback, cancel: CancelToken) -> Any:
        """The model's deployment, deployed first if this service has not yet. Its replicas start
        empty (each loads its model with its first job, or `warm`), in seconds where the cluster has
        room for them; where it has not, the job waits, says why, and can be cancelled."""
        key = (kind, model)
        while True:
            with self._lock:
                if key in self._handles:
                    return self._handles[key]
                deploying = self._deploying.get(key)
                if deploying is None:
                    deploying = self._deploying[key] = threading.Event()
                    break
            while not deploying.wait(0.5):  # another job of this model is deploying it
                cancel.raise_if_cancelled()
        try:
            application = Replica.options(name=kind, **self._options()).bind(self.settings, kind, model)
            name = app_name(kind, model)
            # serve.run waits for the replicas without a way to stop waiting; this is its
            # non-waiting form, and `_wait_running` waits in a way a cancel can end.
            handle = serve_api._run(application, _blocking=False, name=name, route_prefix=None)
            self._wait_running(name, on_progress, cancel)
            with self._lock:
                self._handles[key] = handle
            return handle
        finally:
            with self._lock:
                self._deploying.pop(key, None)
            deploying.set()

    def _wait_running(self, name: str, on_progress: ProgressCallback, cancel: CancelToken) -> None:
        started = time.monotonic()
        while True:
            application = serve.status().applications.get(name)
            state = str(application.status.value) if application else "DEPLOYING"
            if state == "RUNNING":
                return
            messages = [application.message] if application and application.message else []
            if application:
                messages += [d.message for d in application.deployments.values() if d.message]
            if state in ("DEPLOY_FAILED", "UNHEALTHY"):
                raise ModelUnavailable(f"The model's replicas could not start on the Ray cluster: {' '.join(messages)}")
            note = f"starting {self.max_replicas} replica(s) of this model on the Ray cluster"
            on_progress(
                ProgressEvent(
                    stage="converting",
                    step=0,
                    total=1,
                    elapsed=time.monotonic() - started,
                    eta=None,
                    note=f"{note}: {messages[-1]}" if messages else note,
                )
            )
            if cancel.wait(0.5):
                raise Cancelled()

    # ------------------------------------------------------------ running a job

    def run(
        self, order: Order, on_progress: ProgressCallback, cancel: CancelToken, started: Started
    ) -> GenerationResult:
        lost: str | None = None
        while True:
            cancel.raise_if_cancelled()
            handle = self._handle(order.kind, order.model, on_progress, cancel)
            finished = threading.Event()
            threading.Thread(target=self._forward_cancel, args=(order.job_id, cancel, finished), daemon=True).start()
            where: dict[str, str] = {}
            try:
                for kind, payload in handle.options(stream=True).run.remote(order):
                    if kind == "progress":
                        on_progress(payload)
                    elif kind == "started":
                        request, placement = payload
                        if placement is not None:
                            where = placement
                            self._note_replica(order, placement)
                            if lost:
                                placement = {**placement, "retried_after": lost}
                        started(request, placement)
                    elif kind == "result":
                        return payload
                    else:
                        raise _rebuild(payload)
            except BackPressureError:
                # Another service filled this model's queue on the cluster: wait for room.
                if cancel.wait(1.0):
                    raise Cancelled() from None
            except (RayActorError, ReplicaUnavailableError) as exc:
                if cancel.cancelled:
                    raise Cancelled() from None
                replica = f"replica {where['replica']} on {where['node']}" if where else "its replica"
                why = (
                    f"{replica} stopped while running it ({type(exc).__name__}: its process died or became unreachable)"
                )
                if lost:
                    raise WorkerLost(
                        f"This job was run twice on the Ray cluster and lost both times: first {lost}; then {why}. "
                        "Nothing was saved; the service keeps running. A replica that dies like this has usually "
                        "run out of memory: try fewer replicas per node, or a smaller request."
                    ) from None
                lost = why
                log.warning("job %s: %s; running it once more", order.job_id, why)
                on_progress(
                    ProgressEvent(
                        stage="converting", step=0, total=1, elapsed=0.0, eta=None, note=f"{why}; running it again"
                    )
                )
            finally:
                finished.set()

    def _forward_cancel(self, job_id: str, cancel: CancelToken, finished: threading.Event) -> None:
        while not finished.is_set():
            if cancel.wait(0.1):
                self.board.cancel.remote(job_id)
                return

    def _note_replica(self, order: Order, placement: dict[str, str]) -> None:
        with self._lock:
            self._seen.setdefault((order.kind, order.model), {})[placement["replica"]] = {
                "replica": placement["replica"],
                "node": placement["node"],
                "device": placement["device"],
                "dtype": placement["dtype"],
            }

    # ------------------------------------------------------------ the rest of `Workers`

    def slots(self, kind: str, model: str) -> int:
        return self.max_replicas * self.settings.ray_max_ongoing

    def limit(self, kind: str, model: str) -> int | None:
        if self.settings.ray_max_queued < 0:
            return None
        return self.slots(kind, model) + self.settings.ray_max_queued

    def loaded(self) -> list[dict[str, str]]:
        with self._lock:
            deployed = list(self._handles)
            seen = {key: list(replicas.values()) for key, replicas in self._seen.items()}
        return [
            {
                "kind": kind,
                "model": model_label(model),
                "device": ", ".join(sorted({r["device"] for r in seen.get((kind, model), [])})) or "ray",
                "dtype": ", ".join(sorted({r["dtype"] for r in seen.get((kind, model), [])})) or "",
            }
            for kind, model in deployed
        ]

    def prepare(self, kinds: tuple[str, ...], stopped: Callable[[], bool], redact: Callable[[str], str]) -> None:
        """Deploy the configured models and load them in their replicas, in the background."""
        for kind in kinds:
            self.preparing[kind] = {"state": "waiting", "fraction": 0.0, "note": ""}

        def prepare_all() -> None:
            for kind in kinds:
                if stopped():
                    self.preparing[kind] = {"state": "stopped", "fraction": 0.0, "note": ""}
                    continue
                self.preparing[kind] = {"state": "preparing", "fraction": 0.0, "note": "starting replicas"}
                try:
                    model = self.settings.model_for(kind)
                    never = CancelToken()
                    self._handle(kind, model, lambda event: None, never).warm.remote().result(timeout_s=3600)
                    self.preparing[kind] = {"state": "ready", "fraction": 1.0, "note": ""}
                except BaseException as exc:  # also the CancelledError of a call the shutdown ended
                    state = "stopped" if stopped() else "failed"
                    self.preparing[kind] = {"state": state, "fraction": 0.0, "note": redact(str(exc))[:500]}

        threading.Thread(target=prepare_all, name="muselab-prepare", daemon=True).start()

    def preparation(self) -> dict[str, dict[str, Any]]:
        return dict(self.preparing)

    def free_memory(self) -> None:
        pass  # a replica that ran out frees its own memory (`Replica.run`)

    def status(self) -> dict[str, Any]:
        """Serve's view of each muselab application (its replicas by state, its settings) with the
        replicas this service has seen run jobs, and the cluster's nodes."""
        applications = serve.status().applications
        with self._lock:
            ours = {app_name(kind, model): (kind, model) for kind, model in self._handles}
            seen = {app_name(*key): list(replicas.values()) for key, replicas in self._seen.items()}
        deployments = []
        for name, application in sorted(applications.items()):
            if not name.startswith("muselab-"):
                continue
            for deployment_name, deployment in application.deployments.items():
                kind, model = ours.get(name, (deployment_name, ""))
                deployments.append(
                    {
                        "application": name,
                        "kind": kind,
                        "model": model_label(model) or None,
                        "status": str(deployment.status.value),
                        "replicas": dict(deployment.replica_states),
                        "replicas_seen": seen.get(name, []),
                    }
                )
        nodes = [
            {
                "node": node["NodeManagerAddress"],
                "alive": node["Alive"],
                "cpus": node["Resources"].get("CPU", 0),
                "gpus": node["Resources"].get("GPU", 0),
            }
            for node in ray.nodes()
        ]
        return {"workers": "ray", "replica_config": self.replica_config(), "deployments": deployments, "nodes": nodes}

    def replica_config(self) -> dict[str, Any]:
        """What each model's replicas are given (the studio's front page says it)."""
        settings = self.settings
        return {
            "replicas": settings.ray_replicas,
            "num_cpus": settings.ray_num_cpus,
            "num_gpus": settings.ray_num_gpus,
            "max_ongoing_requests": settings.ray_max_ongoing,
            "max_queued_requests": settings.ray_max_queued,
        }

    def close(self) -> None:
        """Leave the cluster; its deployments stay up (warm for the next start, or for other
        services sharing them): `serve shutdown` or `ray stop` ends them."""
        ray.shutdown()
