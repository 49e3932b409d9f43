"""muselab studio: `muselab ui`, or `streamlit run src/muselab/ui/app.py`."""

from __future__ import annotations

import streamlit as st

from muselab.ui.common import PAGES, apply_style

st.set_page_config(page_title="muselab", page_icon=":material/graphic_eq:", layout="centered")
apply_style()
navigation = st.navigation(
    [
        st.Page(PAGES["home"], title="Home", icon=":material/home:", default=True),
        st.Page(PAGES["music"], title="Music", icon=":material/music_note:"),
        st.Page(PAGES["image"], title="Image", icon=":material/image:"),
        st.Page(PAGES["scene"], title="Scene", icon=":material/movie:"),
        st.Page(PAGES["gallery"], title="Gallery", icon=":material/photo_library:"),
    ]
)
navigation.run()
