"""Picture editing on the Image page, as A1111's img2img tab: start from a picture (an upload, or
a result's "Edit this"), repaint a mask painted over it in the browser or uploaded (inpainting),
grow its edges (outpainting), or make a text-to-image picture larger (hires fix); and the Edit
this, Upscale and Vary buttons under every picture. Each control is its request field's (label,
bounds and help from the schema, through `form.field_widget`). The picture and the mask travel in
the request as base64 and are never written to disk here: the job service checks them and keeps
them by content hash."""

from __future__ import annotations

import base64
import hashlib
import io
import secrets
import typing
from collections.abc import Callable
from typing import Any

import streamlit as st

from muselab.families import family
from muselab.schemas import MAX_SEED, RequestError, field_bounds, field_option
from muselab.ui.common import go_to, plain, submit
from muselab.ui.form import field_widget
from muselab.uploads import MAX_UPLOAD_BYTES, decode_image
from muselab.upscale import UPSCALE_STRENGTH, upscale_fields

KIND = "image"
PICTURE = "image.picture"  # the starting picture, as `picture_state` makes it
PENDING = "image.pending"  # an "Edit this" on its way to the Image page
NOTE = "image.note"  # (job id, what the Image page says about that job)
PICTURE_FIELDS = (
    "init_image",
    "strength",
    "resize_mode",
    "mask",
    "inpainting_mask_invert",
    "mask_blur",
    "inpainting_fill",
    "inpaint_full_res",
    "inpaint_full_res_padding",
    "outpaint",
    "outpaint_sides",
)
HIRES_FIELDS = ("enable_hr", "hr_scale", "hr_upscaler", "hr_second_pass_steps")
#: What Upscale and Vary change (A1111's usual values for each).
VARY_STRENGTH = 0.2
#: Filled in by the service when a picture is made; a new request leaves them to it.
FILLED_IN = ("kind", "lora_hashes", "emphasis")
MODES = {"whole": "The whole picture", "paint": "Paint a mask", "upload": "Upload a mask", "outpaint": "Grow the edges"}
TYPES = ["png", "jpg", "jpeg", "webp"]
MAX_UPLOAD_MB = MAX_UPLOAD_BYTES // 2**20
CANVAS_SIDE = 448  # the mask painter's longer side on screen, in CSS pixels
BRUSH = "rgba(255, 0, 170, 0.55)"  # see-through magenta: visible on most pictures


def snap_size(width: int, height: int, scale: float = 1.0) -> tuple[int, int]:
    """`width` x `height` times `scale` as a request takes a size (the schema's bounds: each side a
    multiple of 8, within 64-2048), its shape kept where the longer side would pass the largest."""
    bounds = field_bounds(family(KIND).request.model_fields["width"])
    low, high, step = bounds["ge"], bounds["le"], bounds["multiple_of"]
    scale = min(scale, high / max(width, height))
    snapped = (min(high, max(low, int(side * scale) // step * step)) for side in (width, height))
    return tuple(snapped)  # type: ignore[return-value]


def encode(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def picture_state(data: bytes, name: str) -> dict[str, Any]:
    """A starting picture as the page keeps it: the bytes as given (sent as `init_image`), its size
    as the service will read it, and a copy at the mask painter's size. A file the service would
    refuse raises its RequestError now, naming the field."""
    from PIL import Image

    picture = decode_image(data, "init_image")  # the service's own checks
    scale = CANVAS_SIDE / max(picture.size)
    shown = picture.resize(tuple(max(1, round(side * scale)) for side in picture.size), Image.Resampling.LANCZOS)
    buffer = io.BytesIO()
    shown.save(buffer, format="PNG")
    return {
        "name": name,
        "base64": encode(data),
        "size": picture.size,
        "shown": buffer.getvalue(),
        "shown_size": shown.size,
        "digest": hashlib.sha256(data).hexdigest(),
    }


def starting_picture() -> dict[str, Any] | None:
    return st.session_state.get(PICTURE)


def _take_picture(picture: dict[str, Any]) -> None:
    """Before the widgets are drawn: the picture to start from, made at the model's size in its
    shape (the Size offers its own), the whole of it changed until a mask is chosen."""
    st.session_state[PICTURE] = picture
    st.session_state["image.size"] = "Model default"
    st.session_state["image.edit_mode"] = "whole"


def _take_upload() -> None:
    upload = st.session_state.get("image.upload")
    if upload is None:
        return
    try:
        _take_picture(picture_state(upload.getvalue(), upload.name))
    except RequestError as exc:
        st.session_state["image.upload_error"] = str(exc)


def _remove_picture() -> None:
    st.session_state.pop(PICTURE, None)


def apply_pending_edit() -> None:
    """At the top of the Image page: an "Edit this" from a result or the Gallery, its picture the
    starting picture and its recipe's prompts in the page."""
    pending = st.session_state.pop(PENDING, None)
    if pending is not None:
        _take_picture(pending["picture"])
        st.session_state["image.prompt"] = pending["prompt"]
        st.session_state["image.negative_prompt"] = pending["negative_prompt"]


def picture_section() -> dict[str, Any]:
    """The "Start from a picture" expander: the picture (an upload), what to change (all of it, a
    painted or uploaded mask's area, or new edges), the strength, then that change's settings.
    Returns the picture fields' values (None: the schema's default)."""
    values: dict[str, Any] = dict.fromkeys(PICTURE_FIELDS)
    picture = starting_picture()
    with st.expander("Start from a picture", expanded=picture is not None, icon=":material/photo:"):
        if picture is None:
            st.file_uploader(
                f"A PNG, JPEG or WebP picture (up to {MAX_UPLOAD_MB} MB)",
                type=TYPES,
                key="image.upload",
                on_change=_take_upload,
                help=family(KIND).request.model_fields["init_image"].description,
            )
            if error := st.session_state.pop("image.upload_error", None):
                st.error(plain(error), icon=":material/error:")
            return values
        thumb, about = st.columns([1, 3], vertical_alignment="center")
        thumb.image(picture["shown"], width=120)
        about.text(picture["name"])
        about.caption("{} x {} pixels".format(*picture["size"]))
        about.button("Remove", key="image.remove_picture", icon=":material/close:", on_click=_remove_picture)
        values["init_image"] = picture["base64"]
        st.session_state.setdefault("image.edit_mode", "whole")
        mode = st.segmented_control("Change", list(MODES), format_func=MODES.get, key="image.edit_mode", required=True)
        left, right = st.columns(2)
        with left:
            values["strength"] = field_widget(KIND, "strength")
        if mode == "whole":  # an edit keeps the picture's frame: only the repainted part is fitted
            with right:
                values["resize_mode"] = field_widget(KIND, "resize_mode")
        if mode == "paint":
            values["mask"] = _painted_mask(picture)
        elif mode == "upload":
            values["mask"] = _uploaded_mask()
        elif mode == "outpaint":
            values["outpaint"] = field_widget(KIND, "outpaint")
            values["outpaint_sides"] = _sides()
        if mode != "whole":
            values.update(_mask_options(outpaint=mode == "outpaint"))
    return values


def mask_from_drawing(drawing: bytes, size: tuple[int, int]) -> str | None:
    """The mask painter's drawing (a PNG, transparent where nothing is painted, at its size on
    screen) as the request's mask: white where painted, at the picture's size, in base64 PNG;
    None when nothing is painted."""
    from PIL import Image

    alpha = decode_image(drawing, "mask", "RGBA").getchannel("A")
    mask = alpha.resize(size, Image.Resampling.BILINEAR).point(lambda value: 255 if value >= 64 else 0)
    if mask.getbbox() is None:
        return None
    buffer = io.BytesIO()
    mask.save(buffer, format="PNG")
    return encode(buffer.getvalue())


def _painted_mask(picture: dict[str, Any]) -> str | None:
    from streamlit_drawable_canvas import st_canvas

    st.session_state.setdefault("image.brush", 24)
    brush = st.columns([1, 2])[0].slider("Brush", 4, 96, key="image.brush", help="Its width on screen, in pixels.")
    width, height = picture["shown_size"]
    drawing = st_canvas(
        stroke_width=brush,
        stroke_color=BRUSH,
        background_image=picture["shown"],
        width=width,
        height=height,
        drawing_mode="freedraw",
        return_image_data=True,
        key=f"image.canvas.{picture['digest'][:16]}",  # a new picture, a new drawing
    ).image_bytes
    try:
        mask = None if drawing is None else mask_from_drawing(drawing, picture["size"])
    except RequestError as exc:
        st.error(plain(str(exc)), icon=":material/error:")
        return None
    if mask is None:
        st.caption("Paint over what to repaint. Until you do, the whole picture is changed.")
    return mask


def _uploaded_mask() -> str | None:
    info = family(KIND).request.model_fields["mask"]
    upload = st.file_uploader(
        field_option(info).label,
        type=TYPES,
        key="image.mask_upload",
        help=info.description,
    )
    if upload is None:
        return None
    data = upload.getvalue()
    try:
        decode_image(data, "mask", "L")
    except RequestError as exc:  # sent all the same: Generate answers with the same words
        st.error(plain(str(exc)), icon=":material/error:")
    return encode(data)


def _sides() -> list[str]:
    info = family(KIND).request.model_fields["outpaint_sides"]
    choices = typing.get_args(typing.get_args(info.annotation)[0])
    st.session_state.setdefault("image.outpaint_sides", info.get_default(call_default_factory=True))
    return st.multiselect(field_option(info).label, choices, key="image.outpaint_sides", help=info.description)


def _mask_options(outpaint: bool) -> dict[str, Any]:
    """Blur and masked content; for a mask, also invert and "only masked" with its padding."""
    values: dict[str, Any] = {}
    left, right = st.columns(2)
    with left:
        values["mask_blur"] = field_widget(KIND, "mask_blur")
        if not outpaint:
            values["inpainting_mask_invert"] = field_widget(KIND, "inpainting_mask_invert")
    with right:
        values["inpainting_fill"] = field_widget(KIND, "inpainting_fill")
        if not outpaint:
            values["inpaint_full_res"] = field_widget(KIND, "inpaint_full_res")
            if values["inpaint_full_res"]:
                values["inpaint_full_res_padding"] = field_widget(KIND, "inpaint_full_res_padding")
    return values


def hires_section() -> dict[str, Any]:
    """The "Hires fix" expander, for text-to-image only (no starting picture): on or off, then
    its scale, upscaler, second-pass steps and strength."""
    values: dict[str, Any] = dict.fromkeys(HIRES_FIELDS)
    if starting_picture() is not None:
        return values
    with st.expander("Hires fix", expanded=bool(st.session_state.get("image.enable_hr")), icon=":material/hd:"):
        values["enable_hr"] = field_widget(KIND, "enable_hr")
        if values["enable_hr"]:
            left, right = st.columns(2)
            with left:
                values["hr_scale"] = field_widget(KIND, "hr_scale")
                values["hr_upscaler"] = field_widget(KIND, "hr_upscaler")
            with right:
                values["hr_second_pass_steps"] = field_widget(KIND, "hr_second_pass_steps")
                values["strength"] = field_widget(KIND, "strength", label="Second pass strength")
    return values


def recipe_of(output: dict[str, Any]) -> dict[str, Any] | None:
    """The image request an output was made by (a scene's picture has its own); None for others."""
    request = (output.get("recipe") or {}).get("request") or {}
    if output["kind"] != KIND or request.get("kind", KIND) != KIND or not request.get("prompt"):
        return None
    return {name: value for name, value in request.items() if name not in FILLED_IN}


def upscale_request(recipe: dict[str, Any], data: bytes, size: tuple[int, int]) -> dict[str, Any]:
    """The picture of `size` redrawn larger from itself, as `muselab upscale` asks for it."""
    return upscale_fields(recipe, size, encode(data))


def vary_request(recipe: dict[str, Any]) -> dict[str, Any]:
    """The same recipe with a fresh variation seed: a picture near this one (A1111's variation seed).
    An edit of a starting picture has no starting noise to blend: it gets a new seed instead."""
    if recipe.get("init_image"):
        return {**recipe, "seed": secrets.randbelow(MAX_SEED + 1)}
    return {**recipe, "subseed": secrets.randbelow(MAX_SEED + 1), "subseed_strength": VARY_STRENGTH}


def _run(request: dict[str, Any], note: str, leave: Callable[[], None] | None) -> None:
    """Submit `request` as the Image page's job (its progress, cancel and results are the page's)
    and go there; a refusal is shown where the button is."""
    before = st.session_state.get("image.job")
    submit(KIND, request)
    job = st.session_state.get("image.job")
    if job and job != before:
        st.session_state[NOTE] = (job, note)
        if leave:
            leave()
        go_to(KIND)


def picture_actions(output: dict[str, Any], data: bytes, leave: Callable[[], None] | None = None) -> None:
    """Edit this, Upscale and Vary under a picture; `leave` is called before going to the Image
    page (the Gallery closes its dialog)."""
    from PIL import Image

    recipe = recipe_of(output)
    if recipe is None:
        return
    size = Image.open(io.BytesIO(data)).size  # the header only
    upscaled = upscale_request(recipe, data, size)
    larger = (upscaled["width"], upscaled["height"])
    key = output["id"]
    edit, upscale, vary = st.columns(3)
    if edit.button(
        "Edit this",
        key=f"edit.{key}",
        icon=":material/edit:",
        width="stretch",
        help="Start from this picture on the Image page, with its prompt: change all of it, "
        "repaint a part (inpainting) or grow its edges.",
    ):
        try:
            picture = picture_state(data, output["filename"])
        except RequestError as exc:  # a file changed on disk since it was made
            st.error(plain(str(exc)), icon=":material/error:")
        else:
            prompts = {"prompt": recipe["prompt"], "negative_prompt": recipe.get("negative_prompt") or ""}
            st.session_state[PENDING] = {"picture": picture, **prompts}
            if leave:
                leave()
            go_to(KIND)
    wording = "{} x {}".format(*larger)
    if upscale.button(
        "Upscale",
        key=f"upscale.{key}",
        icon=":material/zoom_in:",
        width="stretch",
        disabled=larger == size,
        help=f"A {wording} version: this picture redrawn at twice its size from itself "
        f"(strength {UPSCALE_STRENGTH}), with its prompt, model and seed."
        if larger != size
        else "Already as large as muselab makes pictures.",
    ):
        note = f"Upscale to {wording} pixels: this picture redrawn from itself at strength {UPSCALE_STRENGTH}."
        _run(upscaled, note, leave)
    if vary.button(
        "Vary",
        key=f"vary.{key}",
        icon=":material/shuffle:",
        width="stretch",
        help=f"The same recipe with a random variation seed at strength {VARY_STRENGTH}: a picture near this "
        "one (an edit of a starting picture: a new seed).",
    ):
        request = vary_request(recipe)
        if recipe.get("init_image"):
            note = f"The same edit with a new seed ({request['seed']}; it was {recipe.get('seed')})."
        else:
            seeds = f"seed {recipe.get('seed')}: variation seed {request['subseed']}"
            note = f"Variation of {seeds} at strength {VARY_STRENGTH}."
        _run(request, note, leave)
