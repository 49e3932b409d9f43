"""What an upscale asks for: an image request that enlarges a picture and redraws its detail, built
from the picture and its recipe. The CLI (`muselab upscale`) and the studio's Upscale button share it."""

from __future__ import annotations

import math
from typing import Any

MAX_SIDE = 2048
UPSCALE_SCALE = 2.0
UPSCALE_STRENGTH = 0.3
#: The prompt of an upscale whose picture carries no recipe: the pass only redraws detail.
UPSCALE_PROMPT = "highly detailed, sharp focus"
#: What an upscale takes from the picture's recipe: what it shows and how it was made, not its size,
#: its own starting picture or its edits.
_RECIPE_KEPT = ("prompt", "negative_prompt", "model", "seed", "steps", "guidance", "scheduler", "speed", "loras")


def upscale_fields(
    recipe: dict[str, Any] | None,
    size: tuple[int, int],
    picture: str,
    scale: float = UPSCALE_SCALE,
    strength: float = UPSCALE_STRENGTH,
) -> dict[str, Any]:
    """An image request (as fields) that enlarges `picture` (base64 or a stored reference) of
    `size` by `scale` and redraws its detail: A1111's "SD upscale" without its tiles, i.e. Lanczos
    to the larger size, then an img2img pass at a low strength, with the prompt and seed of the
    picture's `recipe` where it has one. Each side a multiple of 8, at most 2048."""
    fields = {key: recipe[key] for key in _RECIPE_KEPT if recipe and recipe.get(key) not in (None, "", [])}
    scale = min(scale, MAX_SIDE / max(size))  # the longer side at most 2048, the shape kept
    width, height = (min(MAX_SIDE, max(64, round(side * scale / 8) * 8)) for side in size)
    steps = fields.get("steps")
    if steps and int(steps * strength) < 1:  # a 1-step model (turbo) still takes one step
        fields["steps"] = min(150, math.ceil(1 / max(strength, 1e-3)))
    fields = {"prompt": UPSCALE_PROMPT, **fields, "kind": "image", "init_image": picture}
    return fields | {"width": width, "height": height, "strength": strength, "resize_mode": "just resize"}
