"""Engines: load a model once, then `generate(request, on_progress, cancel)`."""

from __future__ import annotations

from muselab.config import Settings
from muselab.engines.base import (
    LOADING,
    Cancelled,
    CancelToken,
    Engine,
    GenerationResult,
    ImageOutput,
    ModelUnavailable,
    MusicOutput,
    ProgressCallback,
    ProgressEvent,
)
from muselab.engines.runtime import describe_runtime

__all__ = [
    "CancelToken",
    "Cancelled",
    "Engine",
    "GenerationResult",
    "ImageOutput",
    "ModelUnavailable",
    "MusicOutput",
    "ProgressEvent",
    "describe_runtime",
    "load_engine",
]


def load_engine(
    kind: str, settings: Settings, model: str | None = None, on_progress: ProgressCallback | None = None
) -> Engine:
    """Load the engine for `kind`, using `model` or the one the settings name, through the family
    that serves it (`muselab.families.loader_for`). `on_progress` hears about one-time work while
    loading (converting a model for OpenVINO). With the tiny preset, the family's tiny models that
    stand in for the configured ones are built first if they are not there yet."""
    from muselab.families import loader_for, tiny_models
    from muselab.quiet import quiet_libraries

    quiet_libraries()
    model = model or settings.model_for(kind)
    tiny = settings.preset == "tiny"
    if tiny:
        # The model itself first: its folder tells which family loads it.
        for part, model_of_part in tiny_models().items():
            if model == str(settings.tiny_models_dir / model_of_part.folder):
                _ensure_tiny(settings, part)
    family = loader_for(kind, model)
    if tiny:  # then the parts the family loads beside it
        for part, model_of_part in family.tiny.items():
            if part != kind and settings.model_for(part) == str(settings.tiny_models_dir / model_of_part.folder):
                _ensure_tiny(settings, part)
    assert family.load is not None
    return family.load(model, settings, on_progress)


def _ensure_tiny(settings: Settings, part: str) -> None:
    from muselab.testing.tiny import ensure_tiny_model

    with LOADING:  # built with diffusers and transformers, one thread at a time
        ensure_tiny_model(settings.tiny_models_dir, part)
