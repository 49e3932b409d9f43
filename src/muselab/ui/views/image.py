import streamlit as st

from muselab.ui.page import family_page

SIZES = {
    "Model default": None,
    "Square 512": (512, 512),
    "Landscape 768x512": (768, 512),
    "Portrait 512x768": (512, 768),
    "Square 768": (768, 768),
    "Small 256": (256, 256),
    "Tiny 64 (test models)": (64, 64),
}


def size_widget() -> dict:
    st.session_state.setdefault("image.size", "Model default")
    size = SIZES[st.selectbox("Size", list(SIZES), key="image.size")]
    return {"width": size[0] if size else None, "height": size[1] if size else None}


def size_of_recipe(request: dict) -> dict:
    match = [name for name, size in SIZES.items() if size == (request.get("width"), request.get("height"))]
    return {"size": match[0] if match else "Model default"}


family_page("image", placed=("width", "height"), draw_placed=size_widget, reuse_placed=size_of_recipe)
