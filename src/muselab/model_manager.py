"""Loaded engines, shared by every worker: loaded on demand, at most `capacity` kept in memory,
the least recently used unloaded first, and one generation at a time per engine."""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any

from muselab.config import Settings, model_label
from muselab.devices import flush_denormals
from muselab.engines import Cancelled, Engine, ProgressEvent, load_engine

log = logging.getLogger("muselab.jobs")


class ModelManager:
    """Loads engines on demand, keeps at most `capacity` in memory, unloads the least recently used."""

    def __init__(self, settings: Settings, capacity: int, loader: Callable[..., Engine] = load_engine):
        self.settings, self.loader = settings, loader
        # --low-memory: one model in use, and so loaded, at a time across all workers; a job for
        # another model waits, and the idle one is unloaded before the next loads.
        self.capacity = 1 if settings.low_memory else max(1, capacity)
        self._one_at_a_time = threading.Lock() if settings.low_memory else None
        self._engines: OrderedDict[tuple[str, str], Engine] = OrderedDict()
        self._in_use: dict[tuple[str, str], int] = {}
        # One generation at a time per engine, whichever worker (single-model or scene) asks.
        self._run_locks: dict[tuple[str, str], threading.Lock] = {}
        self._lock = threading.Lock()
        # How far `prepare` is with each configured model: state waiting, preparing, ready,
        # skipped, failed or stopped; fraction, note and elapsed while preparing.
        self.preparing: dict[str, dict[str, Any]] = {}

    @contextmanager
    def use(
        self, kind: str, model: str, on_progress: Callable[[ProgressEvent], None] | None = None
    ) -> Iterator[Engine]:
        """The engine, loaded first if needed (`on_progress` hears about one-time conversions then)."""
        key = (kind, model)
        with self._lock:
            run_lock = self._run_locks.setdefault(key, threading.Lock())
        with self._one_at_a_time or nullcontext(), run_lock:
            engine = self._get(key, on_progress)  # counts the engine as in use once it is loaded
            try:
                yield engine
            finally:
                with self._lock:
                    self._in_use[key] -= 1

    def _get(self, key: tuple[str, str], on_progress: Callable[[ProgressEvent], None] | None = None) -> Engine:
        """The engine for `key`, loaded if needed; the caller holds the key's run lock."""
        kind, model = key
        with self._lock:  # found and counted in use at once, so no other worker's eviction comes between
            engine = self._engines.get(key)
            if engine is not None:
                self._engines.move_to_end(key)
                self._in_use[key] = self._in_use.get(key, 0) + 1
                return engine
        self._evict(keep=self.capacity - 1)
        engine = self.loader(kind, self.settings, model, on_progress=on_progress)
        with self._lock:
            self._engines[key] = engine
            self._in_use[key] = self._in_use.get(key, 0) + 1
        return engine

    def loaded(self) -> list[dict[str, str]]:
        with self._lock:
            return [
                {
                    "kind": kind,
                    "model": model_label(model),
                    "device": engine.placement.device,
                    "dtype": engine.placement.dtype_name,
                }
                for (kind, model), engine in self._engines.items()
            ]

    def _evict(self, keep: int) -> None:
        """Unload idle engines, least recently used first, until at most `keep` remain."""
        with self._lock:
            for key in list(self._engines):
                if len(self._engines) <= keep:
                    break
                if not self._in_use.get(key):
                    del self._engines[key]
        release_memory()

    def free_memory(self) -> None:
        self._evict(keep=0)

    def prepare(
        self,
        kinds: tuple[str, ...],
        stopped: Callable[[], bool] = lambda: False,
        redact: Callable[[str], str] = str,
    ) -> None:
        """Load the configured models in the background, converting them first where that is
        needed (once, minutes for a real model), so the first Generate does not wait for it.
        Models whose weights are not on this machine are skipped (loading would download them), and
        only as many as stay loaded together are prepared, images first (their conversion is the long one).
        `preparing` says how far each one is; `stopped()` true stops it between stages."""
        if self.settings.low_memory:
            return  # one model at a time: the first job loads its own
        kinds = kinds[: self.capacity]  # no more than stay loaded together (MUSELAB_MAX_MODELS)
        for kind in kinds:
            self.preparing[kind] = {"state": "waiting", "fraction": 0.0, "note": ""}
        threading.Thread(
            target=self._prepare, args=(kinds, stopped, redact), name="muselab-prepare", daemon=True
        ).start()

    def _prepare(self, kinds: tuple[str, ...], stopped: Callable[[], bool], redact: Callable[[str], str]) -> None:
        from muselab.engines.base import cached_snapshot

        flush_denormals()
        for kind in kinds:
            model = self.settings.model_for(kind)
            tiny = self.settings.preset == "tiny" and model == self.settings.model_for(kind)
            if not (tiny or Path(model).expanduser().is_dir() or cached_snapshot(model) is not None):
                self.preparing[kind] = {"state": "skipped", "fraction": 0.0, "note": "weights not downloaded"}
                continue
            started = time.monotonic()

            def on_progress(event: ProgressEvent, kind: str = kind, started: float = started) -> None:
                if stopped():
                    raise Cancelled()
                self.preparing[kind] = {
                    "state": "preparing",
                    "fraction": round(event.fraction, 4),
                    "note": event.note,
                    "started": started,
                }

            self.preparing[kind] = {"state": "preparing", "fraction": 0.0, "note": "Loading", "started": started}
            try:
                with self.use(kind, model, on_progress):
                    pass
            except Cancelled:
                self.preparing[kind] = {"state": "stopped", "fraction": 0.0, "note": ""}
                return
            except Exception as exc:  # the first job will meet it again, and say so
                log.warning("preparing the %s model failed: %s", kind, exc)
                self.preparing[kind] = {"state": "failed", "fraction": 0.0, "note": redact(str(exc))[:300]}
                continue
            self.preparing[kind] = {"state": "ready", "fraction": 1.0, "note": ""}

    def preparation(self) -> dict[str, dict[str, Any]]:
        """`prepare`'s progress for each model, with the seconds spent so far (they move between
        a conversion's stages, which come minutes apart)."""
        now = time.monotonic()
        return {
            kind: {
                **{key: value for key, value in state.items() if key != "started"},
                "elapsed": round(now - state["started"], 1) if "started" in state else None,
            }
            for kind, state in list(self.preparing.items())
        }


def release_memory() -> None:
    from muselab.quantize import return_freed_memory

    return_freed_memory()
    try:
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    except ImportError:  # pragma: no cover
        pass
