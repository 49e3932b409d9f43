from muselab.ui.page import family_page

family_page("music")
