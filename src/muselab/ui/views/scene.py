import streamlit as st

from muselab.ui.common import job_panel, rating, show_output, show_recipe, submit

for name, value in {"prompt": "", "image_prompt": "", "music_prompt": "", "duration": 8, "seed": -1}.items():
    st.session_state.setdefault(f"scene.{name}", value)

st.title("Scene")
st.write("One prompt makes a picture and its soundtrack, and an MP4 of the two together.")
st.text_area("Describe the scene", key="scene.prompt", max_chars=2000, placeholder="a quiet harbour at dawn")
with st.expander("Separate prompts for the picture and the music"):
    st.text_input("Picture prompt (empty = the scene prompt)", key="scene.image_prompt", max_chars=2000)
    st.text_input("Music prompt (empty = the scene prompt)", key="scene.music_prompt", max_chars=2000)
left, right = st.columns(2)
left.slider("Soundtrack length (seconds)", 1, 30, key="scene.duration")
right.number_input("Seed (-1 = random)", -1, 2**32 - 1, key="scene.seed")

state = st.session_state
if st.button("Generate", type="primary", key="scene.generate", icon=":material/play_arrow:"):
    submit(
        "scene",
        {
            "prompt": state["scene.prompt"],
            "image_prompt": state["scene.image_prompt"] or None,
            "music_prompt": state["scene.music_prompt"] or None,
            "duration": state["scene.duration"],
            "seed": None if state["scene.seed"] < 0 else state["scene.seed"],
        },
    )

status = job_panel("scene")
if status and status["outputs"]:
    by_kind = {output["kind"]: output for output in status["outputs"]}
    with st.container(border=True):
        st.text(status["request"]["prompt"])
        show_output(by_kind["image"])
        # A scene stopped during its soundtrack keeps only its picture.
        if "music" in by_kind:
            show_output(by_kind["music"], compact=True)
        if "scene" in by_kind:
            st.caption("The MP4: the picture with its soundtrack")
            show_output(by_kind["scene"])
        main = by_kind.get("scene", by_kind["image"])
        rating(main)
        show_recipe(main)
