import streamlit as st

from muselab.ui.common import PAGES, backend, device_line, plain, preparing_panel, show_output

st.title("muselab")
st.write("Make music or a picture from a few words, on your own machine.")
music, image, scene = st.columns(3)
if music.button("Music", key="home-music", icon=":material/music_note:", width="stretch", type="primary"):
    st.switch_page(PAGES["music"])
if image.button("Image", key="home-image", icon=":material/image:", width="stretch", type="primary"):
    st.switch_page(PAGES["image"])
if scene.button("Scene", key="home-scene", icon=":material/movie:", width="stretch"):
    st.switch_page(PAGES["scene"])

with st.spinner("Starting muselab..."):
    info = backend().info()
st.caption(device_line(info))
st.caption(plain(f"Music model: {info['models']['music']}"))
st.caption(plain(f"Image model: {info['models']['image']}"))
preparing_panel()

recent = backend().outputs(limit=4)
if recent:
    st.subheader("Recent")
    columns = st.columns(2)
    for index, output in enumerate(recent):
        with columns[index % 2].container(border=True):
            st.text(output["prompt"])
            show_output(output, compact=True)
    st.page_link(PAGES["gallery"], label="All outputs in the Gallery", icon=":material/photo_library:")
