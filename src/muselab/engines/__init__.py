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
    "describe_runtime",
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
        from muselab.engines.music.engine import MusicEngine

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
    from muselab.engines.image.engine import ImageEngine

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


def describe_runtime(settings: Settings, public: bool = False) -> dict[str, str]:
    """Where and how the engines will run with `settings`, and why: what `muselab doctor`, the API's
    /api/info and the UI's front page show, so a user can see why generation is as fast as it is.
    `*_engine` is `torch`, `openvino` or `unavailable`; `*_backend` says more. `public` names no
    folder of the machine and no library version (the API may be exposed, and versions tell an
    attacker which known holes to try)."""
    from muselab.engines.image.openvino import openvino_version

    placement = choose_placement(settings.device, settings.dtype)
    where = "" if public else f" {openvino_version()}"
    cached = "" if public else f", cached in {settings.openvino_cache}"
    image_engine, image_backend = _image_backend(settings, placement.device, where, cached)
    music_engine, music_backend = _music_backend(settings, placement.device, where, cached)
    return {
        "device": placement.device,
        "dtype": placement.dtype_name,
        "reason": placement.reason,
        "quantize_music": settings.music_quantize(placement.device),
        "quantize_image": settings.image_quantize(),
        "image_engine": image_engine,
        "image_backend": image_backend,
        "music_engine": music_engine,
        "music_backend": music_backend,
    }


def _image_backend(settings: Settings, device: str, version: str, cached: str) -> tuple[str, str]:
    from muselab.engines.image.engine import auto_uses_openvino
    from muselab.engines.image.openvino import openvino_available

    quantize = settings.image_quantize()
    usable = auto_uses_openvino(device, quantize, settings.low_memory, settings.compile)
    if quantize == "int8-full" and (settings.backend == "torch" or (settings.backend == "auto" and not usable)):
        return (
            "unavailable",
            "UNAVAILABLE: --quantize int8-full needs the OpenVINO backend (see `muselab image --help`)",
        )
    if settings.backend == "torch":
        return "torch", "torch"
    if settings.backend == "auto":
        if not usable:
            return "torch", "torch" if openvino_available() else "torch (openvino is not installed)"
    elif not openvino_available():
        return "unavailable", "openvino (NOT INSTALLED: pip install openvino)"
    return "openvino", f"openvino{version} (models converted once{cached})"


def _music_backend(settings: Settings, device: str, version: str, cached: str) -> tuple[str, str]:
    from muselab.engines.image.openvino import OpenVinoUnavailable, openvino_available
    from muselab.engines.music.engine import music_backend

    try:
        backend = music_backend(settings.backend, "the music model", device, settings.music_quantize(device))
    except OpenVinoUnavailable as exc:
        return "unavailable", f"openvino (UNAVAILABLE: {str(exc).splitlines()[0]})"
    if backend == "torch":
        return "torch", "torch" if openvino_available() else "torch (openvino is not installed)"
    return "openvino", f"openvino{version} (decoder converted once{cached})"
