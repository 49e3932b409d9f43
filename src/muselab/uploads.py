"""Pictures and clips a client sends (an img2img input, a mask, a clip to continue): untrusted
bytes, bounded and decoded safely, then kept by content hash beside the outputs so a recipe can
name them and re-run.

- Bounded: at most MAX_UPLOAD_BYTES, and at most MAX_UPLOAD_PIXELS, checked from the header
  before any pixel is decoded (a 30000x30000 PNG of a few KB would otherwise take gigabytes).
- Only PNG, JPEG and WebP are decoded (Pillow is told no other format); a truncated file is an
  error, not a half-grey picture; EXIF orientation is applied, as a phone's photo is meant to look.
- Clips: WAV, FLAC, OGG or MP3 only (libsndfile, then PyAV told the container is MP3), at most
  MAX_UPLOAD_BYTES and MAX_AUDIO_SECONDS (from the header; an MP3's also counted while decoding,
  as its header may lie); kept as 32-bit float WAV at their own rate and channels.
- Never a path from the client: a stored input is named `sha256:<64 hex>`, its file
  `<data dir>/inputs/<hex>.png` (a clip's `<hex>.wav`), and that pattern is all a reference may be.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import io
import re
import warnings
from pathlib import Path
from typing import Any

from muselab.schemas import HISTORY_OUTPUT, RequestError, field_option

MAX_UPLOAD_BYTES = 20 * 2**20
#: 16.7 megapixels (4096x4096): twice the largest picture muselab makes (2048x2048) on each side.
MAX_UPLOAD_PIXELS = 4096 * 4096
FORMATS = ("PNG", "JPEG", "WEBP")
REFERENCE = re.compile(r"^sha256:([0-9a-f]{64})$")
_DATA_URL = re.compile(r"^data:(image|audio)/[a-z0-9.+-]+;base64,", re.IGNORECASE)
#: The longest clip accepted: a long-form piece's melody (5 minutes).
MAX_AUDIO_SECONDS = 300
AUDIO_FORMATS = ("wav", "flac", "ogg", "mp3")
PICTURE = "PNG, JPEG or WebP picture"
CLIP = "WAV, FLAC, OGG or MP3 clip"


def is_reference(value: str) -> bool:
    return REFERENCE.match(value) is not None


def decode_base64(text: str, field: str, what: str = PICTURE) -> bytes:
    """The bytes of a base64 upload as clients send it, with or without a `data:image/...;base64,`
    (or `data:audio/...`) prefix (A1111's `webuiapi` sends either)."""
    payload = _DATA_URL.sub("", text.strip(), count=1)
    if len(payload) > (MAX_UPLOAD_BYTES * 4) // 3 + 4:
        raise RequestError(f"{field}: the upload is over {MAX_UPLOAD_BYTES // 2**20} MB")
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        prefix = "data:audio/wav;base64," if what == CLIP else "data:image/png;base64,"
        raise RequestError(
            f"{field}: expected a {what} in base64 (optionally after '{prefix}'), or a stored input's "
            "'sha256:...' reference"
        ) from None


def decode_audio(data: bytes, field: str) -> tuple[Any, int]:
    """Samples (channels, frames) as float32 and the sample rate, from untrusted `data`, checked as
    the module says: libsndfile reads WAV, FLAC and OGG (and MP3 where it can); PyAV reads MP3."""
    import numpy as np
    import soundfile

    what = f"{field}: a {CLIP} of at most {MAX_AUDIO_SECONDS} s"
    if len(data) > MAX_UPLOAD_BYTES:
        raise RequestError(f"{field}: the clip is over {MAX_UPLOAD_BYTES // 2**20} MB")
    try:
        info = soundfile.info(io.BytesIO(data))
    except (soundfile.LibsndfileError, RuntimeError, TypeError):
        return _decode_mp3(data, what)
    if info.format.lower() not in AUDIO_FORMATS:
        raise RequestError(f"{what}; this is not one ({info.format})")
    if info.frames > MAX_AUDIO_SECONDS * info.samplerate:
        raise RequestError(f"{what}; this one is {info.frames / info.samplerate:.0f} s long")
    try:
        samples, rate = soundfile.read(io.BytesIO(data), dtype="float32", always_2d=True)
    except (soundfile.LibsndfileError, RuntimeError) as exc:
        raise RequestError(f"{what}; this one cannot be read whole ({exc})") from None
    if not len(samples):
        raise RequestError(f"{what}; this one holds no sound")
    return np.ascontiguousarray(samples.T), int(rate)


def _decode_mp3(data: bytes, what: str) -> tuple[Any, int]:
    """An MP3 through PyAV, told the container is MP3 (no other format is probed)."""
    import av
    import numpy as np

    try:
        with av.open(io.BytesIO(data), mode="r", format="mp3") as container:
            if not container.streams.audio:
                raise RequestError(f"{what}; this is not one")
            if container.duration is not None and container.duration / av.time_base > MAX_AUDIO_SECONDS + 1:
                raise RequestError(f"{what}; this one is {container.duration / av.time_base:.0f} s long")
            stream = container.streams.audio[0]
            rate = int(stream.rate or 0)
            planar = av.AudioResampler(format="fltp", layout=stream.layout.name, rate=rate)
            chunks, frames = [], 0
            for frame in [*container.decode(stream), None]:  # None: what the resampler still holds
                for converted in planar.resample(frame):
                    chunks.append(converted.to_ndarray())
                    frames += chunks[-1].shape[1]
                if frames > MAX_AUDIO_SECONDS * rate:  # the header may understate it
                    raise RequestError(f"{what}; this one is longer")
    except RequestError:
        raise
    except (av.error.FFmpegError, ValueError, IndexError, ZeroDivisionError):
        raise RequestError(f"{what}; this is not one") from None
    if not frames:
        raise RequestError(f"{what}; this one holds no sound")
    return np.concatenate(chunks, axis=1).astype(np.float32), rate


def decode_image(data: bytes, field: str, mode: str = "RGB") -> Any:
    """A PIL image from untrusted `data`, checked as the module says, converted to `mode`."""
    from PIL import Image, ImageOps

    if len(data) > MAX_UPLOAD_BYTES:
        raise RequestError(f"{field}: the picture is over {MAX_UPLOAD_BYTES // 2**20} MB")
    what = f"{field}: a PNG, JPEG or WebP picture of at most {MAX_UPLOAD_PIXELS // 10**6} megapixels"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data), formats=FORMATS)
            width, height = image.size
            if width * height > MAX_UPLOAD_PIXELS:
                raise RequestError(f"{what}; this one is too large ({width}x{height})")
            image.load()  # decodes now: a truncated file fails here, not later in the engine
            image = ImageOps.exif_transpose(image)
    except RequestError:
        raise
    except Image.UnidentifiedImageError:
        raise RequestError(f"{what}; this is not one") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:  # Pillow's own guard, first
        raise RequestError(f"{what}; this one is too large ({exc})") from None
    except (OSError, ValueError, SyntaxError) as exc:
        raise RequestError(f"{what}; this one cannot be read whole ({exc})") from None
    return image.convert(mode)


class InputStore:
    """Input pictures and clips kept by content hash under `folder` (`<data dir>/inputs`)."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)

    def keep(self, image: Any) -> str:
        """Store `image` as PNG (once: the same picture twice is one file); its reference."""
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        return self._keep_bytes(buffer.getvalue(), "png")

    def _keep_bytes(self, data: bytes, suffix: str) -> str:
        from muselab.media import write_new_file

        digest = hashlib.sha256(data).hexdigest()
        target = self.folder / f"{digest}.{suffix}"
        if not target.exists():
            written = write_new_file(target, lambda handle: handle.write(data))
            if written != target:  # another writer stored the same file meanwhile
                written.unlink(missing_ok=True)
        return f"sha256:{digest}"

    def accept(self, value: str, field: str, mode: str = "RGB") -> str:
        """A client's picture (base64) checked and stored, or a reference checked to exist: the
        reference a request then carries."""
        return self.kept(value, self.read(value, field, mode))

    def read(self, value: str, field: str, mode: str = "RGB") -> Any:
        """The picture a request's field holds (base64, or a stored input's reference), checked and
        decoded but not stored: a request with several pictures stores none until all are good."""
        if is_reference(value):
            return self.load(value, field, mode)
        return decode_image(decode_base64(value, field), field, mode)

    def kept(self, value: str, image: Any) -> str:
        """The reference for a field's picture read by `read`: stored now if it was sent."""
        return value if is_reference(value) else self.keep(image)

    def load(self, reference: str, field: str, mode: str = "RGB") -> Any:
        """The stored picture a reference names."""
        match = REFERENCE.match(reference)
        if match is None:
            raise RequestError(f"{field}: expected a stored input's 'sha256:<64 hex digits>' reference")
        path = self.folder / f"{match.group(1)}.png"
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            raise RequestError(f"{field}: no stored input {reference} here (send the picture itself)") from None
        return decode_image(data, field, mode)

    def keep_audio(self, samples: Any, rate: int) -> str:
        """Store a clip (channels, frames) as float WAV (once per clip); its reference."""
        return self._keep_bytes(float_wav(samples, rate), "wav")

    def read_audio(self, value: str, field: str) -> tuple[Any, int]:
        """The clip a request's field holds (base64, or a stored clip's reference), checked."""
        if is_reference(value):
            return self.load_audio(value, field)
        return decode_audio(decode_base64(value, field, CLIP), field)

    def kept_audio(self, value: str, samples: Any, rate: int) -> str:
        """The reference for a field's clip read by `read_audio`: stored now if it was sent."""
        return value if is_reference(value) else self.keep_audio(samples, rate)

    def load_audio(self, reference: str, field: str) -> tuple[Any, int]:
        """The stored clip a reference names: (channels, frames) float32 and its rate."""
        import soundfile

        match = REFERENCE.match(reference)
        if match is None:
            raise RequestError(f"{field}: expected a stored clip's 'sha256:<64 hex digits>' reference")
        try:
            samples, rate = soundfile.read(self.folder / f"{match.group(1)}.wav", dtype="float32", always_2d=True)
        except (FileNotFoundError, soundfile.LibsndfileError):
            raise RequestError(f"{field}: no stored clip {reference} here (send the clip itself)") from None
        return samples.T, int(rate)


def from_history(request: Any, store: Any) -> Any:
    """Upload fields may name an output of the history ("output:ID": a clip to continue, a melody,
    a picture to edit): its file goes in as if the client had sent it, and is checked as any upload
    is. Only files the history owns (`HistoryStore.owned_file`) can be named."""
    updates = {}
    for name, info in type(request).model_fields.items():
        value = getattr(request, name)
        if not field_option(info).upload or not isinstance(value, str) or not value.startswith(HISTORY_OUTPUT):
            continue
        output_id = value.removeprefix(HISTORY_OUTPUT)
        record = store.get_output(output_id)
        path = None if record is None else store.owned_file(record)
        if path is None:
            raise RequestError(f"{name}: no output '{output_id[:40]}' in the history")
        updates[name] = base64.b64encode(path.read_bytes()).decode()
    return request.model_copy(update=updates) if updates else request


def float_wav(samples: Any, rate: int) -> bytes:
    """A clip (channels, frames) as a 32-bit float WAV, the same bytes for the same clip: what
    libsndfile writes carries a PEAK chunk with the time of writing, so a clip kept twice would
    get two hashes."""
    import struct

    import numpy as np

    channels = samples.shape[0]
    data = np.ascontiguousarray(samples.T, dtype="<f4").tobytes()
    fmt = struct.pack("<HHIIHH", 3, channels, rate, rate * 4 * channels, 4 * channels, 32)  # 3: IEEE float
    chunks = b"fmt " + struct.pack("<I", len(fmt)) + fmt + b"data" + struct.pack("<I", len(data)) + data
    return b"RIFF" + struct.pack("<I", 4 + len(chunks)) + b"WAVE" + chunks
