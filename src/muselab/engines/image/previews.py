"""Live previews while sampling: the latents so far as a small picture."""

from __future__ import annotations

from typing import Any

import torch

# Approximate RGB of SD 1.x/2.x latents: a free preview while sampling (no VAE call).
_LATENT_RGB = torch.tensor(
    [
        [0.3512, 0.2297, 0.3227],
        [0.3250, 0.4974, 0.2350],
        [-0.2829, 0.1762, 0.2721],
        [-0.2120, -0.2616, -0.7177],
    ]
)


def tiny_decoder_upscale(config: Any) -> int:
    """How many pixels a tiny autoencoder (TAESD) draws per latent pixel, per side."""
    return int(config.upsampling_scaling_factor ** (len(config.decoder_block_out_channels) - 1))


def latents_to_preview(latents: torch.Tensor, tiny_vae: Any = None, max_side: int = 128) -> Any:
    """A picture of the first latent in the batch: decoded by the tiny autoencoder (TAESD) when one
    is given (a fraction of a second), else a rough linear projection to RGB (free)."""
    from PIL import Image

    if tiny_vae is not None:
        config = tiny_vae.config
        upscale = tiny_decoder_upscale(config)
        latent = latents[:1]
        # A thumbnail needs no more latent pixels than its own side over the decoder's upscale:
        # shrink big latents first, so a preview costs milliseconds whatever the image size.
        shrink = max(latent.shape[-2:]) * upscale / max_side
        if shrink > 1:
            size = [max(1, round(side / shrink)) for side in latent.shape[-2:]]
            latent = torch.nn.functional.interpolate(latent.float(), size=size, mode="area")
        # The thumbnail's latents are far smaller than a tile: decode them whole even where the
        # same decoder was left tiling by a big image's final decode.
        tiling, tiny_vae.use_tiling = tiny_vae.use_tiling, False
        try:
            with torch.inference_mode():
                decoded = tiny_vae.decode(latent.to(tiny_vae.dtype) / config.scaling_factor).sample[0]
        finally:
            tiny_vae.use_tiling = tiling
        rgb = decoded.float().cpu().permute(1, 2, 0)
    else:
        rgb = torch.einsum("chw,cr->hwr", latents[0].float().cpu(), _LATENT_RGB)
    rgb = ((rgb + 1) / 2).clamp(0, 1).mul(255).to(torch.uint8).numpy()
    image = Image.fromarray(rgb)
    image.thumbnail((max_side, max_side))
    return image
