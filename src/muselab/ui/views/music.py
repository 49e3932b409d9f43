from muselab.ui.clip import CLIP_FIELDS, apply_pending_clip, clip_section, clips_of_recipe
from muselab.ui.page import family_page

apply_pending_clip()
family_page("music", placed=CLIP_FIELDS, draw_placed=clip_section, reuse_placed=clips_of_recipe)
