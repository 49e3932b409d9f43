"""Hires fix, as A1111's `enable_hr`: the picture made at the model's size, upscaled by `hr_scale`
(the decoded picture with Lanczos, or the latents themselves), then denoised again at the larger
size from `strength`, through the image-to-image pipeline over the same weights. The larger
decode (and encode) goes in tiles from `engine.TILED_DECODE_PIXELS` up, so 1024x1024 fits a small
machine."""

from __future__ import annotations

from typing import Any

from muselab.engines.image.img2img import MAX_SIDE, denoising_steps, strength_of
from muselab.schemas import ImageRequest


def hires_size(request: ImageRequest) -> tuple[int, int]:
    """The second pass's width and height: each side times `hr_scale` (less where the longer side
    would pass 2048: the shape is kept), a multiple of 8."""
    assert request.width and request.height
    scale = min(request.hr_scale, MAX_SIDE / max(request.width, request.height))
    return tuple(  # type: ignore[return-value]
        min(MAX_SIDE, max(8, round(side * scale / 8) * 8)) for side in (request.width, request.height)
    )


def applies(request: ImageRequest) -> bool:
    return request.enable_hr and request.init_image is None


def second_pass_steps(request: ImageRequest, steps: int, before_strength: bool = False) -> int:
    """The second pass's progress steps (0 without hires fix): `hr_second_pass_steps` (0: `steps`)
    times strength; `before_strength`: the steps the pipeline is asked for, before strength."""
    if not applies(request):
        return 0
    asked = request.hr_second_pass_steps or steps
    return asked if before_strength else max(1, denoising_steps(asked, strength_of(request)))


def largest_area(request: ImageRequest) -> int:
    """The most pixels one decode of `request` makes."""
    assert request.width and request.height
    if not applies(request):
        return request.width * request.height
    width, height = hires_size(request)
    return width * height


def upscaled(first: Any, request: ImageRequest) -> Any:
    """The first pass's output (`images` as the pipeline returned them: PIL pictures, or a batch of
    latents for the Latent upscaler) at the second pass's size."""
    import torch
    from PIL import Image

    width, height = hires_size(request)
    if request.hr_upscaler == "Latent":
        # A1111's "Latent" upscaler: bilinear, no antialiasing, in latent space.
        size = (height * first.shape[-2] // request.height, width * first.shape[-1] // request.width)
        return torch.nn.functional.interpolate(first, size=size, mode="bilinear", antialias=False)
    return first[0].resize((width, height), Image.Resampling.LANCZOS)
