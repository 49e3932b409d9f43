"""Clips on the Music page: a clip to continue (an upload, or a result's "Continue this"), kept
whole or only its new part, and a melody to follow (an upload, or "Use as melody"); and the Continue
this and Use as melody buttons under every clip. Each control is its request field's (label and help
from the schema, through `form.field_widget` or `field_option`). An uploaded clip travels in the
request as base64 and is never written to disk here: the job service checks it and keeps it by
content hash; a clip of the history travels as "output:ID", which the service reads itself."""

from __future__ import annotations

import base64
import io
import math
from collections.abc import Callable
from typing import Any

import streamlit as st

from muselab.config import Settings
from muselab.families import family
from muselab.schemas import HISTORY_OUTPUT, RequestError, field_bounds, field_option
from muselab.ui.common import backend, go_to, plain, waveform_png
from muselab.ui.form import field_widget
from muselab.uploads import AUDIO_FORMATS, MAX_UPLOAD_BYTES, decode_audio, float_wav

KIND = "music"
CLIP_FIELDS = ("audio_prompt", "new_only", "melody")
#: Where the page keeps each clip field's clip (as `clip_state` makes it): `KIND.` and a widget
#: name, so that "Use these settings again" sets them too (`clips_of_recipe`).
SLOTS = {"audio_prompt": "clip", "melody": "melody_clip"}
UPLOADS = {"audio_prompt": "clip_upload", "melody": "melody_upload"}
PENDING = "music.pending"  # a "Continue this" or "Use as melody" on its way to the Music page
SWITCHED = "music.model_switched"  # (the melody model "Use as melody" chose, the model it replaced)
DURATION = "music.duration"
MODEL = "music.model"
#: A continuation's default length: this many seconds of new music after the clip.
MORE_SECONDS = 10
MAX_UPLOAD_MB = MAX_UPLOAD_BYTES // 2**20
WAVE = (480, 64)  # the waveform picture of a chosen clip, in pixels
#: What a clip drawn from a recipe is called (its length is not known here).
FROM_RECIPE = {"audio_prompt": "The clip that piece continued", "melody": "The melody that piece followed"}


def encode(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def longest_piece() -> float:
    """The longest piece a request may ask for (the schema's bound on `duration`)."""
    return float(field_bounds(family(KIND).request.model_fields["duration"])["le"])


def continuation_duration(seconds: float) -> float:
    """The default length of a piece continuing a clip of `seconds`: the clip and MORE_SECONDS more
    (whole seconds, as the slider steps), at most the longest piece."""
    return float(min(longest_piece(), math.ceil(seconds) + MORE_SECONDS))


def clip_state(value: str, name: str, seconds: float | None, wav: bytes | None) -> dict[str, Any]:
    """A clip as the page keeps it: what the request sends (`value`: base64, "output:ID" or
    "sha256:..."), its name and length (None: not known here), and its waveform picture."""
    shown = None if wav is None else waveform_png(wav, *WAVE)
    return {"value": value, "name": name, "seconds": seconds, "shown": shown}


def uploaded_clip(data: bytes, name: str, field: str) -> dict[str, Any]:
    """An uploaded clip, checked as the service will (a file it would refuse raises its
    RequestError now, naming the field): sent as the bytes given, in base64."""
    samples, rate = decode_audio(data, field)
    step = max(1, samples.shape[1] // (WAVE[0] * 64))  # enough frames for a waveform of WAVE's width
    return clip_state(encode(data), name, samples.shape[1] / rate, float_wav(samples[:, ::step], rate))


def output_clip(output: dict[str, Any], data: bytes) -> dict[str, Any]:
    """A clip of the history, sent as "output:ID"."""
    return clip_state(HISTORY_OUTPUT + output["id"], output["filename"], clip_seconds(data), data)


def clip_seconds(data: bytes) -> float:
    """An output's length in seconds, from its header (a muselab WAV)."""
    import soundfile

    return float(soundfile.info(io.BytesIO(data)).duration)


def _take(field: str, clip: dict[str, Any]) -> None:
    """Before the widgets are drawn: the clip for `field`; a clip to continue also sets Duration to
    the clip and MORE_SECONDS more (the piece includes the clip, so it must be longer)."""
    st.session_state[f"{KIND}.{SLOTS[field]}"] = clip
    if field == "audio_prompt" and clip["seconds"] is not None:
        st.session_state[DURATION] = continuation_duration(clip["seconds"])


def _take_upload(field: str) -> None:
    upload = st.session_state.get(f"{KIND}.{UPLOADS[field]}")
    if upload is None:
        return
    try:
        _take(field, uploaded_clip(upload.getvalue(), upload.name, field))
    except RequestError as exc:
        st.session_state[f"{KIND}.{UPLOADS[field]}_error"] = str(exc)


def _remove(field: str) -> None:
    st.session_state.pop(f"{KIND}.{SLOTS[field]}", None)
    if field == "melody":
        st.session_state.pop(SWITCHED, None)


def chosen_clip(field: str) -> dict[str, Any] | None:
    return st.session_state.get(f"{KIND}.{SLOTS[field]}")


def apply_pending_clip() -> None:
    """At the top of the Music page: a "Continue this" (the clip, Duration past it, its prompt) or a
    "Use as melody" (the melody, and a melody model where the chosen one cannot follow it)."""
    pending = st.session_state.pop(PENDING, None)
    if pending is None:
        return
    _take(pending["field"], pending["clip"])
    if pending.get("prompt"):
        st.session_state[f"{KIND}.prompt"] = pending["prompt"]
    if pending.get("model"):
        st.session_state[SWITCHED] = (pending["model"], chosen_model())
        st.session_state[MODEL] = pending["model"]


def is_melody_model(label: str) -> bool:
    """Whether a model can follow a melody, by its name (the service checks it for sure)."""
    return "melody" in label.lower()


def chosen_model() -> str:
    """The model the Music page would use: the one named in its settings, else the configured one."""
    return st.session_state.get(MODEL) or backend().info()["models"].get(KIND, "")


def melody_model() -> str | None:
    """The melody model to offer: the configured one if it is one, else a served one, local
    folders first (the tiny one in preset tiny: no download), then the catalogue's smallest."""
    info = backend().info()
    configured = info["models"].get(KIND, "")
    if is_melody_model(configured):
        return configured
    served = Settings(**({"preset": info["preset"]} if info.get("preset") else {})).served_models(KIND)
    melodic = [label for label in served if is_melody_model(label)]
    melodic.sort(key=lambda label: served[label] == label)  # a folder's label first, then hub ids
    return melodic[0] if melodic else None


def _switch_model(label: str) -> None:
    st.session_state[SWITCHED] = (label, chosen_model())
    st.session_state[MODEL] = label


def clip_section() -> dict[str, Any]:
    """The "Continue a clip" and "Follow a melody" expanders. Returns the clip fields' values
    (None: the schema's default)."""
    values: dict[str, Any] = dict.fromkeys(CLIP_FIELDS)
    _continue_section(values)
    _melody_section(values)
    return values


def _expander(field: str, icon: str) -> Any:
    label = field_option(family(KIND).request.model_fields[field]).label
    return st.expander(label, expanded=chosen_clip(field) is not None, icon=icon)


def _uploader(field: str) -> None:
    """The upload of a clip for `field`, and what was wrong with the last one."""
    key = f"{KIND}.{UPLOADS[field]}"
    st.file_uploader(
        f"A WAV, FLAC, OGG or MP3 clip (up to {MAX_UPLOAD_MB} MB)",
        type=list(AUDIO_FORMATS),
        key=key,
        on_change=_take_upload,
        args=(field,),
        max_upload_size=MAX_UPLOAD_MB,
        help=family(KIND).request.model_fields[field].description,
    )
    if error := st.session_state.pop(f"{key}_error", None):
        st.error(plain(error), icon=":material/error:")


def _clip_row(field: str, clip: dict[str, Any]) -> None:
    """The chosen clip: its waveform, name and length, and Remove."""
    if clip["shown"] is not None:
        st.image(clip["shown"], width="stretch")
    about, remove = st.columns([3, 1], vertical_alignment="center")
    about.text(clip["name"])
    if clip["seconds"] is not None:
        about.caption(f"{clip['seconds']:.1f} s")
    key = f"{KIND}.remove_{SLOTS[field]}"
    remove.button("Remove", key=key, icon=":material/close:", on_click=_remove, args=(field,))


def _continue_section(values: dict[str, Any]) -> None:
    clip = chosen_clip("audio_prompt")
    with _expander("audio_prompt", ":material/queue_music:"):
        if clip is None:
            st.caption("The new piece starts with the clip and goes on from where it ends.")
            _uploader("audio_prompt")
            return
        _clip_row("audio_prompt", clip)
        values["audio_prompt"] = clip["value"]
        values["new_only"] = field_widget(KIND, "new_only")
        duration, seconds = st.session_state.get(DURATION), clip["seconds"]
        if seconds is None or duration is None:
            st.caption("Duration is the whole piece's, the clip included.")
        elif duration > seconds:
            new = f"{duration - seconds:.1f} s of new music"
            kept = f"only the {new}" if values["new_only"] else f"the clip, then {new}"
            st.caption(f"The piece: {duration:g} s in all; you get {kept}.")
        else:
            st.warning(
                f"Duration is the whole piece's, the clip included: make it longer than the clip ({seconds:.1f} s).",
                icon=":material/timer:",
            )


def _melody_section(values: dict[str, Any]) -> None:
    clip = chosen_clip("melody")
    with _expander("melody", ":material/music_note:"):
        if clip is None:
            st.caption("The music follows the clip's melody; only melody models can (musicgen-melody).")
            _uploader("melody")
            return
        _clip_row("melody", clip)
        values["melody"] = clip["value"]
        model = chosen_model()
        switched = st.session_state.get(SWITCHED)
        if is_melody_model(model):
            if switched and switched[0] == model and switched[1] != model:
                note = f"Model: {model}, which can follow a melody ({switched[1]} cannot)."
                st.info(plain(note), icon=":material/info:")
            return
        offer = melody_model()
        where = "choose a melody model under Advanced settings, Model"
        st.warning(
            plain(f"{model} cannot follow a melody: {where}" + (f" ({offer})." if offer else ".")),
            icon=":material/warning:",
        )
        if offer:
            st.button(f"Use {offer}", key=f"{KIND}.use_melody_model", on_click=_switch_model, args=(offer,))


def clips_of_recipe(request: dict[str, Any]) -> dict[str, Any]:
    """ "Use these settings again": the recipe's clips back in the page (by their stored reference;
    their length is not known here), or none."""
    return {
        SLOTS[field]: clip_state(value, FROM_RECIPE[field], None, None) if (value := request.get(field)) else None
        for field in SLOTS
    }


def clip_actions(output: dict[str, Any], data: bytes, leave: Callable[[], None] | None = None) -> None:
    """Continue this and Use as melody under a clip; `leave` is called before going to the Music
    page (the Gallery closes its dialog)."""
    try:
        seconds = clip_seconds(data)
    except (RuntimeError, ValueError):  # not a clip muselab can read (a file changed on disk)
        return
    longest = longest_piece()
    key = output["id"]
    carry_on, follow = st.columns(2)
    if carry_on.button(
        "Continue this",
        key=f"continue.{key}",
        icon=":material/queue_music:",
        width="stretch",
        disabled=seconds >= longest,
        help=f"On the Music page, a piece that starts with this clip ({seconds:.1f} s) and goes on: "
        f"{continuation_duration(seconds):g} s in all to begin with, with this clip's prompt."
        if seconds < longest
        else f"Already {longest:g} s, the longest piece muselab makes.",
    ):
        clip = output_clip(output, data)
        _go({"field": "audio_prompt", "clip": clip, "prompt": output.get("prompt")}, leave)
    if follow.button(
        "Use as melody",
        key=f"as_melody.{key}",
        icon=":material/music_note:",
        width="stretch",
        help="On the Music page, new music that follows this clip's melody (with a melody model: musicgen-melody).",
    ):
        model = None if is_melody_model(chosen_model()) else melody_model()
        _go({"field": "melody", "clip": output_clip(output, data), "model": model}, leave)


def _go(pending: dict[str, Any], leave: Callable[[], None] | None) -> None:
    st.session_state[PENDING] = pending
    if leave:
        leave()
    go_to(KIND)
