import streamlit as st

from muselab.loras import MAX_WEIGHT
from muselab.ui.common import backend
from muselab.ui.page import family_page
from muselab.ui.picture import (
    HIRES_FIELDS,
    PICTURE_FIELDS,
    apply_pending_edit,
    hires_section,
    picture_section,
    snap_size,
    starting_picture,
)

SIZES = {
    "Model default": None,
    "Square 512": (512, 512),
    "Landscape 768x512": (768, 512),
    "Portrait 512x768": (512, 768),
    "Square 768": (768, 768),
    "Small 256": (256, 256),
    "Tiny 64 (test models)": (64, 64),
}


def placed_widgets() -> dict:
    """Size (with a starting picture, first its own), LoRAs, then the picture editing and hires
    fix sections."""
    picture = starting_picture()
    sizes = {"picture": snap_size(*picture["size"]), **SIZES} if picture else SIZES
    if st.session_state.get("image.size") not in sizes:  # the picture it named was removed
        st.session_state["image.size"] = "Model default"
    size = sizes[st.selectbox("Size", list(sizes), key="image.size", format_func=lambda name: size_label(name, sizes))]
    values = {"width": size[0] if size else None, "height": size[1] if size else None, "loras": lora_widgets()}
    values.update(picture_section())
    values.update(hires_section())
    return values


def size_label(name: str, sizes: dict) -> str:
    if name == "picture":
        return "The picture's own ({} x {})".format(*sizes[name])
    if name == "Model default" and "picture" in sizes:  # see ImageEngine.resolve
        return "Model default (the picture's shape at the model's size)"
    return name


def lora_widgets() -> list[str]:
    """A multiselect of the LoRA folder's files, then a weight for each one chosen."""
    names = backend().info().get("loras") or []
    chosen_before = st.session_state.get("image.loras") or []
    # A recipe may name a LoRA no longer in the folder: it stays listed, so the choice is visible.
    options = names + [name for name in chosen_before if name not in names]
    if not options:
        st.caption("LoRAs: none yet; put NAME.safetensors files in the LoRA folder (MUSELAB_LORA_DIR).")
        return []
    chosen = st.multiselect(
        "LoRAs", options, key="image.loras", help="Fused into the model's weights; on OpenVINO a new set converts once."
    )
    choices = []
    for name in chosen:
        st.session_state.setdefault(f"image.lora_weight.{name}", 1.0)
        weight = st.slider(f"Weight of {name}", -MAX_WEIGHT, MAX_WEIGHT, step=0.05, key=f"image.lora_weight.{name}")
        choices.append(f"{name}:{weight:g}")
    return choices


def placed_of_recipe(request: dict) -> dict:
    match = [name for name, size in SIZES.items() if size == (request.get("width"), request.get("height"))]
    values: dict = {"size": match[0] if match else "Model default"}
    loras = [choice.rpartition(":") for choice in request.get("loras") or []]
    values["loras"] = [name for name, _, _ in loras]
    values.update({f"lora_weight.{name}": float(weight) for name, _, weight in loras})
    return values


apply_pending_edit()
family_page(
    "image",
    placed=("width", "height", "loras", *PICTURE_FIELDS, *HIRES_FIELDS),
    draw_placed=placed_widgets,
    reuse_placed=placed_of_recipe,
)
