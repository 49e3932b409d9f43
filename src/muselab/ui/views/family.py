import streamlit as st

from muselab.ui.page import family_page

# The page of a family with no page file of its own (a plugin's): the navigation names its kind.
family_page(st.session_state["page"])
