"""What every page shares: the backend, the live job panel (progress, preview, cancel), results,
feedback, and the little bit of CSS. Prompts are always shown as text, never as HTML or markdown.
"""

from __future__ import annotations

import io
import json
import os
import re
import time
from pathlib import Path
from typing import Any

import streamlit as st

from muselab.config import Settings
from muselab.families import family, kinds
from muselab.schemas import RequestError
from muselab.ui.backend import ACTIVE, Backend, BackendError, LocalBackend, RemoteBackend

STYLE = Path(__file__).with_name("style.css")
VIEWS = Path(__file__).with_name("views")
#: The pages that are not a kind of generation; each kind's page is views/KIND.py where the studio
#: has one, else the shared views/family.py (drawn from its request schema).
PAGES = {
    "home": "views/home.py",
    "batch": "views/batch.py",
    "compare": "views/compare.py",
    "gallery": "views/gallery.py",
}


def page_file(kind: str) -> str:
    return PAGES.get(kind) or (f"views/{kind}.py" if (VIEWS / f"{kind}.py").exists() else "views/family.py")


def navigation_pages() -> dict[str, Any]:
    """Home, a page per kind of generation (in the registry's order), Batch and Compare (many jobs of
    any kind), and the Gallery."""
    pages = {"home": st.Page(PAGES["home"], title="Home", icon=":material/home:", default=True)}
    for kind in kinds():
        kind_family = family(kind)
        pages[kind] = st.Page(page_file(kind), title=kind_family.title, icon=kind_family.icon, url_path=kind)
    pages["batch"] = st.Page(PAGES["batch"], title="Batch", icon=":material/playlist_play:", url_path="batch")
    pages["compare"] = st.Page(PAGES["compare"], title="Compare", icon=":material/grid_view:", url_path="compare")
    pages["gallery"] = st.Page(PAGES["gallery"], title="Gallery", icon=":material/photo_library:")
    return pages


def go_to(kind: str) -> None:
    """Switch to the page of `kind` (or "home", "batch", "compare", "gallery")."""
    st.switch_page(navigation_pages()[kind])


@st.cache_resource(show_spinner=False)
def _backend(data_dir: str, preset: str, api_url: str | None, token: str | None, any_model: bool) -> Backend:
    if api_url:
        return RemoteBackend(api_url, token)
    from muselab.quiet import quiet_libraries

    quiet_libraries()
    return LocalBackend(Settings())


def backend() -> Backend:
    settings = Settings()
    return _backend(
        str(settings.data_dir), settings.preset, settings.ui_api_url, settings.api_token, settings.allow_any_model
    )


# What Markdown (with Streamlit's extensions) could turn into a link, an image, a directive such as
# :red[...], emphasis, a heading, a table or math; then the openings of a bare link (`http://`,
# `www.`), broken by escaping their punctuation.
_MARKDOWN_SPECIAL = re.compile(r"([\\`*_{}\[\]()#!|<>~$&])")
_BARE_LINK = re.compile(r"(?i)://|\bwww\.")


def plain(text: str) -> str:
    """`text` for a Markdown-rendering element (errors, warnings, captions, toasts), shown as
    written: user-written text (prompts, comments, file and model names, and error messages that
    quote them) cannot become a link, an image the browser fetches, or styling."""
    text = _MARKDOWN_SPECIAL.sub(r"\\\1", text)
    return _BARE_LINK.sub(lambda match: match.group(0).replace(":", "\\:").replace(".", "\\."), text)


def apply_style() -> None:
    st.html(f"<style>{STYLE.read_text()}</style>")


def submit(kind: str, data: dict[str, Any]) -> None:
    """Send a request; a bad field or a busy queue is shown in the page, and nothing is lost."""
    try:
        st.session_state[f"{kind}.job"] = backend().submit(kind, data)
        st.session_state[f"{kind}.submitted_at"] = time.time()
    except RequestError as exc:
        st.error(plain(str(exc).replace("Invalid request:", "Please change:")), icon=":material/edit:")
    except BackendError as exc:
        st.warning(plain(str(exc)), icon=":material/hourglass_top:")


def job_panel(kind: str) -> dict[str, Any] | None:
    """The current job of a page: live progress while it runs, then its results. Returns its status."""
    job_id = st.session_state.get(f"{kind}.job")
    if not job_id:
        return None
    try:
        status = backend().status(job_id)
    except BackendError as exc:
        st.warning(plain(str(exc)))
        return None
    if status["status"] in ACTIVE:
        _live_progress(kind, job_id)
        return status
    kept = len(status["outputs"])
    if status["status"] == "failed":
        message = status["error"] or "The job failed."
        st.error(plain(message + (f" {kept} finished file(s) kept." if kept else "")), icon=":material/error:")
    elif status["status"] == "cancelled":
        st.warning("Cancelled. Nothing partial was saved" + (f"; {kept} finished file(s) kept." if kept else "."))
    elif status["status"] == "interrupted":
        st.warning("muselab stopped before this job finished. Press Generate to run it again.")
    return status


@st.fragment(run_every=0.5)
def _live_progress(kind: str, job_id: str) -> None:
    status = backend().status(job_id)
    if status["status"] not in ACTIVE:
        st.rerun()
    progress = status["progress"]
    if progress is not None and progress["stage"] == "converting":
        note = progress.get("note") or "Converting the model"
        st.progress(min(progress["fraction"], 1.0), text=f"{note}, {progress['elapsed']:0.0f} s")
    elif status["status"] == "queued" or progress is None:
        position = status.get("queue_position")
        waited = time.time() - st.session_state.get(f"{kind}.submitted_at", time.time())
        text = f"Waiting in the queue (position {position})" if position and position > 1 else "Loading the model"
        # A scene waits for its first part's model (the picture's).
        model_kind = "image" if family(kind).compose is not None else kind
        preparing = (backend().info().get("preparing") or {}).get(model_kind) or {}
        if preparing.get("state") == "preparing":  # the job waits for the model the studio is preparing
            note = f" ({plain(preparing['note'])})" if preparing.get("note") else ""
            st.progress(
                min(preparing["fraction"], 1.0),
                text=f"Preparing the {model_kind} model: {preparing['fraction']:.0%}{note}, {waited:0.0f} s",
            )
        else:
            st.progress(0.0, text=f"{text}... {waited:0.0f} s")
    else:
        eta = progress["eta"]
        left = f", about {eta:0.0f} s left" if eta is not None else ""
        unit = family(kind).unit
        stage = " (decoding)" if progress["stage"] == "decoding" else ""
        st.progress(
            min(progress["fraction"], 1.0),
            text=f"{progress['step']} / {progress['total']} {unit}{stage}, {progress['elapsed']:0.0f} s{left}",
        )
    if status.get("preview"):
        st.image(status["preview"], caption="Live preview", width=192)
    if st.button("Cancel", key=f"{kind}.cancel", icon=":material/stop:"):
        backend().cancel(job_id)
        st.toast("Cancelling...")


@st.fragment(run_every=1.0)
def preparing_panel() -> None:
    """The configured models being made ready in the background (see `JobService.prepare`):
    "Preparing the image model: 40%", with its seconds moving, until each is ready."""
    preparing = backend().info().get("preparing") or {}
    for kind, state in preparing.items():
        if state["state"] in ("waiting", "preparing"):
            note = f" ({plain(state['note'])})" if state.get("note") else ""
            text = f"Preparing the {kind} model: {state['fraction']:.0%}{note}, {state.get('elapsed') or 0:0.0f} s"
            st.progress(min(state["fraction"], 1.0), text=text)


def file_bytes(output: dict[str, Any]) -> bytes | None:
    try:
        return backend().output_bytes(output["id"])
    except BackendError:
        st.warning(plain(f"{output['filename']} is gone from disk."))
        return None


def show_output(output: dict[str, Any], *, compact: bool = False) -> bytes | None:
    """One output: the picture or player, downloads, and for the full view its rating. Returns the
    file's bytes (None when it is gone)."""
    data = file_bytes(output)
    if data is None:
        return None
    name = output["filename"]
    media = file_media(name)
    if media == "image":
        st.image(data, width="stretch")
        if output["flagged"]:
            st.warning("The safety checker flagged this image, so it was blanked. Try another prompt or seed.")
        st.download_button(
            "PNG", data, file_name=name, mime="image/png", key=f"dl.{output['id']}", icon=":material/download:"
        )
    elif media == "audio":
        st.audio(data, format="audio/wav")
        if not compact:
            st.image(waveform_png(data), width="stretch")
        columns = st.columns(2)
        columns[0].download_button(
            "WAV", data, file_name=name, mime="audio/wav", key=f"dl.{output['id']}", icon=":material/download:"
        )
        if not compact:
            columns[1].download_button(
                "FLAC",
                to_flac(data, output),
                file_name=Path(name).with_suffix(".flac").name,
                mime="audio/flac",
                key=f"dlf.{output['id']}",
                icon=":material/download:",
            )
    else:
        st.video(data, format="video/mp4")
        st.download_button(
            "MP4", data, file_name=name, mime="video/mp4", key=f"dl.{output['id']}", icon=":material/download:"
        )
    return data


def file_media(filename: str) -> str:
    """What a file holds, by its name: "image", "audio" or "video" (outputs of any family)."""
    suffix = Path(filename).suffix.lower()
    return "image" if suffix == ".png" else "video" if suffix == ".mp4" else "audio"


def thumbnail(output: dict[str, Any]) -> bytes | None:
    """A small PNG for the Gallery's grid: the picture, a clip's waveform, a scene's frame."""
    try:
        return _thumbnail(output["id"], file_media(output["filename"]))
    except (BackendError, ValueError, OSError):
        return None


@st.cache_data(max_entries=1000, show_spinner=False)
def _thumbnail(output_id: str, media: str, side: int = 256) -> bytes:
    from PIL import Image

    data = backend().output_bytes(output_id)
    if media == "audio":
        return waveform_png(data, width=side, height=side * 2 // 3)
    if media == "video":
        import av

        with av.open(io.BytesIO(data)) as container:
            picture = next(container.decode(video=0)).to_image()
    else:
        picture = Image.open(io.BytesIO(data))
    picture = picture.convert("RGB")
    picture.thumbnail((side, side))
    buffer = io.BytesIO()
    picture.save(buffer, format="PNG")
    return buffer.getvalue()


def waveform_png(wav: bytes, width: int = 800, height: int = 120) -> bytes:
    """A small waveform picture (min/max per column), drawn without a plotting library."""
    import numpy as np
    import soundfile as sf
    from PIL import Image, ImageDraw

    audio, _ = sf.read(io.BytesIO(wav), dtype="float32", always_2d=True)
    mono = audio.mean(axis=1)
    columns = np.array_split(mono, width) if len(mono) >= width else [mono]
    picture = Image.new("RGB", (width, height), (250, 248, 245))
    draw = ImageDraw.Draw(picture)
    middle = height / 2
    for x, chunk in enumerate(columns):
        if chunk.size:
            top, bottom = middle - float(chunk.max()) * middle, middle - float(chunk.min()) * middle
            draw.line([(x, top), (x, bottom)], fill=(196, 86, 54))
    buffer = io.BytesIO()
    picture.save(buffer, format="PNG")
    return buffer.getvalue()


def to_flac(wav: bytes, output: dict[str, Any]) -> bytes:
    import soundfile as sf

    from muselab.media import encode_audio

    audio, rate = sf.read(io.BytesIO(wav), dtype="float32", always_2d=True)
    return encode_audio(audio, rate, output["recipe"], "flac")


def rating(output: dict[str, Any]) -> None:
    """Thumbs, stars and a comment, stored with the output."""
    feedback = output.get("feedback") or {}
    key = output["id"]
    thumbs = st.feedback("thumbs", key=f"thumb.{key}")
    stars = st.feedback("stars", key=f"stars.{key}")
    comment = st.text_input("Comment", value=feedback.get("comment") or "", key=f"comment.{key}", max_chars=2000)
    if st.button("Save rating", key=f"rate.{key}", icon=":material/star:"):
        thumb = None if thumbs is None else (1 if thumbs == 1 else -1)
        backend().feedback(output["id"], thumb, None if stars is None else stars + 1, comment or None)
        st.toast("Rating saved")
    if feedback.get("stars") or feedback.get("thumb"):
        marks = "up" if feedback.get("thumb") == 1 else "down" if feedback.get("thumb") == -1 else ""
        st.caption(f"Saved rating: {marks} {'*' * (feedback.get('stars') or 0)}".strip())


def show_recipe(output: dict[str, Any]) -> None:
    with st.expander("Recipe"):
        st.code(json.dumps(output["recipe"]["request"], indent=2), language="json")


def device_line(info: dict[str, Any]) -> str:
    """Where generation runs and how (engine, weights), from the backend's `info()`: what a user
    weighs the speed against."""
    if "ray" in info:  # the replicas' devices are the cluster's, not this machine's
        ray = info["ray"]
        line = (
            f"Running on a Ray cluster: {ray['replicas']} replica(s) per model, each {ray['num_cpus']:g} CPU "
            f"and {ray['num_gpus']:g} GPU (muselab cluster status shows where)"
        )
    elif "runtime" in info:
        served = f" on {info['served_by']}" if info.get("served_by") else ""
        line = f"Running{served}: {runtime_line(info['runtime'])}"
    else:  # a server from before /api/info described its runtime
        line = f"Served by {info.get('served_by', 'a muselab server')}"
    return line + (" · tiny test models (output is noise)" if info.get("preset") == "tiny" else "")


def runtime_line(runtime: dict[str, str]) -> str:
    """`muselab.engines.describe_runtime`'s answer in one line: device and dtype, then each kind's
    engine and weights."""

    def kind(engine: str, quantize: str) -> str:
        return f"{engine}, {'float' if quantize == 'none' else quantize} weights"

    return (
        f"{runtime['device']} ({runtime['dtype']}) · images: {kind(runtime['image_engine'], runtime['quantize_image'])}"
        f" · music: {kind(runtime['music_engine'], runtime['quantize_music'])}"
    )


def env_flag(name: str) -> bool:
    return os.environ.get(name, "").lower() in ("1", "true", "yes")
