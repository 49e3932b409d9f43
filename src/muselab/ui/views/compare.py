from typing import Any

import streamlit as st

from muselab.families import family, kinds
from muselab.schemas import RequestError, field_bounds, field_option
from muselab.ui.backend import BackendError
from muselab.ui.batch_view import batch_panel, open_batch, recent_batches
from muselab.ui.common import backend, plain

SIZES = {
    "Model default": None,
    "Tiny 64 (test models)": (64, 64),
    "Small 256": (256, 256),
    "Square 512": (512, 512),
    "Landscape 768x512": (768, 512),
    "Portrait 512x768": (512, 768),
}
#: What each kind's X and Y boxes suggest.
EXAMPLES = {
    "image": ("steps=10,20,30", "guidance=1,4,7"),
    "music": ("duration=5,10", "guidance=1,3"),
    "scene": ("duration=5,10", "speed=fast,quality"),
}

# A grid of pictures or players wants the page's whole width (the other pages read better centred).
st.set_page_config(layout="wide")
st.title("Compare")
st.write(
    "One request with one or two of its settings varied: a cell for every combination, all made with one "
    "seed, so that only the settings you vary differ."
)

st.session_state.setdefault("compare.kind", "image" if "image" in kinds() else kinds()[0])
kind = (
    st.segmented_control("Kind", kinds(), key="compare.kind", format_func=lambda k: family(k).title, required=True)
    or kinds()[0]
)
fields = family(kind).request.model_fields


def number(name: str, label: str | None = None) -> Any:
    """An optional number field of the request: empty leaves it to the model."""
    info = fields[name]
    bounds = field_bounds(info)
    kind_of = int if "int" in str(info.annotation) else float
    low, high = bounds.get("ge", bounds.get("gt")), bounds.get("le", bounds.get("lt"))
    key = f"compare.{kind}.{name}"
    st.session_state.setdefault(key, None)
    return st.number_input(
        label or field_option(info).label or name.capitalize(),
        None if low is None else kind_of(low),
        None if high is None else kind_of(high),
        step=kind_of(1),
        key=key,
        placeholder="default",
        help=info.description,
    )


prompt = st.text_area(
    field_option(fields["prompt"]).label or "Prompt",
    key="compare.prompt",
    max_chars=field_bounds(fields["prompt"]).get("max_length"),
    placeholder=field_option(fields["prompt"]).placeholder,
)
base: dict[str, Any] = {"kind": kind}
left, right = st.columns(2)
with left:
    base["model"] = st.text_input(
        "Model (empty = default)", key=f"compare.{kind}.model", max_chars=500, help=fields["model"].description
    ).strip()
    if "width" in fields and "height" in fields:
        size = SIZES[st.selectbox("Size", list(SIZES), key=f"compare.{kind}.size")]
        base["width"], base["height"] = size or (None, None)
with right:
    if "steps" in fields:
        base["steps"] = number("steps")
    if "duration" in fields:
        base["duration"] = number("duration", "Duration (seconds; empty = default)")
    base["seed"] = number("seed", "Seed (empty = random; every cell gets the same)")

x_example, y_example = EXAMPLES.get(kind, ("seed=1,2,3", ""))
x_box, y_box = st.columns(2)
x_text = x_box.text_input("X axis", key=f"compare.{kind}.x", placeholder=x_example, max_chars=2000)
y_text = y_box.text_input("Y axis (optional)", key=f"compare.{kind}.y", placeholder=y_example, max_chars=2000)
st.caption(
    plain(
        "Each axis is FIELD=V1,V2,...: any setting of the request, and a value for each column (or row), "
        'comma-separated; quote a value that has a comma: prompt="a cat, asleep","a dog". '
        f"The fields of {family(kind).title.lower()} requests: " + ", ".join(name for name in fields if name != "kind")
    )
)

if st.button("Make grid", type="primary", key="compare.make", icon=":material/grid_view:"):
    request = {name: value for name, value in base.items() if value not in (None, "")}
    if prompt.strip():
        request["prompt"] = prompt
    if not x_text.strip():
        st.error(f"X axis: give FIELD=V1,V2,..., such as {x_example}.", icon=":material/edit:")
    else:
        try:
            open_batch("compare", backend().submit_grid(request, x_text, y_text.strip() or None))
        except RequestError as exc:  # names the axis (x, y) or the field, and the cell of a bad value
            st.error(plain(str(exc).replace("Invalid request:", "Please change:")), icon=":material/edit:")
        except BackendError as exc:
            st.warning(plain(str(exc)), icon=":material/hourglass_top:")

batch_panel("compare", "grid")
recent_batches("compare", grids=True)
