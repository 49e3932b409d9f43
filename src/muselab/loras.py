"""LoRA files: the folder they live in, A1111's `<lora:name:weight>` prompt syntax, and the hashes
that name a LoRA in a file's recipe. Only safetensors are read (a pickle can run code); the
fusing into a model's weights is the image engine's (`engines/image/engine.py`)."""

from __future__ import annotations

import functools
import hashlib
import json
import re
import struct
from dataclasses import dataclass
from pathlib import Path

#: A LoRA's name is its file's stem: no folders, nothing a client could turn into a path.
NAME_PATTERN = r"[A-Za-z0-9][A-Za-z0-9_.\- ]{0,99}"
MAX_WEIGHT = 4.0
MAX_LORAS = 8
#: A safetensors header is JSON; anything past this is not a LoRA's.
MAX_HEADER_BYTES = 16 * 1024 * 1024
_PICKLE_SUFFIXES = (".pt", ".pth", ".ckpt", ".bin")
_TAG = re.compile(r"<lora:([^:>]+)(?::([^:>]*))?(?::[^>]*)?>", re.IGNORECASE)
_CHOICE = re.compile(rf"^\s*({NAME_PATTERN}?)\s*(?::\s*([-+]?\d+(?:\.\d+)?|[-+]?\.\d+))?\s*$")


class LoraError(ValueError):
    """A LoRA that cannot be used, named with its file and what is wrong."""


@dataclass(frozen=True)
class LoraFile:
    name: str
    path: Path

    @property
    def hash(self) -> str:
        return short_hash(self.path)


def parse_choice(text: str) -> tuple[str, float]:
    """`NAME` or `NAME:WEIGHT` (weight 1 when left out) -> (name, weight)."""
    match = _CHOICE.match(text)
    if not match or not match.group(1) or ".." in match.group(1):
        raise ValueError(
            f"'{text}' is not NAME or NAME:WEIGHT (a LoRA file's name without .safetensors, "
            "letters, digits, '_', '-', '.', spaces; then an optional weight such as 0.8)"
        )
    weight = float(match.group(2)) if match.group(2) is not None else 1.0
    if abs(weight) > MAX_WEIGHT:
        raise ValueError(f"'{text}': a LoRA weight is between -{MAX_WEIGHT:g} and {MAX_WEIGHT:g}")
    return match.group(1).strip(), weight


def format_choice(name: str, weight: float) -> str:
    return f"{name}:{weight:g}"


def split_prompt(prompt: str) -> tuple[str, list[str]]:
    """A1111's prompt syntax: `<lora:name:0.8>` tags come out of the prompt (they are not words
    for the text encoder) and become LoRA choices, in order; the rest of the prompt is tidied."""
    choices: list[str] = []

    def take(match: re.Match[str]) -> str:
        weight = match.group(2)
        choices.append(f"{match.group(1).strip()}:{weight.strip()}" if weight and weight.strip() else match.group(1))
        return ""

    text = _TAG.sub(take, prompt)
    text = re.sub(r"\s*,\s*(,\s*)+", ", ", text)  # "a fox, , watercolor" where a tag stood
    text = re.sub(r"[ \t]{2,}", " ", text).strip().strip(",").strip()
    return text, choices


def prompt_with_tags(prompt: str, choices: list[str]) -> str:
    """The prompt as A1111 writes it: LoRA tags after the words, so its readers load them too."""
    tags = " ".join(f"<lora:{choice}>" for choice in choices)
    return f"{prompt} {tags}" if tags else prompt


def available(folder: Path) -> list[LoraFile]:
    """The LoRAs in `folder` (safetensors files, not in subfolders), by name."""
    if not folder.is_dir():
        return []
    found = [
        LoraFile(path.stem, path)
        for path in folder.iterdir()
        if path.suffix == ".safetensors" and path.is_file() and re.fullmatch(NAME_PATTERN, path.stem)
    ]
    return sorted(found, key=lambda lora: lora.name.lower())


def find(folder: Path, name: str) -> LoraFile:
    """The LoRA called `name` in `folder`, found by listing the folder (a client's name is never
    joined into a path); a pickle of that name is refused, naming the file."""
    for lora in available(folder):
        if lora.name == name:
            check_header(lora.path)
            return lora
    pickles = [folder / f"{name}{suffix}" for suffix in _PICKLE_SUFFIXES]
    for path in pickles if re.fullmatch(NAME_PATTERN, name) and folder.is_dir() else ():
        if path.is_file():
            raise LoraError(
                f"LoRA '{name}': {path} is a pickle ({path.suffix}), which can run code when loaded; "
                "muselab reads LoRAs only as .safetensors (convert it, or get the safetensors release)."
            )
    names = ", ".join(lora.name for lora in available(folder)) or "none"
    raise LoraError(f"No LoRA named '{name}' in {folder} (there: {names}); put NAME.safetensors there.")


def check_header(path: Path) -> dict:
    """The safetensors header of `path`, read without loading a tensor; a file that is not one is
    refused, naming it."""
    try:
        with path.open("rb") as handle:
            (size,) = struct.unpack("<Q", handle.read(8))
            if not 2 <= size <= MAX_HEADER_BYTES:
                raise ValueError(f"a header of {size} bytes")
            header = json.loads(handle.read(size))
        if not isinstance(header, dict) or not any(key != "__metadata__" for key in header):
            raise ValueError("no tensors")
    except (OSError, ValueError, struct.error) as exc:
        raise LoraError(f"LoRA file {path} is not a readable safetensors file ({exc}).") from None
    return header


def short_hash(path: Path) -> str:
    """A1111's LoRA hash (the "addnet" hash: sha256 of the tensor data after the safetensors
    header, first 12 hex digits), the one A1111 and Civitai write in `Lora hashes`. Remembered
    while the file's size and time stay the same: a LoRA is often hundreds of MB."""
    stat = path.stat()
    return _hash(path.resolve(), stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=256)
def _hash(path: Path, size: int, mtime_ns: int) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        (size,) = struct.unpack("<Q", handle.read(8))
        handle.seek(8 + size)
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()[:12]
