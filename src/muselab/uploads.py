"""Pictures a client sends (an img2img input, later a mask): untrusted bytes, bounded and decoded
safely, then kept by content hash beside the outputs so a recipe can name them and re-run.

- Bounded: at most MAX_UPLOAD_BYTES, and at most MAX_UPLOAD_PIXELS, checked from the header
  before any pixel is decoded (a 30000x30000 PNG of a few KB would otherwise take gigabytes).
- Only PNG, JPEG and WebP are decoded (Pillow is told no other format); a truncated file is an
  error, not a half-grey picture; EXIF orientation is applied, as a phone's photo is meant to look.
- Never a path from the client: a stored input is named `sha256:<64 hex>`, its file
  `<data dir>/inputs/<hex>.png`, and that pattern is all a reference may be.
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

from muselab.schemas import RequestError

MAX_UPLOAD_BYTES = 20 * 2**20
#: 16.7 megapixels (4096x4096): twice the largest picture muselab makes (2048x2048) on each side.
MAX_UPLOAD_PIXELS = 4096 * 4096
FORMATS = ("PNG", "JPEG", "WEBP")
REFERENCE = re.compile(r"^sha256:([0-9a-f]{64})$")
_DATA_URL = re.compile(r"^data:image/[a-z0-9.+-]+;base64,", re.IGNORECASE)


def is_reference(value: str) -> bool:
    return REFERENCE.match(value) is not None


def decode_base64(text: str, field: str) -> bytes:
    """The bytes of a base64 picture as clients send it, with or without a `data:image/...;base64,`
    prefix (A1111's `webuiapi` sends either)."""
    payload = _DATA_URL.sub("", text.strip(), count=1)
    if len(payload) > (MAX_UPLOAD_BYTES * 4) // 3 + 4:
        raise RequestError(f"{field}: the picture is over {MAX_UPLOAD_BYTES // 2**20} MB")
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise RequestError(
            f"{field}: expected a PNG, JPEG or WebP picture in base64 (optionally after "
            "'data:image/png;base64,'), or a stored input's 'sha256:...' reference"
        ) from None


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
    """Input pictures kept by content hash under `folder` (`<data dir>/inputs`)."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)

    def keep(self, image: Any) -> str:
        """Store `image` as PNG (once: the same picture twice is one file); its reference."""
        from muselab.media import write_new_file

        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        data = buffer.getvalue()
        digest = hashlib.sha256(data).hexdigest()
        target = self.folder / f"{digest}.png"
        if not target.exists():
            written = write_new_file(target, lambda handle: handle.write(data))
            if written != target:  # another writer stored the same picture meanwhile
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
