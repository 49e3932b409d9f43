import streamlit as st

from muselab.families import family, kinds
from muselab.ui.backend import BackendError
from muselab.ui.clip import clip_actions
from muselab.ui.common import backend, file_media, go_to, plain, rating, show_output, show_recipe, thumbnail
from muselab.ui.picture import picture_actions

# A grid of thumbnails wants the page's whole width (the other pages read better centred).
st.set_page_config(layout="wide")
st.title("Gallery")
COLUMNS, PAGE = 6, 24
shown = {"Everything": None, **{family(kind).title: kind for kind in kinds()}}
left, middle, right = st.columns([1, 2, 1])
kind = shown[left.selectbox("Show", list(shown), key="gallery.kind")]
text = middle.text_input("Prompt contains", key="gallery.text", max_chars=200)
min_stars = right.selectbox(
    "Rating", [None, 1, 2, 3, 4, 5], key="gallery.stars", format_func=lambda v: "Any" if v is None else f"{v}+ stars"
)
st.session_state.setdefault("gallery.limit", PAGE)


def close_detail() -> None:
    st.session_state.pop("gallery.open", None)


# The open output is kept in the session, so the dialog stays open over reruns until it is closed.
@st.dialog("Output", width="large", on_dismiss=close_detail)
def detail(output: dict) -> None:
    """One output opened from the grid: its picture or player, downloads, rating, recipe, re-run
    and delete. User-written text (prompt, comment) is shown as text, never as Markdown."""
    st.text(output["prompt"])
    st.caption(f"{output['kind']} · seed {output['seed']} · {output['created_at'][:19].replace('T', ' ')}")
    data = show_output(output)
    if data is not None and file_media(output["filename"]) == "image":
        picture_actions(output, data, leave=close_detail)
    elif data is not None and file_media(output["filename"]) == "audio":
        clip_actions(output, data, leave=close_detail)
    comment = (output.get("feedback") or {}).get("comment")
    if comment:
        st.text(comment)
    rating(output)
    show_recipe(output)
    rerun_col, delete_col = st.columns(2)
    if rerun_col.button("Re-run", key=f"rerun.{output['id']}", icon=":material/replay:"):
        request = dict(output["recipe"]["request"])
        job_kind = request.pop("kind", output["kind"])
        try:
            st.session_state[f"{job_kind}.job"] = backend().submit(job_kind, request)
        except (BackendError, ValueError) as exc:
            st.error(plain(str(exc)))
        else:
            close_detail()
            go_to(job_kind)
    if delete_col.button("Delete", key=f"delete.{output['id']}", icon=":material/delete:"):
        st.session_state["gallery.deleted"] = backend().delete(output["id"])
        close_detail()
        st.rerun()


if deleted := st.session_state.pop("gallery.deleted", None):
    st.toast(plain(deleted))
outputs = backend().outputs(kind=kind, text=text or None, min_stars=min_stars, limit=st.session_state["gallery.limit"])
if not outputs:
    st.info("Nothing here yet. Make something on the " + ", ".join(family(kind).title for kind in kinds()) + " page.")
for start in range(0, len(outputs), COLUMNS):
    for column, output in zip(st.columns(COLUMNS), outputs[start : start + COLUMNS], strict=False):
        with column.container(border=True, key=f"tile-{output['id']}"):
            picture = thumbnail(output)
            if picture is not None:
                st.image(picture, width="stretch")
            st.text(output["prompt"][:60] + ("..." if len(output["prompt"]) > 60 else ""))
            stars = (output.get("feedback") or {}).get("stars")
            st.caption(f"{output['kind']} · seed {output['seed']}" + (f" · {'*' * stars}" if stars else ""))
            if st.button("Open", key=f"open.{output['id']}", icon=":material/open_in_full:", width="stretch"):
                st.session_state["gallery.open"] = output["id"]
opened = next((output for output in outputs if output["id"] == st.session_state.get("gallery.open")), None)
if opened is not None:
    detail(opened)
if len(outputs) == st.session_state["gallery.limit"] and st.button("Show more"):
    st.session_state["gallery.limit"] += PAGE
    st.rerun()
