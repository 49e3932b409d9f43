import streamlit as st

from muselab.ui.common import job_panel, rating, show_output, show_recipe, submit
from muselab.ui.form import request_form

st.title("Scene")
st.write("One prompt makes a picture and its soundtrack, and an MP4 of the two together.")
values = request_form("scene")
if st.button("Generate", type="primary", key="scene.generate", icon=":material/play_arrow:"):
    submit("scene", values)

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
