import streamlit as st

from muselab.families import family, kinds
from muselab.ui.common import backend, device_line, go_to, plain, preparing_panel, show_output

st.title("muselab")
st.write("Make music or a picture from a few words, on your own machine.")
for column, kind in zip(st.columns(len(kinds())), kinds(), strict=True):
    kind_family = family(kind)
    primary = kind_family.compose is None  # the scene combines the other two
    if column.button(
        kind_family.title,
        key=f"home-{kind}",
        icon=kind_family.icon,
        width="stretch",
        type="primary" if primary else "secondary",
    ):
        go_to(kind)

with st.spinner("Starting muselab..."):
    info = backend().info()
st.caption(device_line(info))
for kind, model in info["models"].items():
    st.caption(plain(f"{family(kind).title} model: {model}"))
preparing_panel()

recent = backend().outputs(limit=4)
if recent:
    st.subheader("Recent")
    columns = st.columns(2)
    for index, output in enumerate(recent):
        with columns[index % 2].container(border=True):
            st.text(output["prompt"])
            show_output(output, compact=True)
    st.page_link("views/gallery.py", label="All outputs in the Gallery", icon=":material/photo_library:")
