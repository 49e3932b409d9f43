import streamlit as st

from muselab.ui.common import job_panel, rating, reuse_settings, show_output, show_recipe, submit

DEFAULTS = {
    "prompt": "",
    "duration": 8,
    "model": "",
    "temperature": 1.0,
    "top_k": 250,
    "top_p": 0.0,
    "guidance": 3.0,
    "seed": -1,
    "clips": 1,
}
for name, value in DEFAULTS.items():
    st.session_state.setdefault(f"music.{name}", value)

st.title("Music")
st.text_area("Describe the music", key="music.prompt", max_chars=2000, placeholder="lo-fi beat with warm piano, 80 bpm")
st.slider("Duration (seconds)", 1, 30, key="music.duration")
with st.expander("Advanced settings"):
    st.text_input("Model (hub id or folder; empty = default)", key="music.model")
    left, right = st.columns(2)
    left.slider("Temperature", 0.05, 2.0, step=0.05, key="music.temperature")
    right.slider("Guidance (CFG; 1 or less = off)", 0.0, 10.0, step=0.5, key="music.guidance")
    left.number_input("Top-k (0 = off)", 0, 2048, key="music.top_k")
    right.slider("Top-p (0 = off)", 0.0, 1.0, step=0.05, key="music.top_p")
    left.number_input("Seed (-1 = random)", -1, 2**32 - 1, key="music.seed")
    right.number_input("Clips", 1, 8, key="music.clips")

state = st.session_state
if st.button("Generate", type="primary", key="music.generate", icon=":material/play_arrow:"):
    submit(
        "music",
        {
            "prompt": state["music.prompt"],
            "duration": state["music.duration"],
            "model": state["music.model"] or None,
            "temperature": state["music.temperature"],
            "top_k": state["music.top_k"],
            "top_p": state["music.top_p"],
            "guidance": state["music.guidance"],
            "seed": None if state["music.seed"] < 0 else state["music.seed"],
            "num_clips": state["music.clips"],
        },
    )

status = job_panel("music")
if status and status["outputs"]:
    for output in status["outputs"]:
        with st.container(border=True):
            st.text(output["prompt"])
            st.caption(f"seed {output['seed']}")
            show_output(output)
            rating(output)
            show_recipe(output)
    st.button(
        "Use these settings again",
        key="music.reuse",
        icon=":material/replay:",
        on_click=reuse_settings,
        args=(
            "music",
            status["request"],
            {
                "prompt": "prompt",
                "duration": "duration",
                "temperature": "temperature",
                "top_k": "top_k",
                "top_p": "top_p",
                "guidance": "guidance",
                "num_clips": "clips",
            },
        ),
    )
