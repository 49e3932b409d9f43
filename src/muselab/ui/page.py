"""The page of a kind of generation: its settings (from the request schema), Generate, the live
job panel, and the results with their downloads, ratings and recipes. Music, Image and any plugin
family's page are this page; Scene shows its three files together."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import streamlit as st

from muselab.families import family
from muselab.ui.common import job_panel, rating, show_output, show_recipe, submit
from muselab.ui.form import request_form, reuse_settings


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
    widgets' values."""
    kind_family = family(kind)
    st.title(kind_family.title)
    if intro:
        st.write(intro)
    values = request_form(kind, placed, draw_placed)
    if st.button("Generate", type="primary", key=f"{kind}.generate", icon=":material/play_arrow:"):
        submit(kind, values)
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
            show_output(output)
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
