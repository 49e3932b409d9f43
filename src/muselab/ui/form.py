"""A page's settings, drawn from its family's request schema: each field's label, bounds, default
and help come from the schema (`muselab.schemas.Option`), so a field added there shows up in the
studio's advanced settings without further edits. Widget keys are `KIND.FIELD`."""

from __future__ import annotations

import typing
from collections.abc import Callable, Sequence
from typing import Any, Literal

import streamlit as st

from muselab.families import family
from muselab.schemas import field_bounds, field_option


def request_form(
    kind: str,
    placed: Sequence[str] = (),
    draw_placed: Callable[[], dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """Draw the fields marked `main` in the page, then the page's own widgets for the fields it
    places itself (`draw_placed` returns their values), then every other field not marked hidden
    under "Advanced settings".
    Returns the values as a request: None where a field is left to its default."""
    fields = family(kind).request.model_fields
    shown = [name for name, info in fields.items() if name not in ("kind", *placed) and field_option(info).studio]
    main = [name for name in shown if field_option(fields[name]).main]
    main.sort(key=lambda name: not field_option(fields[name]).lead)
    values = {name: field_widget(kind, name) for name in main}
    if draw_placed is not None:
        values.update(draw_placed())
    advanced = [name for name in shown if name not in main]
    if advanced:
        with st.expander("Advanced settings"):
            columns = st.columns(2)
            for index, name in enumerate(advanced):
                with columns[index % 2]:
                    values[name] = field_widget(kind, name)
    return values


def field_widget(kind: str, name: str, label: str | None = None) -> Any:
    """One field's widget (its label the schema's unless `label` gives the page's own wording);
    its value as the request takes it."""
    info = family(kind).request.model_fields[name]
    option = field_option(info)
    key = f"{kind}.{name}"
    label = label or option.label or info.title or name.replace("_", " ").capitalize()
    annotation, optional = _base(info.annotation)
    bounds = field_bounds(info)
    default = None if info.is_required() else info.default
    if option.switch is not None and not optional:  # optional: unset leaves it to another setting
        st.session_state.setdefault(key, default == option.switch[0])
        on = st.toggle(label, key=key, help=info.description)
        return option.switch[0] if on else option.switch[1]
    if typing.get_origin(annotation) is Literal:
        st.session_state.setdefault(key, default)
        return st.selectbox(label, typing.get_args(annotation), key=key, help=info.description, placeholder="Default")
    if annotation is bool:
        st.session_state.setdefault(key, bool(default))
        return st.toggle(label, key=key, help=info.description)
    if annotation in (int, float):
        return _number(key, label, annotation, optional, default, bounds, option.step, info.description)
    st.session_state.setdefault(key, default or "")
    limit = bounds.get("max_length")
    if name == "prompt" or (limit and limit > 500):
        text = st.text_area(label, key=key, max_chars=limit, placeholder=option.placeholder, help=info.description)
    else:
        text = st.text_input(label, key=key, max_chars=limit, placeholder=option.placeholder, help=info.description)
    return text if text or not optional else None


def _number(
    key: str,
    label: str,
    kind: type,
    optional: bool,
    default: Any,
    bounds: dict[str, Any],
    step: float | None,
    help_text: str | None,
) -> Any:
    low, high = bounds.get("ge", bounds.get("gt")), bounds.get("le", bounds.get("lt"))
    step = step or bounds.get("multiple_of") or (1 if kind is int else None)
    if kind is int and step is not None:
        step = int(step)
    st.session_state.setdefault(key, default)
    if optional:  # an empty box: the model's own default
        return st.number_input(label, low, high, step=step, key=key, help=help_text, placeholder="default")
    if step is not None and low is not None and high is not None and kind is float:
        return st.slider(label, kind(low), kind(high), step=kind(step), key=key, help=help_text)
    return st.number_input(label, low, high, step=step, key=key, help=help_text)


def _base(annotation: Any) -> tuple[Any, bool]:
    """The field's type without None, and whether None is allowed."""
    args = typing.get_args(annotation)
    if type(None) in args:
        rest = [arg for arg in args if arg is not type(None)]
        return (rest[0] if len(rest) == 1 else annotation), True
    return annotation, False


def reuse_settings(kind: str, request: dict[str, Any], extra: dict[str, Any] | None = None) -> None:
    """Copy a recipe back into the page's widgets ("use these settings again"); an on_click callback,
    since widget values can only be set before the widgets are drawn."""
    fields = family(kind).request.model_fields
    for name, value in request.items():
        info = fields.get(name)
        if info is None or name == "kind":
            continue
        option = field_option(info)
        if option.switch is not None and not _base(info.annotation)[1]:
            value = value == option.switch[0]
        elif isinstance(value, str) and not value and _base(info.annotation)[1]:
            value = None
        st.session_state[f"{kind}.{name}"] = value if value is not None or _base(info.annotation)[1] else ""
    for widget, value in (extra or {}).items():
        st.session_state[f"{kind}.{widget}"] = value
