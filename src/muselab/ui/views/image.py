import streamlit as st

from muselab.schemas import SCHEDULERS
from muselab.ui.common import job_panel, rating, reuse_settings, show_output, show_recipe, submit

SIZES = {
    "Model default": None,
    "Square 512": (512, 512),
    "Landscape 768x512": (768, 512),
    "Portrait 512x768": (512, 768),
    "Square 768": (768, 768),
    "Small 256": (256, 256),
    "Tiny 64 (test models)": (64, 64),
}
DEFAULTS = {
    "prompt": "",
    "negative": "",
    "size": "Model default",
    "steps": 0,
    "guidance": 7.5,
    "scheduler": "Model default",
    "seed": -1,
    "images": 1,
    "model": "",
    "fast": False,
}
for name, value in DEFAULTS.items():
    st.session_state.setdefault(f"image.{name}", value)

st.title("Image")
st.text_area("Describe the picture", key="image.prompt", max_chars=2000, placeholder="a red fox in snow, watercolor")
st.text_input("Negative prompt (what to keep out)", key="image.negative", max_chars=2000)
left, right = st.columns(2)
left.selectbox("Size", list(SIZES), key="image.size")
right.number_input("Images", 1, 8, key="image.images")
with st.expander("Advanced settings"):
    a, b = st.columns(2)
    a.number_input("Steps (0 = model default)", 0, 150, key="image.steps")
    b.slider("Guidance (CFG)", 0.0, 20.0, step=0.5, key="image.guidance")
    a.selectbox("Sampler", ["Model default", *SCHEDULERS], key="image.scheduler")
    b.number_input("Seed (-1 = random)", -1, 2**32 - 1, key="image.seed")
    st.text_input("Model (hub id or folder; empty = default)", key="image.model")
    st.toggle("Fast decoder (TAESD): much quicker, slightly softer", key="image.fast")

state = st.session_state
if st.button("Generate", type="primary", key="image.generate", icon=":material/play_arrow:"):
    size = SIZES[state["image.size"]]
    submit(
        "image",
        {
            "prompt": state["image.prompt"],
            "negative_prompt": state["image.negative"],
            "width": size[0] if size else None,
            "height": size[1] if size else None,
            "steps": state["image.steps"] or None,
            "guidance": state["image.guidance"],
            "scheduler": None if state["image.scheduler"] == "Model default" else state["image.scheduler"],
            "seed": None if state["image.seed"] < 0 else state["image.seed"],
            "num_images": state["image.images"],
            "model": state["image.model"] or None,
            "decoder": "fast" if state["image.fast"] else "full",
        },
    )

status = job_panel("image")
if status and status["outputs"]:
    columns = st.columns(2)
    for index, output in enumerate(status["outputs"]):
        with columns[index % 2].container(border=True):
            st.caption(f"seed {output['seed']}")
            show_output(output)
            rating(output)
            show_recipe(output)
    request = status["request"]
    match = [name for name, size in SIZES.items() if size == (request["width"], request["height"])]
    st.button(
        "Use these settings again",
        key="image.reuse",
        icon=":material/replay:",
        on_click=reuse_settings,
        args=(
            "image",
            request,
            {
                "prompt": "prompt",
                "negative_prompt": "negative",
                "steps": "steps",
                "guidance": "guidance",
                "scheduler": "scheduler",
                "num_images": "images",
            },
            {"size": match[0] if match else "Model default"},
        ),
    )
