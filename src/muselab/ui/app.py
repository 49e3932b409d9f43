"""muselab studio: `muselab ui`, or `streamlit run src/muselab/ui/app.py`."""

from __future__ import annotations

import streamlit as st

from muselab.ui.common import apply_style, navigation_pages

st.set_page_config(page_title="muselab", page_icon=":material/graphic_eq:", layout="centered")
apply_style()
navigation = st.navigation(list(navigation_pages().values()))
st.session_state["page"] = navigation.url_path  # which kind the shared family page draws
navigation.run()
