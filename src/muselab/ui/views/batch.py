import streamlit as st

from muselab.families import family, kinds
from muselab.schemas import RequestError
from muselab.ui.backend import BackendError
from muselab.ui.batch_view import batch_panel, open_batch, recent_batches
from muselab.ui.common import backend, plain

#: A prompt list bigger than this is not typed by hand: the command line's `muselab batch` takes it.
MAX_LIST_BYTES = 2 * 2**20
EXAMPLE = """# One prompt a line, its options after it as on the command line; # starts a comment.
a red fox in snow, watercolor --steps 20 --seed 5
lo-fi beat with warm piano --kind music -d 8
a {red|green|blue} house at dusk
a __animal__ wearing a hat"""
JSONL_EXAMPLE = """{"prompt": "a red fox in snow", "steps": 20, "seed": 5}
{"kind": "music", "prompt": "lo-fi beat with warm piano", "duration": 8}"""
MODES = {"random": "One pick each", "combinatorial": "Every combination"}

st.title("Batch")
st.write("Many prompts at once: each line of a list is a job, run one after another with one progress and one Cancel.")


def take_upload() -> None:
    """Before the widgets are drawn: an uploaded list goes into the text box, where it can be
    checked and changed; a file too big or not text is refused and the box keeps what it had."""
    upload = st.session_state.get("batch.upload")
    if upload is None:
        return
    if upload.size > MAX_LIST_BYTES:
        st.session_state["batch.upload_error"] = (
            f"{upload.name} is {upload.size / 2**20:.1f} MB; a prompt list here can be at most "
            f"{MAX_LIST_BYTES // 2**20} MB. Split it, or run it with `muselab batch FILE`."
        )
        return
    try:
        st.session_state["batch.text"] = upload.getvalue().decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        st.session_state["batch.upload_error"] = (
            f"{upload.name} is not UTF-8 text (byte {exc.start}); save it as UTF-8 and upload it again."
        )


with st.expander("How to write a prompt list", icon=":material/help:"):
    st.write(
        "Each line is one job: the prompt, then any options of its kind (the same as `muselab image --help` "
        "and `muselab music --help` list). `{a|b|c}` picks one variant; with *Every combination* each variant "
        "is a job of its own. `__name__` picks a line of `name.txt` in the wildcards folder."
    )
    st.code(EXAMPLE, language=None)
    st.write("Or JSON Lines: one request a line, as the API takes them.")
    st.code(JSONL_EXAMPLE, language="json")

area = st.container()
st.file_uploader(
    f"Or upload a list (.txt or .jsonl, up to {MAX_LIST_BYTES // 2**20} MB)",
    type=["txt", "jsonl"],
    key="batch.upload",
    on_change=take_upload,
    max_upload_size=MAX_LIST_BYTES // 2**20,
)
if error := st.session_state.pop("batch.upload_error", None):
    st.error(plain(error), icon=":material/error:")
with area:
    st.session_state.setdefault("batch.text", "")
    st.text_area(
        "Prompt list",
        key="batch.text",
        height=180,
        placeholder="a red fox in snow --steps 20 --seed 5\nlo-fi beat with warm piano --kind music -d 8",
    )
left, middle, right = st.columns(3)
st.session_state.setdefault("batch.kind", "image" if "image" in kinds() else kinds()[0])
kind = left.selectbox(
    "Kind", kinds(), key="batch.kind", format_func=lambda k: family(k).title, help="For lines without --kind."
)
st.session_state.setdefault("batch.dynamic", "random")
dynamic = middle.segmented_control(
    "Variants {a|b}",
    list(MODES),
    key="batch.dynamic",
    format_func=MODES.get,
    required=True,
    help="One pick each: a job per line, each picking its variants. Every combination: a job per combination.",
)
name = right.text_input("Name (optional)", key="batch.name", max_chars=200)

if st.button("Run", type="primary", key="batch.run", icon=":material/playlist_play:"):
    text = st.session_state["batch.text"]
    if not text.strip():
        st.error("Write a prompt a line first, or upload a list.", icon=":material/edit:")
    else:
        try:
            open_batch("batch", backend().submit_batch(text, kind, dynamic or "random", name.strip() or None))
        except RequestError as exc:
            message = str(exc).replace("Invalid request:", "Please change:")  # "line 3: ..." names the line
            st.error(plain(message[:1].upper() + message[1:]), icon=":material/edit:")
        except BackendError as exc:
            st.warning(plain(str(exc)), icon=":material/hourglass_top:")

batch_panel("batch", "list")
recent_batches("batch", grids=False)
