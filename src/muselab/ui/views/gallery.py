import streamlit as st

from muselab.ui.backend import BackendError
from muselab.ui.common import PAGES, backend, plain, show_output, show_recipe

st.title("Gallery")
kinds = {"Everything": None, "Music": "music", "Images": "image", "Scenes": "scene"}
left, middle, right = st.columns([1, 2, 1])
kind = kinds[left.selectbox("Show", list(kinds), key="gallery.kind")]
text = middle.text_input("Prompt contains", key="gallery.text", max_chars=200)
min_stars = right.selectbox(
    "Rating", [None, 1, 2, 3, 4, 5], key="gallery.stars", format_func=lambda v: "Any" if v is None else f"{v}+ stars"
)
st.session_state.setdefault("gallery.limit", 12)

outputs = backend().outputs(kind=kind, text=text or None, min_stars=min_stars, limit=st.session_state["gallery.limit"])
if not outputs:
    st.info("Nothing here yet. Make something on the Music, Image or Scene page.")
for output in outputs:
    with st.container(border=True):
        st.text(output["prompt"])
        st.caption(f"{output['kind']} · seed {output['seed']} · {output['created_at'][:19].replace('T', ' ')}")
        # User-written text is shown with st.text only: as Markdown a comment could carry links and
        # images whose addresses every visitor's browser would then call.
        show_output(output, compact=True)
        feedback = output.get("feedback") or {}
        if feedback.get("stars") or feedback.get("thumb") or feedback.get("comment"):
            st.caption(f"Rating: {feedback.get('stars') or '-'} stars")
            if feedback.get("comment"):
                st.text(feedback["comment"])
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
                st.switch_page(PAGES[job_kind])
        if delete_col.button("Delete", key=f"delete.{output['id']}", icon=":material/delete:"):
            st.toast(plain(backend().delete(output["id"])))
            st.rerun()
if len(outputs) == st.session_state["gallery.limit"] and st.button("Show more"):
    st.session_state["gallery.limit"] += 12
    st.rerun()
