"""Generation in this process: the default workers, and what each Ray replica runs inside."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from muselab.config import Settings
from muselab.engines import CancelToken, Engine, ProgressEvent, load_engine
from muselab.engines.base import GenerationResult, engine_result
from muselab.families import family
from muselab.model_manager import ModelManager
from muselab.workers import Order, ProgressCallback, Started


class LocalWorkers:
    def __init__(self, settings: Settings, loader: Callable[..., Engine] = load_engine):
        self.settings = settings
        self.models = ModelManager(settings, settings.max_models, loader)

    def run(
        self, order: Order, on_progress: ProgressCallback, cancel: CancelToken, started: Started
    ) -> GenerationResult:
        loading = self._loading_progress(cancel, on_progress)
        with self._engine(order, loading) as engine:
            request = engine.resolve(order.request)
            started(request, None)
            prepare = getattr(engine, "prepare", None)  # one-time work for this request (LoRAs to fuse)
            if prepare is not None:
                prepare(request, loading)
            started(request, {"device": engine.placement.device, "dtype": engine.placement.dtype_name})
            try:
                return engine.generate(request, on_progress, cancel)
            except Exception as exc:
                # What the engine finished before it stopped (images of a batch, a scene's picture) is kept.
                completed = getattr(exc, "completed", None)
                if completed:
                    exc.partial = engine_result(engine, request, completed)  # type: ignore[attr-defined]
                raise

    @staticmethod
    def _loading_progress(cancel: CancelToken, on_progress: ProgressCallback) -> ProgressCallback:
        """Progress of one-time work while a model loads; a cancel takes effect between its stages."""

        def forward(event: ProgressEvent) -> None:
            cancel.raise_if_cancelled()
            on_progress(event)

        return forward

    @contextmanager
    def _engine(self, order: Order, loading: ProgressCallback) -> Iterator[Engine]:
        """The job's engine, loaded if needed; a composite family's (a scene) borrows its parts'
        engines from the model manager as it goes."""
        job_family = family(order.kind)
        if job_family.compose is None:
            with self.models.use(order.kind, order.model, loading) as engine:
                yield engine
            return

        def parts(kind: str, model: str) -> Any:
            return self.models.use(kind, model, loading)

        with job_family.compose(parts, order.request, self.settings) as engine:
            yield engine

    def slots(self, kind: str, model: str) -> int:
        return 1  # the model manager runs one generation at a time per engine anyway

    def limit(self, kind: str, model: str) -> int | None:
        return None

    def loaded(self) -> list[dict[str, str]]:
        return self.models.loaded()

    def prepare(self, kinds: tuple[str, ...], stopped: Callable[[], bool], redact: Callable[[str], str]) -> None:
        self.models.prepare(kinds, stopped=stopped, redact=redact)

    def preparation(self) -> dict[str, dict[str, Any]]:
        return self.models.preparation()

    def free_memory(self) -> None:
        self.models.free_memory()

    def status(self) -> dict[str, Any]:
        return {"workers": "local", "loaded": self.loaded()}

    def close(self) -> None:
        pass
