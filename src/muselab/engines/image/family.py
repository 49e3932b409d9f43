"""Stable Diffusion's registration: its request, its catalogue, how it loads and its tiny models."""

from __future__ import annotations

from typing import Any

from muselab.families import CatalogueEntry, Family, TinyModel, lazy
from muselab.schemas import ImageRequest

#: CompVis/stable-diffusion-v1-4's UNet and VAE configs: the SD 1.x architecture the benchmark
#: builds with random weights, and that an estimate counts for a catalogue model not downloaded yet.
SD1_UNET: dict[str, Any] = {
    "sample_size": 64,
    "in_channels": 4,
    "out_channels": 4,
    "block_out_channels": (320, 640, 1280, 1280),
    "layers_per_block": 2,
    "down_block_types": ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    "attention_head_dim": 8,
    "cross_attention_dim": 768,
    "norm_num_groups": 32,
}
SD1_VAE: dict[str, Any] = {
    "in_channels": 3,
    "out_channels": 3,
    "block_out_channels": (128, 256, 512, 512),
    "layers_per_block": 2,
    "latent_channels": 4,
    "sample_size": 512,
    "down_block_types": ("DownEncoderBlock2D",) * 4,
    "up_block_types": ("UpDecoderBlock2D",) * 4,
    "norm_num_groups": 32,
    "scaling_factor": 0.18215,
}

#: Sampler settings for a model that is not in the catalogue (any SD 1.x/2.x id or folder).
GENERIC_DEFAULTS = CatalogueEntry("", "image", "", steps=25, guidance=7.5, scheduler="DPM++ 2M Karras")


def max_steps(request: ImageRequest) -> int:
    return (request.steps or GENERIC_DEFAULTS.steps or 1) * request.num_images


#: The models muselab knows by name; any other id or folder of the same architecture loads too.
CATALOGUE = (
    CatalogueEntry(
        "CompVis/stable-diffusion-v1-4",
        "image",
        "Stable Diffusion 1.4, 512x512",
        default=True,
        steps=25,
        guidance=7.5,
        scheduler="DPM++ 2M Karras",
    ),
    CatalogueEntry(
        "stable-diffusion-v1-5/stable-diffusion-v1-5",
        "image",
        "Stable Diffusion 1.5, 512x512",
        steps=25,
        guidance=7.5,
        scheduler="DPM++ 2M Karras",
    ),
    CatalogueEntry(
        "stable-diffusion-v1-5/stable-diffusion-inpainting",
        "image",
        "Stable Diffusion 1.5 inpainting (9-channel UNet): repaints a masked area, needs init_image and mask",
        steps=25,
        guidance=7.5,
        scheduler="DPM++ 2M Karras",
    ),
    CatalogueEntry(
        "latent-consistency/lcm-lora-sdv1-5",
        "lcm-lora",
        "LCM-LoRA for SD 1.x: the fast speed tier's 4-step sampler (67 MB)",
        default=True,
    ),
    CatalogueEntry(
        "stabilityai/sd-turbo",
        "image",
        "SD 2.1 distilled: 1-4 steps, no guidance, 512x512",
        steps=1,
        guidance=0.0,
        scheduler="Euler a",
    ),
)

FAMILY = Family(
    name="stable-diffusion",
    kind="image",
    request=ImageRequest,
    load=lazy("muselab.engines.image:load"),
    unit="denoising steps",
    output="image",
    title="Image",
    summary='Make an image from a text prompt, e.g. muselab image "a red fox in snow, watercolor".',
    icon=":material/image:",
    catalogue=CATALOGUE,
    architectures=("StableDiffusionPipeline", "StableDiffusionInpaintPipeline"),
    tiny={
        "image": TinyModel("tiny-stable-diffusion", lazy("muselab.engines.image.tiny:build_tiny_stable_diffusion")),
        "decoder": TinyModel("tiny-taesd", lazy("muselab.engines.image.tiny:build_tiny_taesd")),
        "lcm-lora": TinyModel("tiny-lcm-lora", lazy("muselab.engines.image.tiny:build_tiny_lcm_lora")),
    },
    max_steps=max_steps,
    settings=("quantize", "backend", "low_memory", "safety_checker"),
    check=lazy("muselab.engines.image.speed:check_request"),
    estimate=lazy("muselab.engines.image.estimate:estimate_tiers"),
)
