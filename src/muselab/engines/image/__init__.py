"""Stable Diffusion (diffusers): the image family."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from muselab.config import Settings
    from muselab.engines.base import Engine, ProgressCallback


def load(model: str, settings: Settings, on_progress: ProgressCallback | None = None) -> Engine:
    """Load the image model `model` (hub id or folder) to run as `settings` say."""
    from muselab.engines.image.engine import ImageEngine
    from muselab.engines.runtime import image_plan

    return ImageEngine.load(model, image_plan(settings, model=model), on_progress=on_progress)
