"""MusicGen's registration: its request, its catalogue, how it loads and how it makes a tiny model."""

from __future__ import annotations

import math

from muselab.families import CatalogueEntry, Family, TinyModel, lazy
from muselab.schemas import MusicRequest

#: MusicGen's decoder steps a second of audio (EnCodec's 50 frames) and the most extra steps its
#: delay pattern takes (8 codebooks, stereo's; mono has 4): a request's steps before its model is
#: loaded; the loaded engine's `steps` counts them exactly.
TOKENS_A_SECOND, MAX_CODEBOOKS = 50, 8


def max_steps(request: MusicRequest) -> int:
    return (math.ceil(request.duration * TOKENS_A_SECOND) + MAX_CODEBOOKS) * request.num_clips


#: The models muselab knows by name; any other id or folder of the same architecture loads too.
CATALOGUE = (
    CatalogueEntry("facebook/musicgen-small", "music", "MusicGen 300M, mono 32 kHz", default=True),
    CatalogueEntry("facebook/musicgen-medium", "music", "MusicGen 1.5B, mono 32 kHz"),
    CatalogueEntry("facebook/musicgen-large", "music", "MusicGen 3.3B, mono 32 kHz"),
    CatalogueEntry("facebook/musicgen-stereo-small", "music", "MusicGen 300M, stereo 32 kHz"),
    CatalogueEntry("facebook/musicgen-stereo-medium", "music", "MusicGen 1.5B, stereo 32 kHz"),
    CatalogueEntry("facebook/musicgen-stereo-large", "music", "MusicGen 3.3B, stereo 32 kHz"),
)

FAMILY = Family(
    name="musicgen",
    kind="music",
    request=MusicRequest,
    load=lazy("muselab.engines.music:load"),
    unit="audio tokens",
    output="audio",
    title="Music",
    summary='Make music from a text prompt, e.g. muselab music "lo-fi beat with warm piano" -d 8.',
    icon=":material/music_note:",
    catalogue=CATALOGUE,
    architectures=("MusicgenForConditionalGeneration",),
    tiny={"music": TinyModel("tiny-musicgen", lazy("muselab.engines.music.tiny:build_tiny_musicgen"))},
    max_steps=max_steps,
    settings=("quantize", "backend", "low_memory"),
    check=lazy("muselab.engines.music.continuation:check_request"),
)
