"""Inpainting and outpainting as A1111 does them: the mask (white = repaint) inverted if asked and
blurred at its edge; the picture grown first for outpainting; "only masked" repaints a crop around
the mask at full size; the masked area starts from what `inpainting_fill` says; and the result is
pasted over the input through the blurred mask, so every pixel the mask leaves out is the input's
own. Denoising runs in diffusers' inpainting pipeline made from the loaded one
(`AutoPipelineForInpainting.from_pipe`), for plain and 9-channel inpainting UNets alike."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from muselab.engines.image.img2img import fitted_size
from muselab.schemas import ImageRequest, RequestError

DEFAULT_FILL = "original"
#: An inpainting checkpoint's UNet takes the latents, the mask and the masked picture's latents.
INPAINTING_CHANNELS = 9
#: Outpainting's new margins start from the picture's colours spread outwards, as in A1111's
#: outpainting scripts, unless the request names another masked content.
OUTPAINT_FILL = "fill"


def edits_region(request: ImageRequest) -> bool:
    """Whether `request` repaints part of its starting picture (a mask, or margins to outpaint)."""
    return request.init_image is not None and (request.mask is not None or request.outpaint > 0)


def check_edit(request: ImageRequest, picture: Any, mask: Any) -> None:
    """The request's editing fields against its pictures, before anything is stored or run."""
    if request.init_image is None:
        for field, given in (("mask", request.mask is not None), ("outpaint", request.outpaint > 0)):
            if given:
                raise RequestError(f"{field}: inpainting and outpainting need a starting picture (init_image)")
    if mask is not None and mask.size != picture.size:
        raise RequestError(
            f"mask: must be the size of init_image ({picture.width}x{picture.height}), got {mask.width}x{mask.height}"
        )
    if mask is not None:
        from PIL import ImageOps

        repainted = ImageOps.invert(mask) if request.inpainting_mask_invert else mask
        if repainted.getbbox() is None and request.outpaint == 0:
            raise RequestError("mask: it has no white area (white is repainted), so there is nothing to repaint")
    if request.subseed_strength > 0 and request.init_image is not None:
        raise RequestError(
            "subseed_strength: a variation seed blends the starting noise of text to image; from a "
            "starting picture, change the seed to vary the result"
        )
    if request.enable_hr and request.init_image is not None:
        raise RequestError(
            "enable_hr: hires fix is for text to image; to enlarge a picture, start from it with a larger "
            "width and height (muselab upscale)"
        )


@dataclass
class Canvas:
    """A picture to repaint in part: the whole canvas, what to repaint, and where to work."""

    picture: Any  # the input, grown by the outpainted margins (RGB)
    mask: Any  # white where repainted, blurred at its edge (L), the canvas's size
    region: tuple[int, int, int, int]  # the box repainted: the whole canvas, or around the mask

    @property
    def region_size(self) -> tuple[int, int]:
        left, top, right, bottom = self.region
        return right - left, bottom - top

    def cropped(self, image: Any, width: int, height: int) -> Any:
        """The region of `image` (the canvas's size) at the processing size."""
        from PIL import Image

        return image.crop(self.region).resize((width, height), Image.Resampling.LANCZOS)

    def paste(self, painted: Any) -> Any:
        """`painted` (the region, at the processing size) over the canvas through the blurred
        mask: where the mask is 0 the canvas's own pixels stay, exactly."""
        from PIL import Image

        whole = self.picture.copy()
        whole.paste(painted.convert("RGB").resize(self.region_size, Image.Resampling.LANCZOS), self.region[:2])
        return Image.composite(whole, self.picture, self.mask)


def canvas(request: ImageRequest, picture: Any, mask: Any) -> Canvas:
    """The canvas `request` repaints: `picture` grown by its outpainting, `mask` (white = repaint;
    None: only the grown margins) inverted if asked, then blurred; the region around the mask
    (with its padding) where only the masked area is repainted."""
    from PIL import Image, ImageFilter, ImageOps

    if mask is None:
        mask = Image.new("L", picture.size, 0)
    elif request.inpainting_mask_invert:
        mask = ImageOps.invert(mask.convert("L"))
    picture, mask = outpainted(picture, mask.convert("L"), request.outpaint, request.outpaint_sides)
    if request.mask_blur:
        mask = mask.filter(ImageFilter.GaussianBlur(request.mask_blur))
    region = (0, 0, *picture.size)
    if request.inpaint_full_res:
        from diffusers.image_processor import VaeImageProcessor

        width, height = request.width, request.height
        if not (width and height):  # before resolve: the aspect of the mask's own box
            box = mask.getbbox()
            width, height = box[2] - box[0], box[3] - box[1]
        pad = request.inpaint_full_res_padding
        region = VaeImageProcessor.get_crop_region(mask, width, height, pad=pad)
    return Canvas(picture, mask, region)


def outpainted(picture: Any, mask: Any, pixels: int, sides: list[str]) -> tuple[Any, Any]:
    """`picture` and `mask` grown by `pixels` on each of `sides`; the new margins are masked white
    and start as the picture's edge rows or columns stretched outwards."""
    from PIL import Image

    if not pixels:
        return picture, mask
    left, right, top, bottom = (pixels if side in sides else 0 for side in ("left", "right", "up", "down"))
    width, height = picture.width + left + right, picture.height + top + bottom
    grown = picture.resize((width, height), Image.Resampling.BILINEAR)  # a soft start for the margins
    grown.paste(picture, (left, top))
    grown_mask = Image.new("L", (width, height), 255)
    grown_mask.paste(mask, (left, top))
    return grown, grown_mask


def processing_size(request: ImageRequest, edit: Canvas, native: int) -> tuple[int, int]:
    """The size the repainted region is denoised at when the request names none: its shape, at the
    model's size (so a small masked area is repainted in full detail, A1111's point of "only masked")."""
    return fitted_size(edit.region_size, native)


def filled(picture: Any, mask: Any) -> Any:
    """A1111's "fill" masked content: the masked area painted with the colours around it, spread in
    from coarse to fine (a pull-push pyramid: each level averages the kept pixels under it, and a
    pixel with none takes the coarser level's colour)."""
    from PIL import Image

    keep = torch.from_numpy((np.asarray(mask.convert("L")) < 128).astype(np.float32))[None, None]
    if not keep.any():
        return picture
    rgb = torch.from_numpy(np.asarray(picture.convert("RGB"), dtype=np.float32)).permute(2, 0, 1)[None]
    levels = [(rgb * keep, keep)]
    while max(levels[-1][1].shape[-2:]) > 1:
        total, count = levels[-1]
        size = [max(1, (side + 1) // 2) for side in count.shape[-2:]]
        area = torch.nn.functional.interpolate
        levels.append((area(total, size=size, mode="area"), area(count, size=size, mode="area")))
    colour = None
    for total, count in reversed(levels):
        level = total / count.clamp_min(1e-6)
        if colour is not None:
            coarser = torch.nn.functional.interpolate(colour, size=count.shape[-2:], mode="bilinear")
            level = torch.where(count > 1e-6, level, coarser)
        colour = level
    result = colour * (1 - keep) + rgb * keep
    return Image.fromarray(result[0].permute(1, 2, 0).clamp(0, 255).round().to(torch.uint8).numpy())


@dataclass
class InpaintInputs:
    """What diffusers' inpainting pipeline is called with for one image."""

    image_latents: torch.Tensor
    mask: Any
    masked_image_latents: torch.Tensor

    def as_kwargs(self) -> dict[str, Any]:
        return {"image": self.image_latents, "mask_image": self.mask, "masked_image_latents": self.masked_image_latents}


def inpaint_inputs(pipe: Any, picture: Any, mask: Any, fill: str, generator: torch.Generator) -> InpaintInputs:
    """The starting latents (the region encoded, then `fill` applied to the masked area in latent
    space for the latent choices) and the masked picture's latents (what a 9-channel UNet sees)."""
    from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion_inpaint import retrieve_latents

    if fill == "fill":
        picture = filled(picture, mask)
    vae = pipe.vae
    scale = vae.config.scaling_factor
    with torch.inference_mode():
        pixels = pipe.image_processor.preprocess(picture).to(vae.device, vae.dtype)
        latents = retrieve_latents(vae.encode(pixels), generator) * scale
        repaint = pipe.mask_processor.preprocess(mask, height=picture.height, width=picture.width).to(vae.device)
        masked = (pixels * (repaint < 0.5).to(pixels.dtype)).to(vae.dtype)
        masked_latents = retrieve_latents(vae.encode(masked), generator) * scale
    if fill in ("latent noise", "latent nothing"):
        # The area to repaint, at the latents' size and rounded, as A1111 masks its starting latents.
        small = torch.nn.functional.interpolate(repaint.float(), size=latents.shape[-2:], mode="bilinear")
        repaint_latent = small.round().to(latents.dtype)
        start = latents * (1 - repaint_latent)
        if fill == "latent noise":
            # Drawn on the CPU from the seed's generator, as every other noise here, whatever the device.
            noise = torch.randn(latents.shape, generator=generator, dtype=torch.float32).to(latents)
            start = start + noise * repaint_latent
        latents = start
    return InpaintInputs(latents, mask, masked_latents)


def inpainting_pipeline(pipe: Any) -> Any:
    """The inpainting pipeline over `pipe`'s components as they are now (no weights copied)."""
    from diffusers import AutoPipelineForInpainting

    made = AutoPipelineForInpainting.from_pipe(pipe)
    made.set_progress_bar_config(disable=True)
    return made
