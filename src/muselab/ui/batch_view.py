"""What the Batch and Compare pages share: a batch's live progress (the whole batch, and the item
running now), its one Cancel, its items filling in as they finish (a list, or a comparison grid's
table with a row per y value and a column per x value), how it ended, and the recent batches to
open again. A batch is many jobs, so files are read lazily: thumbnails and clips are cached by
output id, and downloads read their file only when pressed."""

from __future__ import annotations

import functools
from typing import Any

import streamlit as st

from muselab import expected
from muselab.families import family
from muselab.grid import Axis
from muselab.ui.backend import BackendError
from muselab.ui.common import backend, file_media, plain, thumbnail

#: How each item's state reads in the page.
STATES = {
    "succeeded": "done",
    "failed": "failed",
    "cancelled": "cancelled",
    "running": "running",
    "queued": "queued",
    "pending": "waiting",
}
#: Items drawn at first in a batch's list; "Show more" adds as many again.
PAGE = 30
COLUMNS = 3
MIME = {"image": ("PNG", "image/png"), "audio": ("WAV", "audio/wav"), "video": ("MP4", "video/mp4")}


def open_batch(page: str, batch_id: str) -> None:
    """Show `batch_id` in `page`'s panel (a new batch, or one opened from the recent list)."""
    st.session_state[f"{page}.current"] = batch_id
    st.session_state[f"{page}.limit"] = PAGE


def batch_panel(page: str, layout: str) -> dict[str, Any] | None:
    """The open batch of `page`: live while it runs (`layout` "list" or "grid"), then how it ended
    and its items. Returns its status."""
    batch_id = st.session_state.get(f"{page}.current")
    if not batch_id:
        return None
    try:
        status = backend().batch(batch_id)
    except BackendError as exc:
        st.warning(plain(str(exc)))
        return None
    heading(status)
    if status["status"] == "running":
        _live(page, batch_id, layout)
        return status
    outcome(status)
    body(page, status, layout)
    return status


@st.fragment(run_every=0.5)
def _live(page: str, batch_id: str, layout: str) -> None:
    """Redrawn twice a second while the batch runs; once it ends the whole page is drawn again."""
    try:
        status = backend().batch(batch_id)
    except BackendError as exc:
        st.warning(plain(str(exc)))
        return
    if status["status"] != "running":
        st.rerun()
    progress_bars(status)
    cancelling = st.session_state.get(f"{page}.cancelling") == batch_id
    if st.button(
        "Cancelling..." if cancelling else "Cancel",
        key=f"{page}.cancel",
        icon=":material/stop:",
        disabled=cancelling,
        help="Stops the item running now within a step; the items after it never start.",
    ):
        backend().cancel_batch(batch_id)
        st.session_state[f"{page}.cancelling"] = batch_id
        st.toast("Cancelling the batch...")
    body(page, status, layout)


def heading(status: dict[str, Any]) -> None:
    title = status.get("title") or f"A batch of {status['total']}"
    st.subheader(plain(title), anchor=False)


def progress_bars(status: dict[str, Any]) -> None:
    """The whole batch's bar (items done, time so far, time left), then the running item's own."""
    progress = status["progress"]
    eta = progress["eta"]
    left = f", about {expected.duration(eta)} left" if eta else ""
    text = f"{status['done']} of {status['total']} done, {expected.duration(progress['elapsed'])}{left}"
    st.progress(min(progress["fraction"], 1.0), text=text)
    current = status["current"]
    if current is None:
        return
    number = next((item["item"] + 1 for item in status["items"] if item["job_id"] == current["id"]), None)
    which = f"Item {number}" if number is not None else "This item"
    job = current.get("progress")
    if current["status"] == "queued" or job is None:
        position = current.get("queue_position")
        waiting = f"waiting in the queue (position {position})" if position and position > 1 else "loading the model"
        st.progress(0.0, text=f"{which}: {waiting}...")
    elif job.get("stage") == "converting":
        note = job.get("note") or "converting the model"
        st.progress(min(job["fraction"], 1.0), text=f"{which}: {note}, {job['elapsed']:0.0f} s")
    else:
        unit = family(current["kind"]).unit
        item_left = f", about {expected.duration(job['eta'])} left" if job.get("eta") else ""
        stage = " (decoding)" if job.get("stage") == "decoding" else ""
        st.progress(
            min(job["fraction"], 1.0),
            text=f"{which}: {job['step']} / {job['total']} {unit}{stage}, {job['elapsed']:0.0f} s{item_left}",
        )


def outcome(status: dict[str, Any]) -> None:
    """How an ended batch went, in one line, and where its files are."""
    counts, total = status["counts"], status["total"]
    took = expected.duration(status["progress"]["elapsed"])
    if status["status"] == "succeeded":
        st.success(f"All {total} done in {took}.", icon=":material/check_circle:")
    elif status["status"] == "cancelled":
        st.warning(f"Cancelled: {counts['succeeded']} of {total} done; the rest did not run.")
    else:
        st.warning(
            f"{counts['failed']} of {total} failed ({counts['succeeded']} done); each failed item says why.",
            icon=":material/error:",
        )
    if status.get("folder"):
        st.caption(plain(f"Files: {status['folder']} in the outputs folder"))


def body(page: str, status: dict[str, Any], layout: str) -> None:
    if layout == "grid" and status.get("grid"):
        grid_result(status)
    else:
        item_list(page, status)


# ------------------------------------------------------------ a batch's items


def item_list(page: str, status: dict[str, Any]) -> None:
    """The items in their order, a card each: number and state, prompt, outputs or error."""
    limit = st.session_state.get(f"{page}.limit", PAGE)
    items = status["items"][:limit]
    for start in range(0, len(items), COLUMNS):
        for column, item in zip(st.columns(COLUMNS), items[start : start + COLUMNS], strict=False):
            with column.container(border=True, key=f"{page}-item-{item['item']}"):
                st.caption(f"#{item['item'] + 1} · {item['kind']} · {STATES.get(item['status'], item['status'])}")
                prompt = item["prompt"] or ""
                st.text(prompt[:120] + ("..." if len(prompt) > 120 else ""))
                item_outputs(item)
    if len(status["items"]) > limit and st.button(
        f"Show more ({len(status['items']) - limit} more)", key=f"{page}.more", icon=":material/expand_more:"
    ):
        st.session_state[f"{page}.limit"] = limit + PAGE
        st.rerun()


def item_outputs(item: dict[str, Any]) -> None:
    """An item's files (a thumbnail, or a player for a clip, each with its download), or why it
    made none."""
    if item["status"] == "failed":
        st.error(plain(item["error"] or "This item failed."), icon=":material/error:")
    for output in item["outputs"]:
        media = file_media(output["filename"])
        if media == "audio":
            data = clip_bytes(output["id"])
            if data is None:
                st.caption(plain(f"{output['filename']} is gone from disk."))
                continue
            st.audio(data, format="audio/wav")
        else:
            picture = thumbnail(output)
            if picture is None:
                st.caption(plain(f"{output['filename']} is gone from disk."))
                continue
            st.image(picture, width="stretch")
        download(output, media)


def download(output: dict[str, Any], media: str) -> None:
    """A download that reads the file only when pressed (a batch may hold hundreds)."""
    name, mime = MIME[media]
    st.download_button(
        name,
        functools.partial(backend().output_bytes, output["id"]),
        file_name=output["filename"],
        mime=mime,
        key=f"bdl.{output['id']}",
        icon=":material/download:",
        on_click="ignore",
    )


def clip_bytes(output_id: str) -> bytes | None:
    try:
        return _clip(output_id)
    except BackendError:
        return None


@st.cache_data(max_entries=200, show_spinner=False)
def _clip(output_id: str) -> bytes:
    """A clip's WAV, read once: the live panel redraws every half second."""
    return backend().output_bytes(output_id)


# ------------------------------------------------------------ a comparison grid


def axes(grid: dict[str, Any]) -> tuple[Axis, Axis | None]:
    x = Axis(grid["x"]["field"], tuple(grid["x"]["values"]))
    y = Axis(grid["y"]["field"], tuple(grid["y"]["values"])) if grid.get("y") else None
    return x, y


def cell_label(x: Axis, y: Axis | None, column: int, row: int) -> str:
    """What sets this cell apart from the others: "steps: 10 · guidance: 7"."""
    label = x.label(x.values[column])
    return label if y is None else f"{label} · {y.label(y.values[row])}"


def grid_result(status: dict[str, Any]) -> None:
    """An image grid's labelled picture, large, with its download (once every cell has run), then
    the cells: a header row of x labels, a row per y value with its label, each cell its file."""
    grid = status["grid"]
    output = grid.get("output")
    if output is not None:
        try:
            data = backend().output_bytes(output["id"])
        except BackendError:
            st.warning(plain(f"{output['filename']} is gone from disk."))
        else:
            with st.container(key="grid-picture"):
                st.image(data, width="stretch")
            st.download_button(
                "Grid PNG",
                data,
                file_name=output["filename"],
                mime="image/png",
                key=f"grid.{output['id']}",
                icon=":material/download:",
            )
        st.markdown("**Each cell**")
    grid_table(status)


def grid_table(status: dict[str, Any]) -> None:
    x, y = axes(status["grid"])
    items = status["items"]
    widths = ([1] if y is not None else []) + [2] * len(x.values)
    offset = 1 if y is not None else 0
    header = st.columns(widths)
    for column, value in enumerate(x.values):
        header[offset + column].markdown(f"**{plain(x.label(value))}**")
    for row in range(len(y.values) if y is not None else 1):
        cells = st.columns(widths, vertical_alignment="center")
        if y is not None:
            cells[0].markdown(f"**{plain(y.label(y.values[row]))}**")
        for column in range(len(x.values)):
            index = row * len(x.values) + column
            if index >= len(items):
                continue
            item, label = items[index], cell_label(x, y, column, row)
            with cells[offset + column].container(border=True, key=f"cell-{index}"):
                st.caption(plain(label))
                if not item["outputs"] and item["status"] != "failed":
                    st.caption(STATES.get(item["status"], item["status"]))
                item_outputs(item)


# ------------------------------------------------------------ recent batches


def recent_batches(page: str, *, grids: bool) -> None:
    """The latest batches (or grids), each with its state and an Open button."""
    try:
        found = [batch for batch in backend().batches() if (batch.get("grid") is not None) == grids]
    except BackendError as exc:
        st.warning(plain(str(exc)))
        return
    if not found:
        return
    st.subheader("Recent grids" if grids else "Recent batches", anchor=False)
    for batch in found:
        name, about, button = st.columns([5, 3, 1.3], vertical_alignment="center")
        name.text(batch.get("title") or f"A batch of {batch['total']}")
        when = (batch.get("created_at") or "")[:16].replace("T", " ")
        about.caption(f"{STATES.get(batch['status'], batch['status'])} · {batch['done']} of {batch['total']} · {when}")
        if button.button("Open", key=f"{page}.show.{batch['id']}", icon=":material/open_in_full:"):
            open_batch(page, batch["id"])
            st.rerun()
