"""Text to image with Stable Diffusion (diffusers): load once, then generate with progress and cancel."""

from __future__ import annotations

import secrets
import time
from pathlib import Path
from typing import Any

import torch

from muselab.config import FAST_DECODER, GENERIC_IMAGE_DEFAULTS, catalogue_entry
from muselab.devices import Placement, choose_placement
from muselab.engines.base import (
    Cancelled,
    CancelToken,
    GenerationResult,
    ImageOutput,
    ProgressCallback,
    ProgressClock,
    engine_result,
    load_or_explain,
    locate_model,
)
from muselab.schemas import MAX_SEED, ImageRequest

# Approximate RGB of SD 1.x/2.x latents: a free preview while sampling (no VAE call).
_LATENT_RGB = torch.tensor(
    [
        [0.3512, 0.2297, 0.3227],
        [0.3250, 0.4974, 0.2350],
        [-0.2829, 0.1762, 0.2721],
        [-0.2120, -0.2616, -0.7177],
    ]
)


def make_scheduler(name: str, base_config: Any) -> Any:
    """A diffusers scheduler for an A1111 sampler name, built on the model's own scheduler config."""
    import diffusers

    config = dict(base_config)
    if name in ("DPM++ 2M Karras", "DPM++ 2M"):
        return diffusers.DPMSolverMultistepScheduler.from_config(
            config,
            algorithm_type="dpmsolver++",
            solver_order=2,
            use_karras_sigmas=name.endswith("Karras"),
            final_sigmas_type="zero",
        )
    classes = {
        "Euler a": diffusers.EulerAncestralDiscreteScheduler,
        "Euler": diffusers.EulerDiscreteScheduler,
        "DDIM": diffusers.DDIMScheduler,
        "PNDM": diffusers.PNDMScheduler,
        "LCM": diffusers.LCMScheduler,
    }
    return classes[name].from_config(config)


class ImageEngine:
    kind = "image"

    def __init__(
        self,
        pipe: Any,
        model: str,
        placement: Placement,
        *,
        fast_decoder: str = FAST_DECODER,
        offline: bool = False,
    ):
        """Wrap a loaded diffusers text-to-image pipeline; see `ImageEngine.load`.

        `fast_decoder` names the tiny autoencoder (TAESD) loaded on the first request that asks
        for `decoder="fast"`.
        """
        pipe.set_progress_bar_config(disable=True)
        self.pipe = pipe.to(placement.device)
        self.model = model
        self.placement = placement
        self._full_vae = pipe.vae
        self._fast_vaes: dict[str, Any] = {}
        self.fast_decoder, self.offline = fast_decoder, offline
        self._scheduler_config = dict(pipe.scheduler.config)
        self.has_safety_checker = getattr(pipe, "safety_checker", None) is not None
        self.defaults = catalogue_entry(model) or GENERIC_IMAGE_DEFAULTS
        self.native_size = int(pipe.unet.config.sample_size * pipe.vae_scale_factor)

    @classmethod
    def load(
        cls,
        model: str,
        placement: Placement | None = None,
        *,
        safety_checker: bool = True,
        offline: bool = False,
        fast_decoder: str = FAST_DECODER,
    ) -> ImageEngine:
        """Load a hub id or local folder (safetensors only) through diffusers' `from_pretrained`."""
        from diffusers import AutoPipelineForText2Image

        placement = placement or choose_placement()
        source = locate_model(model, offline, "image")
        extra: dict[str, Any] = {}
        if not safety_checker:
            extra = {"safety_checker": None, "requires_safety_checker": False}
        pipe = load_or_explain(
            lambda: AutoPipelineForText2Image.from_pretrained(
                source, dtype=placement.dtype, use_safetensors=True, local_files_only=True, **extra
            ),
            model,
            "image",
        )
        return cls(pipe, model, placement, fast_decoder=fast_decoder, offline=offline)

    def fast_vae(self, source: str | None = None) -> Any:
        """A tiny autoencoder (default: this engine's), loaded or downloaded the first time it is needed."""
        source = source or self.fast_decoder
        if source not in self._fast_vaes:
            from diffusers import AutoencoderTiny

            folder = locate_model(source, self.offline, "fast decoder (TAESD)")
            vae = load_or_explain(
                lambda: AutoencoderTiny.from_pretrained(
                    folder, dtype=self.placement.dtype, use_safetensors=True, local_files_only=True
                ),
                source,
                "fast decoder (TAESD)",
            )
            self._fast_vaes[source] = vae.to(self.placement.device).eval()
        return self._fast_vaes[source]

    @property
    def model_name(self) -> str:
        return Path(self.model.rstrip("/")).name

    def resolve(self, request: ImageRequest) -> ImageRequest:
        """Fill every unset field from the model's defaults, so the recipe is complete."""
        return request.model_copy(
            update={
                "model": self.model,
                "seed": request.seed if request.seed is not None else secrets.randbelow(MAX_SEED + 1),
                "width": request.width or self.native_size,
                "height": request.height or self.native_size,
                "steps": request.steps or self.defaults.steps,
                "guidance": request.guidance if request.guidance is not None else self.defaults.guidance,
                "scheduler": request.scheduler or self.defaults.scheduler,
                "decoder_model": (request.decoder_model or self.fast_decoder) if request.decoder == "fast" else None,
            }
        )

    def generate(
        self,
        request: ImageRequest,
        on_progress: ProgressCallback | None = None,
        cancel: CancelToken | None = None,
        preview_every: int = 0,
    ) -> GenerationResult:
        request = self.resolve(request)
        assert request.seed is not None and request.steps is not None
        cancel = cancel or CancelToken()
        self.pipe.scheduler = make_scheduler(request.scheduler, self._scheduler_config)
        # One engine runs one generation at a time (the job service's run lock), so the decoder
        # can be chosen per request.
        self.pipe.vae = self.fast_vae(request.decoder_model) if request.decoder == "fast" else self._full_vae
        clock = ProgressClock(request.steps * request.num_images, on_progress, items=request.num_images)
        started = time.perf_counter()
        outputs: list[ImageOutput] = []
        for index in range(request.num_images):
            cancel.raise_if_cancelled()
            seed = (request.seed + index) % (MAX_SEED + 1)

            def on_step_end(pipe: Any, step: int, timestep: Any, tensors: dict[str, Any], index=index) -> dict:
                if cancel.cancelled:
                    raise Cancelled()
                preview = None
                if preview_every and (step + 1) % preview_every == 0:
                    preview = latents_to_preview(tensors["latents"])
                clock.advance(index, preview=preview)
                return tensors

            try:
                result = self.pipe(
                    prompt=request.prompt,
                    negative_prompt=request.negative_prompt or None,
                    width=request.width,
                    height=request.height,
                    num_inference_steps=request.steps,
                    guidance_scale=request.guidance,
                    generator=torch.Generator("cpu").manual_seed(seed),
                    callback_on_step_end=on_step_end,
                    callback_on_step_end_tensor_inputs=["latents"],
                )
            except Cancelled:
                raise Cancelled(completed=outputs) from None
            flagged = bool(result.nsfw_content_detected and result.nsfw_content_detected[0])
            outputs.append(ImageOutput(image=result.images[0], seed=seed, flagged=flagged))
        return engine_result(self, request, outputs, started)


def latents_to_preview(latents: torch.Tensor, max_side: int = 128) -> Any:
    """A rough RGB picture of the first latent in the batch, without running the VAE."""
    from PIL import Image

    rgb = torch.einsum("chw,cr->hwr", latents[0].float().cpu(), _LATENT_RGB)
    rgb = ((rgb + 1) / 2).clamp(0, 1).mul(255).to(torch.uint8).numpy()
    image = Image.fromarray(rgb)
    image.thumbnail((max_side, max_side))
    return image
