"""Engines: load a model once, then `generate(request, on_progress, cancel)`."""

from __future__ import annotations

from muselab.config import Kind, Settings
from muselab.devices import choose_placement
from muselab.engines.base import (
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

__all__ = [
    "CancelToken",
    "Cancelled",
    "Engine",
    "GenerationResult",
    "ImageOutput",
    "ModelUnavailable",
    "MusicOutput",
    "ProgressEvent",
    "load_engine",
]


def load_engine(
    kind: Kind, settings: Settings, model: str | None = None, on_progress: ProgressCallback | None = None
) -> Engine:
    """Load the engine for `kind`, using `model` or the one the settings name. `on_progress` hears
    about one-time work while loading (converting a model for OpenVINO)."""
    from muselab.quiet import quiet_libraries

    quiet_libraries()
    model = model or settings.model_for(kind)
    if settings.preset == "tiny" and model == settings.model_for(kind):
        from muselab.testing.tiny import ensure_tiny_model

        ensure_tiny_model(settings.tiny_models_dir, kind)
    placement = choose_placement(settings.device, settings.dtype)
    if kind == "music":
        from muselab.engines.music import MusicEngine

        return MusicEngine.load(
            model,
            placement,
            offline=settings.is_offline(),
            quantize=settings.music_quantize(placement.device),
            backend=settings.backend,
            openvino_cache=settings.openvino_cache,
            cuda_graphs=settings.cuda_graphs,
            on_progress=on_progress,
        )
    from muselab.engines.image import ImageEngine

    fast_decoder = settings.fast_decoder()
    if settings.preset == "tiny" and not settings.fast_decoder_model:
        from muselab.testing.tiny import ensure_tiny_model

        ensure_tiny_model(settings.tiny_models_dir, "decoder")
    return ImageEngine.load(
        model,
        placement,
        safety_checker=settings.safety_checker,
        offline=settings.is_offline(),
        fast_decoder=fast_decoder,
        quantize=settings.image_quantize(),
        low_memory=settings.low_memory,
        compile=settings.compile,
        backend=settings.backend,
        openvino_cache=settings.openvino_cache,
        on_progress=on_progress,
    )
