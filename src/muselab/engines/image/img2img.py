"""Starting from a picture (img2img), as A1111 does it: the input fitted to the requested size by
its resize mode, then denoised from partway (strength) through diffusers' image-to-image
pipeline made from the loaded one (`AutoPipelineForImage2Image.from_pipe`: the same weights)."""

from __future__ import annotations

from typing import Any

from muselab.schemas import ImageRequest
from muselab.upscale import MAX_SIDE as MAX_SIDE  # hires fix's bound too

DEFAULT_STRENGTH = 0.75
DEFAULT_RESIZE_MODE = "just resize"


def denoising_steps(steps: int, strength: float) -> int:
    """How many of `steps` a strength runs: diffusers' and A1111's int(steps x strength)."""
    return min(int(steps * strength), steps)


def strength_of(request: ImageRequest) -> float:
    """The request's strength, A1111's default where it names none."""
    return DEFAULT_STRENGTH if request.strength is None else request.strength


def steps_run(request: ImageRequest, steps: int) -> int:
    """How many of `steps` an image of `request` takes: all of them, or from a starting picture the
    share its strength runs (at least one: strength 0 is the VAE's round trip)."""
    if request.init_image is None:
        return steps
    return max(1, denoising_steps(steps, strength_of(request)))


def fitted_size(size: tuple[int, int], longest: int) -> tuple[int, int]:
    """`size` scaled so its longer side is `longest`, each side a multiple of 8 (at least 64)."""
    width, height = size
    scale = longest / max(width, height)
    return tuple(max(64, round(side * scale / 8) * 8) for side in (width, height))  # type: ignore[return-value]


def fit(image: Any, width: int, height: int, mode: str) -> Any:
    """`image` made `width` x `height` by A1111's resize modes."""
    from PIL import Image, ImageOps

    lanczos = Image.Resampling.LANCZOS
    if mode == "crop and resize":
        return ImageOps.fit(image, (width, height), lanczos)
    if mode != "resize and fill":
        return image.resize((width, height), lanczos)
    # Fit it whole, centred; fill the margins with its edge rows (or columns) stretched, as A1111.
    source_width, source_height = image.size
    if width / height < source_width / source_height:
        fitted = image.resize((width, max(1, round(source_height * width / source_width))), lanczos)
        canvas = Image.new(image.mode, (width, height))
        top = (height - fitted.height) // 2
        canvas.paste(fitted, (0, top))
        if top > 0:
            canvas.paste(fitted.resize((width, top), box=(0, 0, width, 0)), (0, 0))
            bottom = height - top - fitted.height
            edge = fitted.resize((width, bottom), box=(0, fitted.height, width, fitted.height))
            canvas.paste(edge, (0, top + fitted.height))
        return canvas
    fitted = image.resize((max(1, round(source_width * height / source_height)), height), lanczos)
    canvas = Image.new(image.mode, (width, height))
    left = (width - fitted.width) // 2
    canvas.paste(fitted, (left, 0))
    if left > 0:
        canvas.paste(fitted.resize((left, height), box=(0, 0, 0, height)), (0, 0))
        right = width - left - fitted.width
        edge = fitted.resize((right, height), box=(fitted.width, 0, fitted.width, height))
        canvas.paste(edge, (left + fitted.width, 0))
    return canvas


def image_to_image(pipe: Any) -> Any:
    """The image-to-image pipeline over `pipe`'s components as they are now (no weights copied)."""
    from diffusers import AutoPipelineForImage2Image

    made = AutoPipelineForImage2Image.from_pipe(pipe)
    made.set_progress_bar_config(disable=True)
    return made


def round_trip(pipe: Any, image: Any, generator: Any) -> Any:
    """`image` through the VAE and back: what strength 0 gives (nothing is denoised)."""
    import torch
    from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion_img2img import retrieve_latents

    with torch.inference_mode():
        pixels = pipe.image_processor.preprocess(image).to(pipe.vae.device, pipe.vae.dtype)
        latents = retrieve_latents(pipe.vae.encode(pixels), generator)  # the full VAE's or TAESD's
        decoded = pipe.vae.decode(latents).sample
    return pipe.image_processor.postprocess(decoded, output_type="pil")[0]
