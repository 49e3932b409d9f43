"""A scene: a picture, then its soundtrack, then an MP4 of the two, as one job with one progress bar.

A composite engine: it holds no weights, and borrows the image and music engines from the job
service's model manager (`parts`), so they are loaded, shared and unloaded like any other.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, ExitStack, contextmanager
from dataclasses import dataclass
from typing import Any

from muselab.config import model_label
from muselab.engines.base import (
    Cancelled,
    CancelToken,
    Engine,
    GenerationResult,
    ProgressCallback,
    ProgressEvent,
    wants_previews,
)
from muselab.families import Family, family
from muselab.schemas import SceneRequest

#: Lends a loaded engine of a kind and model for as long as the context lasts.
Parts = Callable[[str, str], AbstractContextManager[Engine]]


@dataclass
class SceneOutput:
    """A scene's picture and soundtrack, each a whole result with its own recipe; `sound` is None
    when the scene stopped after its picture (which is then kept on its own)."""

    picture: GenerationResult
    sound: GenerationResult | None = None

    @property
    def seed(self) -> int:
        return self.picture.outputs[0].seed


class SceneEngine:
    """Runs a `SceneRequest` whose `image_model` and `music_model` name the ids or folders to load.

    With `sequential` (--low-memory) the two models are never loaded together: the picture's model
    is let go (and, the manager holding one model then, unloaded) before the music model loads."""

    kind = "scene"

    def __init__(self, parts: Parts, image_model: str, music_model: str, sequential: bool = False):
        self.parts, self.sequential = parts, sequential
        self.models = {"image": image_model, "music": music_model}
        self.model = f"{image_model} + {music_model}"
        self._held = ExitStack()
        self._image: Any = None
        self._music: Any = None
        self.placement: Any = None  # the image engine's, once loaded: where the job runs

    def __enter__(self) -> SceneEngine:
        return self

    def __exit__(self, *exc: object) -> None:
        self._held.close()

    @property
    def model_name(self) -> str:
        return self.model

    def _loaded_image(self) -> Any:
        if self._image is None:
            self._image = self._held.enter_context(self.parts("image", self.models["image"]))
            self.placement = self._image.placement
            if not self.sequential:
                self._music = self._held.enter_context(self.parts("music", self.models["music"]))
        return self._image

    def resolve(self, request: SceneRequest) -> SceneRequest:
        """Every default filled in by the image model (seed, size, steps); loads the models."""
        picture = self._loaded_image().resolve(request.image_request())
        return request.model_copy(
            update={
                "seed": picture.seed,
                "width": picture.width,
                "height": picture.height,
                "steps": picture.steps,
                "speed": picture.speed,
                # By label, as clients name them (the request came naming the ids or folders).
                "image_model": model_label(self.models["image"]),
                "music_model": model_label(self.models["music"]),
            }
        )

    def generate(
        self, request: SceneRequest, on_progress: ProgressCallback | None = None, cancel: CancelToken | None = None
    ) -> GenerationResult:
        cancel = cancel or CancelToken()
        started = time.perf_counter()
        image_engine = self._loaded_image()
        image_request = image_engine.resolve(request.image_request())
        music_family = family("music")
        image_steps = image_engine.steps(image_request)
        totals = {"total": image_steps + _music_steps(self._music, music_family, request.music_request())}

        def part_progress(offset: int, stage: str) -> ProgressCallback:
            def forward(event: ProgressEvent) -> None:
                if on_progress is not None:
                    on_progress(
                        ProgressEvent(
                            stage=stage if event.stage == "generating" else event.stage,
                            step=offset + event.step,
                            total=totals["total"],
                            elapsed=time.perf_counter() - started,
                            eta=event.eta,
                            preview=event.preview,
                        )
                    )

            forward.previews = wants_previews(on_progress)  # type: ignore[attr-defined]
            return forward

        try:
            picture = image_engine.generate(image_request, part_progress(0, "image"), cancel)
        except Cancelled:
            raise Cancelled() from None  # nothing of the scene is finished
        del image_engine  # sequential: nothing may hold the image engine once its model is let go
        try:
            with self._music_engine() as music_engine:
                music_request = music_engine.resolve(request.music_request())
                # Known exactly once the model is loaded; never more than the estimate, so the bar
                # never moves back.
                totals["total"] = image_steps + music_engine.steps(music_request)
                sound = music_engine.generate(music_request, part_progress(image_steps, "music"), cancel)
        except Exception as exc:
            # The picture is made: it is kept, whatever stopped its soundtrack (cancel, time limit, error).
            exc.completed = [SceneOutput(picture)]  # type: ignore[attr-defined]
            raise
        return GenerationResult(
            request=request,
            outputs=[SceneOutput(picture, sound)],
            model_name=f"{picture.model_name} + {sound.model_name}",
            device=picture.device,
            dtype=picture.dtype,
            seconds=time.perf_counter() - started,
        )

    @contextmanager
    def _music_engine(self) -> Iterator[Any]:
        if self._music is not None:
            yield self._music
            return
        # Let the image model go (and the manager unload it) before the music model loads.
        self._image = None
        self._held.close()
        with self.parts("music", self.models["music"]) as music_engine:
            yield music_engine

    def steps(self, request: SceneRequest) -> int:
        return max_steps(request)


def _music_steps(engine: Any, music_family: Family, request: Any) -> int:
    if engine is not None:
        return engine.steps(engine.resolve(request))
    assert music_family.max_steps is not None
    return music_family.max_steps(request)


def max_steps(request: SceneRequest) -> int:
    image, music = family("image"), family("music")
    assert image.max_steps is not None and music.max_steps is not None
    return image.max_steps(request.image_request()) + music.max_steps(request.music_request())


def check_request(request: SceneRequest, settings: Any) -> SceneRequest:
    """The picture's speed tier decided as an image's is (`speed.check_request`: `auto` by this
    machine, turbo's own model where the scene names no image model)."""
    from muselab.engines.image.speed import check_request as check_image

    picture = check_image(request.image_request(), settings)
    return request.model_copy(update={"speed": picture.speed, "image_model": picture.model})


def compose(parts: Parts, request: SceneRequest, settings: Any) -> SceneEngine:
    assert request.image_model is not None and request.music_model is not None
    return SceneEngine(parts, request.image_model, request.music_model, sequential=settings.low_memory)


FAMILY = Family(
    name="scene",
    kind="scene",
    request=SceneRequest,
    load=None,
    output="video",
    title="Scene",
    summary="A picture and its soundtrack from one prompt, saved as PNG, WAV and an MP4 of both.",
    icon=":material/movie:",
    max_steps=max_steps,
    compose=compose,
    check=check_request,
    settings=("quantize", "backend", "low_memory"),
)
