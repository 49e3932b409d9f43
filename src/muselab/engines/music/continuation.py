"""Continuing a clip (audiocraft's `generate_continuation`, transformers' audio prompt): the clip is
fitted to the model (resampled, mixed down or up), encoded by the model's own EnCodec, and its
codes go through the delay pattern as the first tokens; sampling goes on from there, in the same
token loop (and OpenVINO step) as any other piece. `duration` is the whole piece's, the clip
included, as in audiocraft."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from muselab.schemas import MusicRequest, RequestError


def check_request(request: MusicRequest, settings: Any) -> MusicRequest:
    """Before a request queues: its clips (untrusted uploads: a clip to continue, a melody) all
    read and checked before any is kept, then named by their hash from then on."""
    from muselab.uploads import InputStore

    if request.new_only and request.audio_prompt is None:
        raise RequestError("new_only: keeps the new part of a continuation; send audio_prompt too")
    if request.melody is not None and not may_follow_melody(request.model, settings):
        raise RequestError(
            f"melody: {request.model or settings.model_for('music')} cannot follow a melody; "
            "use a melody model (facebook/musicgen-melody)"
        )
    store = InputStore(settings.inputs)
    clips = {field: getattr(request, field) for field in ("audio_prompt", "melody") if getattr(request, field)}
    read = {field: store.read_audio(value, field) for field, value in clips.items()}
    if "audio_prompt" in read:
        samples, rate = read["audio_prompt"]
        check_length(samples.shape[1] / rate, request.duration)
    kept = {field: store.kept_audio(clips[field], *read[field]) for field in read}
    return request.model_copy(update=kept) if kept else request


def may_follow_melody(model: str | None, settings: Any) -> bool:
    """Whether the model a request names (or the configured one) is a melody model, as far as
    this machine can tell before loading it: a catalogue entry or a folder says; another hub id
    may be one (its engine refuses a melody if it is not)."""
    from muselab.families import catalogue_entry, folder_architectures, loader_for

    source = settings.served_models("music").get(model or "") or model or settings.model_for("music")
    if catalogue_entry(source) is None and not folder_architectures(Path(source).expanduser()):
        return True
    return loader_for("music", source).name == "musicgen-melody"


def check_length(seconds: float, duration: float) -> None:
    if seconds >= duration:
        raise RequestError(
            f"duration: the piece ({duration:g} s) includes the clip it continues ({seconds:.1f} s) and must "
            "be longer; ask for a longer duration or send a shorter clip"
        )


def fitted(samples: np.ndarray, rate: int, target_rate: int, channels: int) -> np.ndarray:
    """`samples` (channels, frames) at `target_rate` with `channels` channels (FFmpeg's resampler:
    stereo into mono is mixed down, mono into stereo doubled)."""
    import av

    layout = "mono" if channels == 1 else "stereo"
    source = np.ascontiguousarray(samples[:2] if samples.shape[0] > 2 else samples, dtype=np.float32)
    frame = av.AudioFrame.from_ndarray(source, format="fltp", layout="mono" if source.shape[0] == 1 else "stereo")
    frame.sample_rate = rate
    resampler = av.AudioResampler(format="fltp", layout=layout, rate=target_rate)
    chunks = [converted.to_ndarray() for converted in [*resampler.resample(frame), *resampler.resample(None)]]
    return np.concatenate(chunks, axis=1).astype(np.float32)


def prompt_codes(engine: Any, request: MusicRequest) -> tuple[torch.Tensor, int]:
    """The clip's EnCodec codes (codebooks, frames), as transformers' `generate` makes them from
    the processor's `input_values` (stereo: each side encoded alone, their codebooks interleaved),
    and its length in samples at the model's rate."""
    from muselab.uploads import InputStore

    assert request.audio_prompt is not None and engine.plan.inputs_dir is not None
    samples, rate = InputStore(engine.plan.inputs_dir).load_audio(request.audio_prompt, "audio_prompt")
    channels = int(engine.network.decoder.config.audio_channels)
    audio = fitted(samples, rate, engine.sample_rate, channels)
    check_length(audio.shape[1] / engine.sample_rate, request.duration)
    # What EnCodec's feature extractor hands `generate` as `input_values`: the samples, unchanged.
    encoder = engine.network.audio_encoder
    values = torch.as_tensor(audio, dtype=next(encoder.parameters()).dtype)
    values = values.reshape(1, channels, -1).to(engine.placement.device)
    with torch.inference_mode():
        sides = [encoder.encode(values[:, side : side + 1]).audio_codes[0, 0] for side in range(channels)]
    if channels == 1:
        return sides[0], audio.shape[1]
    codes = torch.empty((2 * sides[0].shape[0], sides[0].shape[1]), dtype=sides[0].dtype, device=sides[0].device)
    codes[::2], codes[1::2] = sides
    return codes, audio.shape[1]
