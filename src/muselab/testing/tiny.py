"""Tiny random-weight models, built offline: what every family's tiny builder shares (tokenizers
that need no download, atomic saves), and building them all (`build_tiny_models`).

Each family builds its own (`engines/music/tiny.py`, `engines/image/tiny.py`, registered as
`Family.tiny`): the same *structure* as the real checkpoints (same classes, same folder layout,
tokenizers and processors included) but only a few hundred thousand parameters, so the product's
real loading path (`from_pretrained` on a folder) runs in tests and demos on a machine that cannot
download weights. Their output is noise, by design.
"""

from __future__ import annotations

import shutil
import string
import tempfile
from collections.abc import Callable
from pathlib import Path

TINY_SEED = 0
#: Characters the tiny tokenizers know; anything else maps to an unknown token.
_TINY_CHARS = string.ascii_lowercase + string.digits + ",.-'!?"


def build_tiny_t5_tokenizer():
    """A character-level T5 tokenizer (Unigram) that fits a 100-token vocabulary."""
    from transformers import T5Tokenizer

    vocab: list[tuple[str, float]] = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    vocab += [(f"\u2581{c}", -3.0) for c in string.ascii_lowercase]
    vocab += [(c, -4.0) for c in _TINY_CHARS]
    return T5Tokenizer(vocab=vocab, extra_ids=0)


def build_tiny_clip_tokenizer():
    """A byte-level CLIP tokenizer with no merges: every prompt tokenizes, one byte a token."""
    from transformers import CLIPTokenizer

    chars = list(_bytes_to_unicode().values())
    tokens = ["<|startoftext|>", "<|endoftext|>", *chars, *(c + "</w>" for c in chars)]
    return CLIPTokenizer(vocab={t: i for i, t in enumerate(tokens)}, merges=[], model_max_length=77)


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible map from bytes to printable characters."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    codes = printable[:]
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            codes.append(256 + extra)
            extra += 1
    return dict(zip(printable, map(chr, codes), strict=True))


def save_atomically(path: str | Path, save: Callable[[Path], object], replace: bool) -> Path:
    """Save into a temporary sibling folder, then rename, so a half-built model is never loaded.

    With `replace=False` a folder that appeared meanwhile (another process built it) is kept.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}-", dir=path.parent))
    try:
        save(tmp)
        if path.exists() and replace:
            shutil.rmtree(path)
        try:
            tmp.rename(path)
        except OSError:
            if replace or not path.is_dir():
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return path


def build_tiny_models(directory: str | Path, replace: bool = True) -> dict[str, Path]:
    """Write every family's tiny models under `directory` (tiny-musicgen/, tiny-stable-diffusion/, ...)."""
    from muselab.families import tiny_models

    directory = Path(directory)
    return {kind: tiny.build(directory / tiny.folder, replace) for kind, tiny in tiny_models().items()}


def ensure_tiny_model(directory: str | Path, kind: str) -> Path:
    """The tiny model of `kind` under `directory`, built first if it is not there yet."""
    from muselab.families import tiny_models

    tiny = tiny_models()[kind]
    path = Path(directory) / tiny.folder
    if not path.is_dir() or not any(path.iterdir()):  # written whole (`save_atomically`) or not at all
        tiny.build(path, False)
    return path
