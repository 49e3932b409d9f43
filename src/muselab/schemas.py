"""Requests and results, with the bounds every front end shares.

A request holds everything that decides the output (the *recipe*); it is what
gets embedded in each file and what ``--from FILE`` reads back.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

import annotated_types as at
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

MAX_SEED = 2**32 - 1
MAX_PROMPT_CHARS = 2000

SchedulerName = Literal["DPM++ 2M Karras", "DPM++ 2M", "Euler a", "Euler", "DDIM", "PNDM", "LCM"]
SCHEDULERS: tuple[str, ...] = SchedulerName.__args__  # type: ignore[attr-defined]

Prompt = Annotated[str, Field(min_length=1, max_length=MAX_PROMPT_CHARS)]
Seed = Annotated[int | None, Field(default=None, ge=0, le=MAX_SEED)]


class _Request(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    prompt: Prompt
    seed: Seed = None
    model: str | None = Field(default=None, description="Hub id or local folder; default from settings.")

    @field_validator("prompt")
    @classmethod
    def _prompt_has_text(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("empty")
        return value.strip()


class MusicRequest(_Request):
    kind: Literal["music"] = "music"
    duration: float = Field(default=8.0, ge=1, le=30, description="Seconds of audio.")
    temperature: float = Field(default=1.0, ge=0.05, le=5.0)
    top_k: int = Field(default=250, ge=0, le=2048, description="0 turns top-k sampling off.")
    top_p: float = Field(default=0.0, ge=0.0, le=1.0, description="0 turns nucleus sampling off.")
    guidance: float = Field(
        default=3.0, ge=0.0, le=20.0, description="Classifier-free guidance; 1 or less turns it off."
    )
    num_clips: int = Field(default=1, ge=1, le=8, description="Clips to make; clip i uses seed + i.")


class ImageRequest(_Request):
    kind: Literal["image"] = "image"
    negative_prompt: str = Field(default="", max_length=MAX_PROMPT_CHARS)
    width: int | None = Field(default=None, ge=64, le=2048, multiple_of=8)
    height: int | None = Field(default=None, ge=64, le=2048, multiple_of=8)
    steps: int | None = Field(default=None, ge=1, le=150)
    guidance: float | None = Field(default=None, ge=0.0, le=30.0)
    scheduler: SchedulerName | None = None
    num_images: int = Field(default=1, ge=1, le=8, description="Images to make; image i uses seed + i.")
    decoder: Literal["full", "fast"] = Field(
        default="full",
        description="'fast' decodes with the tiny autoencoder (TAESD): a fraction of the time, slightly softer.",
    )
    decoder_model: str | None = Field(
        default=None, max_length=500, description="Hub id or folder of the tiny autoencoder; default from settings."
    )


class SceneRequest(_Request):
    """One prompt (optionally split) makes a picture and its soundtrack, exported together as MP4."""

    kind: Literal["scene"] = "scene"
    image_prompt: str | None = Field(default=None, max_length=MAX_PROMPT_CHARS, description="Default: prompt.")
    music_prompt: str | None = Field(default=None, max_length=MAX_PROMPT_CHARS, description="Default: prompt.")
    negative_prompt: str = Field(default="", max_length=MAX_PROMPT_CHARS)
    duration: float = Field(default=8.0, ge=1, le=30, description="Seconds of soundtrack (and video).")
    width: int | None = Field(default=None, ge=64, le=2048, multiple_of=8)
    height: int | None = Field(default=None, ge=64, le=2048, multiple_of=8)
    steps: int | None = Field(default=None, ge=1, le=150)
    image_model: str | None = Field(default=None, description="Hub id or folder; default from settings.")
    music_model: str | None = Field(default=None, description="Hub id or folder; default from settings.")

    def image_request(self) -> ImageRequest:
        return ImageRequest(
            prompt=self.image_prompt or self.prompt,
            negative_prompt=self.negative_prompt,
            seed=self.seed,
            width=self.width,
            height=self.height,
            steps=self.steps,
            model=self.image_model,
        )

    def music_request(self) -> MusicRequest:
        return MusicRequest(
            prompt=self.music_prompt or self.prompt, seed=self.seed, duration=self.duration, model=self.music_model
        )


Request = MusicRequest | ImageRequest | SceneRequest
REQUEST_TYPES: dict[str, type[_Request]] = {"music": MusicRequest, "image": ImageRequest, "scene": SceneRequest}


class RequestError(ValueError):
    """A request the user must change; the message names each field and its allowed values."""


def parse_request(cls: type[_Request], data: dict[str, Any]) -> Any:
    """Validate `data` into `cls`, turning pydantic's errors into one readable message."""
    try:
        return cls.model_validate(data)
    except ValidationError as exc:
        raise RequestError(explain_validation_error(cls, exc)) from None


def explain_validation_error(cls: type[BaseModel], exc: ValidationError) -> str:
    return describe_errors(cls, exc.errors())


def describe_errors(cls: type[BaseModel], errors: Any) -> str:
    """One line per problem: the field, what it accepts, and what was given."""
    lines = []
    for error in errors:
        location = [part for part in error.get("loc", ()) if part not in ("body", "query", "path")]
        field = str(location[0]) if location else "request"
        got = error.get("input")
        if error["type"] == "extra_forbidden":
            allowed = ", ".join(name for name in cls.model_fields if name != "kind")
            lines.append(f"{field}: unknown setting; known ones are {allowed}")
            continue
        if error["type"] in ("missing", "model_attributes_type", "dict_type", "json_invalid"):
            lines.append(f"{field}: {error['msg'].lower()}")
            continue
        if error["type"] == "string_pattern_mismatch" and field.endswith("_id"):
            lines.append(f"{field}: must be an id the API gave, 32 lowercase hex digits (got {_short(got)})")
            continue
        info = cls.model_fields.get(field)
        rule = _describe_field(info) if info else error["msg"]
        lines.append(f"{field}: {rule} (got {_short(got)})")
    return "Invalid request:\n" + "\n".join(f"  - {line}" for line in lines)


def _describe_field(info: Any) -> str:
    bounds: dict[str, Any] = {}
    for item in info.metadata:
        for name in ("ge", "gt", "le", "lt", "multiple_of", "min_length", "max_length"):
            value = getattr(item, name, None)
            if value is not None and isinstance(item, at.BaseMetadata):
                bounds[name] = value
    choices = _literal_choices(info.annotation)
    if choices:
        return "must be one of " + ", ".join(repr(c) for c in choices)
    if "min_length" in bounds or "max_length" in bounds:
        low, high = bounds.get("min_length", 0), bounds.get("max_length")
        if low and high:
            return f"must be non-blank text of at most {high} characters"
        return f"must be text of at most {high} characters"
    parts = []
    low = bounds.get("ge", bounds.get("gt"))
    high = bounds.get("le", bounds.get("lt"))
    kind = "a whole number" if _is_int(info.annotation) else "a number"
    if low is not None and high is not None:
        parts.append(f"must be {kind} from {_num(low)} to {_num(high)}")
    elif low is not None:
        parts.append(f"must be {kind} of at least {_num(low)}")
    else:
        parts.append(f"must be {kind}")
    if "multiple_of" in bounds:
        parts.append(f"and a multiple of {bounds['multiple_of']}")
    return " ".join(parts)


def _literal_choices(annotation: Any) -> tuple[Any, ...]:
    args = getattr(annotation, "__args__", ())
    if getattr(annotation, "__origin__", None) is Literal:
        return args
    for arg in args:
        if getattr(arg, "__origin__", None) is Literal:
            return arg.__args__
    return ()


def _is_int(annotation: Any) -> bool:
    return annotation is int or int in getattr(annotation, "__args__", ())


def _num(value: float) -> str:
    return str(value) if isinstance(value, int) else f"{value:g}"


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."
