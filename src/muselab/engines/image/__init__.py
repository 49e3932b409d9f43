"""Stable Diffusion (diffusers): the image family."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from muselab.config import Settings
    from muselab.engines.base import Engine, ProgressCallback


def load(model: str, settings: Settings, on_progress: ProgressCallback | None = None) -> Engine:
    """Load the image model `model` (hub id or folder) to run as `settings` say."""
    from muselab.engines.image.engine import ImageEngine, default_loras
    from muselab.engines.runtime import image_plan

    plan = image_plan(settings, model=model)
    # The LoRAs the speed tier a request gets by default fuses (fast: the LCM-LoRA), so that the
    # first image, and the background preparation, load and convert the weights that will run.
    loras = default_loras(plan, settings)
    return ImageEngine.load(model, plan, on_progress=on_progress, loras=loras, loras_may_fail=True)
