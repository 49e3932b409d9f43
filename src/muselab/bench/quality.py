"""How far a configuration's output is from the float32 reference drawn with the same seed."""

from __future__ import annotations

import math

import numpy as np

#: The seed of every compared output: with the recipe the same, a difference is the configuration's.
SEED = 1


def psnr(reference: np.ndarray, other: np.ndarray) -> float:
    """Peak signal-to-noise ratio of 8-bit images, in dB (inf when identical)."""
    mse = float(np.mean((reference - other) ** 2))
    return math.inf if mse == 0 else 10 * math.log10(255.0**2 / mse)


def snr(reference: np.ndarray, other: np.ndarray) -> float:
    """Signal-to-noise ratio of `other` against `reference`, in dB."""
    reference, other = np.asarray(reference, np.float64), np.asarray(other, np.float64)
    noise = float(np.sum((reference - other) ** 2))
    return math.inf if noise == 0 else 10 * math.log10(float(np.sum(reference**2)) / noise)
