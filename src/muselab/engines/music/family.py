"""MusicGen's registration: its request, its catalogue, how it loads and how it makes a tiny model."""

from __future__ import annotations

import dataclasses

from muselab.engines.music.longform import piece_steps
from muselab.families import CatalogueEntry, Family, TinyModel, lazy
from muselab.schemas import MusicRequest

#: MusicGen's frames a second of audio (EnCodec's 50), the real checkpoints' window (30 s and a
#: spare frame: `MusicEngine.context`) and the most extra steps its delay pattern takes (8
#: codebooks, stereo's; mono has 4): a request's steps before its model is loaded; the loaded
#: engine's `steps` counts them exactly.
TOKENS_A_SECOND, CONTEXT_FRAMES, MAX_CODEBOOKS = 50, 1501, 8


def max_steps(request: MusicRequest) -> int:
    steps = piece_steps(request.duration, TOKENS_A_SECOND, CONTEXT_FRAMES, request.extend_stride, MAX_CODEBOOKS)
    return steps * request.num_clips


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

#: The melody models: the same requests (a `melody` clip is what they add), their own loader.
MELODY_CATALOGUE = (
    CatalogueEntry("facebook/musicgen-melody", "music", "MusicGen Melody 1.5B, follows a melody, mono 32 kHz"),
    CatalogueEntry("facebook/musicgen-melody-large", "music", "MusicGen Melody 3.3B, follows a melody, mono 32 kHz"),
    CatalogueEntry("facebook/musicgen-stereo-melody", "music", "MusicGen Melody 1.5B, follows a melody, stereo"),
    CatalogueEntry("facebook/musicgen-stereo-melody-large", "music", "MusicGen Melody 3.3B, follows a melody, stereo"),
)

MELODY_FAMILY = dataclasses.replace(
    FAMILY,
    name="musicgen-melody",
    load=lazy("muselab.engines.music:load_melody"),
    catalogue=MELODY_CATALOGUE,
    architectures=("MusicgenMelodyForConditionalGeneration",),
    tiny={
        "melody": TinyModel(
            "tiny-musicgen-melody", lazy("muselab.engines.music.tiny:build_tiny_musicgen_melody"), also_serves="music"
        )
    },
)

FAMILIES = (FAMILY, MELODY_FAMILY)
