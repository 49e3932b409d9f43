"""How a request that fails validation is explained: one line per field, naming what it accepts
(its bounds and choices, read from the schema's own `Field`s) and what was given."""

from __future__ import annotations

from typing import Any, Literal

import annotated_types as at
from pydantic import BaseModel, ValidationError


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


def field_bounds(info: Any) -> dict[str, Any]:
    """A field's bounds by name (ge, le, multiple_of, max_length...)."""
    bounds: dict[str, Any] = {}
    for item in info.metadata:
        for name in ("ge", "gt", "le", "lt", "multiple_of", "min_length", "max_length"):
            value = getattr(item, name, None)
            if value is not None and isinstance(item, at.BaseMetadata):
                bounds[name] = value
    return bounds


def _describe_field(info: Any) -> str:
    bounds = field_bounds(info)
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
