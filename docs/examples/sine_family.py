"""A toy model family in one file: "sine", a tone synthesizer with the interface of a real engine.

It shows everything a new family writes, and nothing else: its request (fields with bounds, help
and flags, read by the CLI, the API and the studio), its engine (`resolve`, `generate` with
progress and cancel, `steps`), how it loads a model folder, how it builds a tiny one, and its
registration (`FAMILY`). Nothing in muselab is edited. Use it with:

    MUSELAB_PLUGINS=sine_family PYTHONPATH=docs/examples muselab sine "a calm tone" -d 2 --preset tiny

(an installed package registers through the `muselab.families` entry point group instead). The
"model" is a folder with a config.json naming the `SineSynth` architecture and its harmonics; a
step synthesizes a tenth of a second, and `seconds_a_step` stands in for the compute a real
model's step takes, so progress and cancel can be seen.
"""

from __future__ import annotations

import json
import math
import secrets
import time
from pathlib import Path
from typing import Annotated, Any, Literal

import numpy as np
from pydantic import Field

from muselab.config import Settings, model_label
from muselab.devices import choose_placement
from muselab.engines.base import (
    Cancelled,
    CancelToken,
    GenerationResult,
    ModelUnavailable,
    MusicOutput,
    ProgressCallback,
    ProgressClock,
    engine_result,
    locate_model,
)
from muselab.families import Family, TinyModel
from muselab.schemas import MAX_SEED, BaseRequest, Option, model_field

STEPS_A_SECOND = 10


class SineRequest(BaseRequest):
    kind: Literal["sine"] = "sine"
    model: model_field("sine") = None
    duration: Annotated[
        float,
        Field(default=2.0, ge=0.5, le=30, description="Seconds, 0.5-30."),
        Option(flags=("--duration", "-d"), label="Duration (seconds)", step=0.5, main=True),
    ] = 2.0
    frequency: Annotated[
        float,
        Field(default=440.0, ge=20, le=4000, description="The tone's pitch in Hz; the seed detunes it a little."),
        Option(label="Frequency (Hz)", step=10.0),
    ] = 440.0
    num_clips: Annotated[
        int,
        Field(default=1, ge=1, le=4, description="How many clips; clip i uses seed + i."),
        Option(flags=("--clips", "-n"), label="Clips", count=True),
    ] = 1


class SineEngine:
    kind = "sine"

    def __init__(self, model: str, config: dict[str, Any], settings: Settings):
        self.model = model
        self.placement = choose_placement("cpu", "float32")
        self.sample_rate = int(config["sample_rate"])
        self.harmonics = [float(weight) for weight in config["harmonics"]]
        self.seconds_a_step = float(config.get("seconds_a_step", 0.0))

    @property
    def model_name(self) -> str:
        return model_label(self.model)

    def resolve(self, request: SineRequest) -> SineRequest:
        seed = request.seed if request.seed is not None else secrets.randbelow(MAX_SEED + 1)
        return request.model_copy(update={"model": model_label(self.model), "seed": seed})

    def steps(self, request: SineRequest) -> int:
        return max_steps(request)

    def generate(
        self, request: SineRequest, on_progress: ProgressCallback | None = None, cancel: CancelToken | None = None
    ) -> GenerationResult:
        request = self.resolve(request)
        assert request.seed is not None
        cancel = cancel or CancelToken()
        chunks = math.ceil(request.duration * STEPS_A_SECOND)
        clock = ProgressClock(self.steps(request), on_progress, items=request.num_clips)
        started = time.perf_counter()
        outputs: list[MusicOutput] = []
        for index in range(request.num_clips):
            seed = (request.seed + index) % (MAX_SEED + 1)
            pitch = request.frequency * (1 + np.random.default_rng(seed).uniform(-0.01, 0.01))
            pieces = []
            for chunk in range(chunks):
                if cancel.cancelled:
                    raise Cancelled(completed=outputs)
                time.sleep(self.seconds_a_step)
                start = chunk * self.sample_rate // STEPS_A_SECOND
                t = np.arange(start, start + self.sample_rate // STEPS_A_SECOND) / self.sample_rate
                pieces.append(sum(w * np.sin(2 * np.pi * pitch * (h + 1) * t) for h, w in enumerate(self.harmonics)))
                clock.advance(index)
            audio = 0.3 * np.concatenate(pieces)[: round(request.duration * self.sample_rate)]
            outputs.append(
                MusicOutput(audio=audio.astype(np.float32)[:, None], sample_rate=self.sample_rate, seed=seed)
            )
        return engine_result(self, request, outputs, started)


def max_steps(request: SineRequest) -> int:
    return math.ceil(request.duration * STEPS_A_SECOND) * request.num_clips


def load(model: str, settings: Settings, on_progress: ProgressCallback | None = None) -> SineEngine:
    folder = Path(locate_model(model, settings.is_offline(), "sine"))
    try:
        config = json.loads((folder / "config.json").read_text())
        if "SineSynth" not in config.get("architectures", []):
            raise ValueError("not a SineSynth")
    except (OSError, ValueError) as exc:
        raise ModelUnavailable(f"'{model_label(model)}' is not a sine model folder ({exc})") from None
    return SineEngine(model, config, settings)


def build_tiny(path: Path, replace: bool = True) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    config = {
        "architectures": ["SineSynth"],
        "sample_rate": 16000,
        "harmonics": [1.0, 0.5, 0.25],
        "seconds_a_step": 0.05,
    }
    (path / "config.json").write_text(json.dumps(config))
    return path


FAMILY = Family(
    name="sine",
    kind="sine",
    request=SineRequest,
    load=load,
    output="audio",
    title="Sine",
    summary='Make a tone, e.g. muselab sine "a calm tone" --frequency 220 -d 2.',
    unit="tenths of a second",
    icon=":material/graphic_eq:",
    architectures=("SineSynth",),
    tiny={"sine": TinyModel("tiny-sine", build_tiny)},
    max_steps=max_steps,
)
