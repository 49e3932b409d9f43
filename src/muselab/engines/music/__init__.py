"""MusicGen (transformers): the music family."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from muselab.config import Settings
    from muselab.engines.base import Engine, ProgressCallback


def load(model: str, settings: Settings, on_progress: ProgressCallback | None = None) -> Engine:
    """Load the music model `model` (hub id or folder) to run as `settings` say."""
    from muselab.engines.music.engine import MusicEngine
    from muselab.engines.runtime import music_plan

    return MusicEngine.load(model, music_plan(settings, model=model), on_progress=on_progress)


def load_melody(model: str, settings: Settings, on_progress: ProgressCallback | None = None) -> Engine:
    """Load the melody model `model` (hub id or folder) to run as `settings` say."""
    from muselab.engines.music.melody import MelodyEngine
    from muselab.engines.runtime import music_plan

    return MelodyEngine.load(model, music_plan(settings, model=model), on_progress=on_progress)
