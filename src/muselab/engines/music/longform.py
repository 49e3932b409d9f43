"""Pieces longer than the model's context, as audiocraft makes them (`extend_stride`): the first
window is a whole context (30 s) long; each next one is prompted with the last `context - stride`
frames of the piece so far and adds `stride` frames. The windows' codes join into one code
sequence, which EnCodec decodes as one piece, so the seams are as smooth as the rest.

A clip to continue is the first window's prompt, as audiocraft does it, though at most
`context - stride` frames of it (its end) when the piece needs more than one window: a longer
prompt would leave a window too little room for new audio."""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class Window:
    prompt: int  # frames of the piece so far that it continues (the end of it)
    new: int  # frames it adds


def windows(total: int, given: int, context: int, stride: int) -> list[Window]:
    """The windows that make `total` frames, the first `given` of which exist (a clip to
    continue), with at most `context` frames a window and `stride` new frames a window after the
    first. One window when the piece fits the context, as in transformers' `generate`."""
    if total <= context:
        return [Window(given, total - given)]
    plan, have = [], given
    while have < total:
        prompt = min(have, context - stride)
        new = min(total - have, context - prompt)
        plan.append(Window(prompt, new))
        have += new
    return plan


def window_steps(window: Window, codebooks: int) -> int:
    """Decoder steps a window takes: its prompt's positions, its new frames, and the delay
    pattern's `codebooks - 1` more before the last codebook's last frame is drawn."""
    return window.prompt + window.new + codebooks - 1


def piece_frames(duration: float, frame_rate: float) -> int:
    """Frames for `duration` seconds, and one spare: the codec's output can come out a few
    samples short of whole frames, and the audio is cut to the exact length."""
    return math.ceil(duration * frame_rate) + 1


def piece_steps(duration: float, frame_rate: float, context: int, stride: float, codebooks: int, given: int = 0) -> int:
    """Decoder steps for one clip of `duration` seconds, windows included."""
    frames = piece_frames(duration, frame_rate)
    return plan_steps(windows(frames, given, context, round(stride * frame_rate)), frames, codebooks)


def plan_steps(plan: list[Window], frames: int, codebooks: int) -> int:
    """The progress steps of one clip made by `plan`: every window's decoder steps, and the
    decoding of its `frames`."""
    return sum(window_steps(window, codebooks) for window in plan) + decode_steps(frames)


#: A long piece is decoded by EnCodec in chunks of this many frames (30 s), each with
#: `DECODE_CONTEXT` frames more on either side, which its neighbours share: EnCodec's activations
#: grow with the audio (about 1 GB for 30 s at 32 kHz), so a 5-minute piece decoded at once would
#: take some 11 GB. Chunks overlap by a second and cross-fade over its middle half-second.
DECODE_CHUNK, DECODE_CONTEXT, DECODE_FADE = 1500, 50, 25
#: Progress counts a decoded chunk of n frames as n / DECODE_FRAMES_A_STEP decoder steps: EnCodec
#: decodes a frame in about an eighth of a token's time on musicgen-small.
DECODE_FRAMES_A_STEP = 8


def decode_chunks(frames: int) -> list[tuple[int, int]]:
    """The (start, end) frames each chunk owns: one chunk up to a chunk and its context, else
    chunks of DECODE_CHUNK (the last one up to DECODE_CONTEXT longer, never shorter than that)."""
    if frames <= DECODE_CHUNK + DECODE_CONTEXT:
        return [(0, frames)]
    starts = list(range(0, frames, DECODE_CHUNK))
    if frames - starts[-1] < DECODE_CONTEXT:
        starts.pop()
    return [(start, end) for start, end in zip(starts, [*starts[1:], frames], strict=True)]


def decode_steps(frames: int) -> int:
    """The progress steps decoding a piece of `frames` counts (none when it decodes in one go)."""
    chunks = decode_chunks(frames)
    return 0 if len(chunks) == 1 else sum((end - start) // DECODE_FRAMES_A_STEP for start, end in chunks)
