"""Stable Diffusion's registration: its request, its catalogue, how it loads and its tiny models."""

from __future__ import annotations

from muselab.families import CatalogueEntry, Family, TinyModel, lazy
from muselab.schemas import ImageRequest

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
    architectures=("StableDiffusionPipeline",),
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
