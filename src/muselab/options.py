"""How a request field appears outside the schema (its flags, label, upload kind), and which
fields name a model: metadata the CLI, the API and the studio read from each field of `schemas.py`."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel


@dataclass(frozen=True)
class Option:
    """How a request field appears outside the schema: its command-line flags (default
    `--field-name`), its studio label, and whether a front end shows it at all. The bounds,
    default and help text stay in the field itself, so every front end reads the same ones.

    `flag` with a slash (`--fast-decoder/--full-decoder`) makes a two-choice field an on/off
    switch: on means the first of the field's choices named in `switch`."""

    flags: tuple[str, ...] = ()
    label: str = ""
    switch: tuple[str, str] | None = None  # (value when on, value when off)
    cli: bool = True  # shown as a command-line option
    studio: bool = True  # shown among the studio's settings
    step: float | None = None  # the studio slider's step, for a number between bounds
    count: bool = False  # how many outputs to make, output i with seed + i (a recipe records 1)
    placeholder: str = ""  # the studio's grey example text in an empty box
    main: bool = False  # in the studio, on the page itself rather than under "Advanced settings"
    metavar: str = ""  # how the CLI's help shows the option's value
    lead: bool = False  # in the studio, the page's first control
    upload: str = ""  # "image" or "audio": the value is a picture or a clip; the CLI reads the file named


@dataclass(frozen=True)
class ModelOf:
    """The field names a model of this kind ("music", "image", "decoder"...): clients may name only
    served ones (`JobService.check_client_models`), and the job service loads what it stands for."""

    kind: str


def field_option(info: Any) -> Option:
    return next((item for item in info.metadata if isinstance(item, Option)), Option())


def field_model_kind(info: Any) -> str | None:
    return next((item.kind for item in info.metadata if isinstance(item, ModelOf)), None)


def count_field(cls: type[BaseModel]) -> str | None:
    """The field saying how many outputs a request makes, if it has one."""
    return next((name for name, info in cls.model_fields.items() if field_option(info).count), None)


def model_fields(cls: type[BaseModel]) -> dict[str, str]:
    """The fields of `cls` that name a model, with the kind of model each names."""
    return {name: kind for name, info in cls.model_fields.items() if (kind := field_model_kind(info))}


__all__ = ["ModelOf", "Option", "count_field", "field_model_kind", "field_option", "model_fields"]
