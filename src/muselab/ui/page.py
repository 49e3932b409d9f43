"""The page of a kind of generation: its settings (from the request schema), Generate, the live
job panel, and the results with their downloads, ratings and recipes. Music, Image and any plugin
family's page are this page; Scene shows its three files together."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import streamlit as st

from muselab import expected
from muselab.families import family
from muselab.schemas import RequestError
from muselab.ui.backend import BackendError
from muselab.ui.clip import clip_actions
from muselab.ui.common import backend, file_media, job_panel, plain, rating, show_output, show_recipe, submit
from muselab.ui.form import request_form, reuse_settings
from muselab.ui.picture import picture_actions


def family_page(
    kind: str,
    *,
    placed: tuple[str, ...] = (),
    draw_placed: Callable[[], dict[str, Any]] | None = None,
    reuse_placed: Callable[[dict[str, Any]], dict[str, Any]] | None = None,
    intro: str = "",
) -> None:
    """`placed` names fields the page draws itself with `draw_placed`, which returns their values
    (the image page's Size sets width and height); `reuse_placed` turns a recipe back into those
    widgets' values. Each picture gets its Edit this, Upscale and Vary buttons; each clip its Continue
    this and Use as melody."""
    kind_family = family(kind)
    st.title(kind_family.title)
    if intro:
        st.write(intro)
    values = request_form(kind, placed, draw_placed)
    expected_time(kind, values)
    if st.button("Generate", type="primary", key=f"{kind}.generate", icon=":material/play_arrow:"):
        submit(kind, values)
    note = st.session_state.get(f"{kind}.note")
    if note and note[0] == st.session_state.get(f"{kind}.job"):
        st.info(plain(note[1]), icon=":material/info:")
    status = job_panel(kind)
    if not (status and status["outputs"]):
        return
    images = kind_family.output == "image"
    columns = st.columns(2) if images else [st.container()]
    for index, output in enumerate(status["outputs"]):
        with columns[index % len(columns)].container(border=True):
            if not images:
                st.text(output["prompt"])
            st.caption(f"seed {output['seed']}")
            data = show_output(output)
            if images and data is not None:
                picture_actions(output, data)
            elif data is not None and file_media(output["filename"]) == "audio":
                clip_actions(output, data)
            rating(output)
            show_recipe(output)
    request = status["request"]
    st.button(
        "Use these settings again",
        key=f"{kind}.reuse",
        icon=":material/replay:",
        on_click=reuse_settings,
        args=(kind, request, reuse_placed(request) if reuse_placed else None),
    )


def expected_time(kind: str, values: dict[str, Any]) -> None:
    """ "Expected here: Turbo ~6 s · Fast ~25 s · Balanced ~2 min · Quality ~6 min" for this request, and which tier
    `auto` picks, for a family with speed tiers."""
    if family(kind).estimate is None:
        return
    try:
        estimate = backend().estimate(kind, {**values, "prompt": values.get("prompt") or "-"})
    except (RequestError, BackendError):
        return  # the form's own error says what to fix when Generate is pressed
    if not estimate:
        return
    sources = {value["source"] for value in estimate["tiers"].values() if value.get("seconds") is not None}
    note = f" ({sources.pop()})" if len(sources) == 1 else ""
    picked = f" · auto picks {estimate['chosen']} here" if estimate.get("chosen") and not values.get("speed") else ""
    why = f"{estimate['reason']}\n\n" if estimate.get("reason") else ""
    st.caption(f"Expected here: {expected.describe(estimate)}{note}{picked}", help=why + expected.sources(estimate))
