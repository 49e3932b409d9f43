"""Text to image with Stable Diffusion (diffusers): load once, then generate with progress and cancel."""

from __future__ import annotations

import dataclasses
import secrets
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from muselab.config import model_label
from muselab.devices import Placement
from muselab.engines.base import (
    LOADING,
    Cancelled,
    CancelToken,
    GenerationResult,
    ImageOutput,
    ModelUnavailable,
    ProgressCallback,
    ProgressClock,
    cancellable,
    engine_result,
    load_or_explain,
    locate_model,
    wants_previews,
)
from muselab.engines.image import hires
from muselab.engines.image.emphasis import pipeline_inputs, weights_record
from muselab.engines.image.family import GENERIC_DEFAULTS
from muselab.engines.image.img2img import (
    DEFAULT_RESIZE_MODE,
    denoising_steps,
    fit,
    fitted_size,
    image_to_image,
    round_trip,
    steps_run,
    strength_of,
)
from muselab.engines.image.inpaint import (
    DEFAULT_FILL,
    INPAINTING_CHANNELS,
    OUTPAINT_FILL,
    canvas,
    edits_region,
    inpaint_inputs,
    inpainting_pipeline,
)
from muselab.engines.image.lora import ChosenLora, chosen_loras, fuse_loras, with_prompt_loras
from muselab.engines.image.lora import identity as lora_identity
from muselab.engines.image.previews import latents_to_preview, tiny_decoder_upscale
from muselab.engines.image.schedulers import make_scheduler, steps_in_float32
from muselab.engines.image.speed import LCM_LORA_FILE, TIERS, apply_tier, check_steps
from muselab.engines.image.step_cache import StepCachedUNet, TorchSplitUNet
from muselab.engines.image.step_cache import unsupported_reason as step_cache_obstacle
from muselab.engines.runtime import RuntimePlan, engine_plan
from muselab.engines.runtime import auto_uses_openvino as auto_uses_openvino  # the benchmark imports it from here
from muselab.families import catalogue_entry
from muselab.loras import LoraFile
from muselab.quantize import return_freed_memory as release_memory
from muselab.schemas import MAX_SEED, ImageRequest, RequestError

if TYPE_CHECKING:
    from muselab.engines.image.openvino import OpenVinoSetup

#: From this many pixels up the VAE decodes (and encodes) in tiles, so a large image (hires fix's
#: 1024x1024 included) never needs the whole decoder's activations (several GB at 2048x2048) at once.
TILED_DECODE_PIXELS = 1024 * 1024


def text_encoders(pipe: Any) -> list[Any]:
    return [encoder for name in ("text_encoder", "text_encoder_2") if (encoder := getattr(pipe, name, None))]


def quantize_pipeline(pipe: Any, dtype: torch.dtype) -> int:
    """int8 weights for the UNet (linear layers and convolutions) and the text encoders' linear
    layers; the rest (norms, embeddings, the VAE, whose decode quality shows most) is then cast to
    `dtype`, the dtype the pipeline computes in. Returns the number of layers quantized."""
    from muselab.quantize import quantize_linears, return_freed_memory

    count = quantize_linears(pipe.unet, convolutions=True)
    pipe.unet.to(dtype)
    for module in text_encoders(pipe):
        count += quantize_linears(module)
        module.to(dtype)
    pipe.vae.to(dtype)
    return_freed_memory()  # the bf16 copies just replaced
    return count


def load_dtype(placement: Placement, quantize: str) -> torch.dtype:
    """The dtype to read weights in. With int8, float32 machines read bfloat16 first: the linear
    layers become int8 anyway, and it halves the peak memory while loading; only the convolutions
    and norms keep bfloat16's rounding (far below int8's)."""
    if quantize == "int8" and placement.dtype == torch.float32:
        return torch.bfloat16
    return placement.dtype


class ImageEngine:
    kind = "image"

    def __init__(
        self,
        pipe: Any,
        model: str,
        plan: RuntimePlan | Placement | None = None,
        *,
        openvino: OpenVinoSetup | None = None,
        loras: tuple[ChosenLora, ...] = (),
        **options: Any,
    ):
        """Wrap a loaded diffusers text-to-image pipeline to run as `plan` says; see `ImageEngine.load`.
        With a placement (or nothing) instead of a plan, `options` make one (`runtime.engine_plan`:
        PyTorch and float weights unless they say otherwise).

        A plan on OpenVINO needs `openvino`, made from the model's folder (`openvino_setup`): the
        UNet and the VAE decoder are converted first if the cache lacks them. `loras` are the LoRAs
        already fused into `pipe` (`lora.fuse_loras`).
        """
        plan = engine_plan("image", model, plan, options)
        plan.require()
        if plan.backend == "openvino" and openvino is None:
            raise ValueError("OpenVINO converts the model from its folder: use ImageEngine.load")
        pipe.set_progress_bar_config(disable=True)
        self.load_timings: dict[str, float] = {}
        if openvino is not None:
            from muselab.engines.image.openvino import use_openvino
            from muselab.quantize import quantize_linears

            self.load_timings = use_openvino(
                pipe,
                openvino.source,
                plan.openvino_cache,
                plan.dtype,
                plan.quantize,
                openvino.on_progress,
                openvino.unet_config,
                openvino.loras,
            )
            if plan.quantize in ("int8", "int8-full"):
                for module in text_encoders(pipe):
                    quantize_linears(module)
        elif plan.quantize == "int8":
            quantize_pipeline(pipe, plan.dtype)
        if plan.offload:
            pipe.enable_model_cpu_offload()
        else:
            pipe = pipe.to(plan.device)
        if plan.low_memory:
            pipe.enable_attention_slicing()
            pipe.vae.enable_slicing()
        if plan.device == "cuda" and openvino is None:
            # cuDNN's fastest convolutions want NHWC; on CPUs (oneDNN) it measured no faster here.
            pipe.unet.to(memory_format=torch.channels_last)
        if plan.compile:
            pipe.unet = compile_unet(pipe.unet, plan.device)
        self.pipe = pipe
        self.model = model
        self.plan = plan
        self.placement = dataclasses.replace(plan.placement, quantize=plan.quantize, backend=plan.backend)
        self.low_memory = plan.low_memory
        self._full_vae = pipe.vae
        self._fast_vaes: dict[str, Any] = {}
        self._model_sources: dict[str, str] = {}
        self._preview_vae: Any = None  # TAESD for previews once found; False if it cannot be had
        self.fast_decoder, self.offline = plan.fast_decoder, plan.offline
        self._scheduler_config = dict(pipe.scheduler.config)
        self.has_safety_checker = getattr(pipe, "safety_checker", None) is not None
        self.defaults = catalogue_entry(model) or GENERIC_DEFAULTS
        self.native_size = int(pipe.unet.config.sample_size * pipe.vae_scale_factor)
        self.loras = loras
        self._needs_reload = False  # a LoRA change failed half-way: the next request loads afresh

    @classmethod
    def load(
        cls,
        model: str,
        plan: RuntimePlan | Placement | None = None,
        *,
        on_progress: ProgressCallback | None = None,
        loras: tuple[ChosenLora, ...] = (),
        loras_may_fail: bool = False,
        **options: Any,
    ) -> ImageEngine:
        """Load a hub id or local folder (safetensors only) through diffusers' `from_pretrained`, to
        run as `plan` says (`runtime.image_plan`; with a placement or nothing, `options` make it),
        with `loras` fused into its weights (`loras_may_fail`: loaded without them where they do not
        fit the model, as for the default tier's). `on_progress` hears about a one-time OpenVINO conversion."""
        with LOADING:  # diffusers' first import, one thread at a time (see LOADING)
            from diffusers import AutoPipelineForText2Image

        plan = engine_plan("image", model, plan, options)
        plan.require()  # before a download: what cannot run here is not fetched either
        source = locate_model(model, plan.offline, "image")
        openvino = None
        if plan.backend == "openvino":
            from muselab.engines.image.openvino import openvino_setup

            plan, openvino = openvino_setup(plan, Path(source), on_progress, lora_identity(loras))
        extra: dict[str, Any] = {}
        if not plan.safety_checker:
            extra = {"safety_checker": None, "requires_safety_checker": False}
        dtype = load_dtype(plan.placement, plan.quantize)
        if openvino is not None:
            dtype = plan.dtype  # converted from full precision; NNCF makes the int8 weights
            if openvino.unet_cached and not loras:
                # The converted UNet replaces it: never read its weights. (LoRAs also reach the
                # text encoder, through the pipeline, which wants its UNet for that.)
                extra["unet"] = None
        pipe = load_or_explain(
            lambda: AutoPipelineForText2Image.from_pretrained(
                source, dtype=dtype, use_safetensors=True, local_files_only=True, **extra
            ),
            model,
            "image",
        )
        try:
            # peft and diffusers build the adapter layers under process-wide state (see LOADING).
            with LOADING:
                fuse_loras(pipe, loras)
        except RequestError:
            if not loras_may_fail:
                raise
            loras = ()
            if openvino is not None:  # it was looked up for the fused UNet
                plan, openvino = openvino_setup(plan, Path(source), on_progress)
        return cls(pipe, model, plan, openvino=openvino, loras=loras)

    def prepare(self, request: ImageRequest, on_progress: ProgressCallback | None = None) -> None:
        """Fuse the LoRAs `request` names, where they are not the ones fused now: the model is
        loaded again with them (the weights int8 and OpenVINO work from must be the fused ones;
        on OpenVINO each set of LoRAs is a one-time conversion, cached, that `on_progress` hears of)."""
        wanted = chosen_loras(request, self.plan.lora_dir)
        if TIERS[request.speed or "quality"].lcm_lora:
            wanted = (self.lcm_lora(request.lcm_lora_model), *wanted)
        if lora_identity(wanted) == lora_identity(self.loras) and not self._needs_reload:
            return
        kept = {name: getattr(self, name) for name in ("_fast_vaes", "_model_sources", "_preview_vae")}
        if self.plan.low_memory:  # one copy of the weights at a time, at the cost of a reload on failure
            self._needs_reload, self.pipe, self._full_vae = True, None, None
            release_memory()
        try:
            fresh = type(self).load(self.model, self.plan, on_progress=on_progress, loras=wanted)
        except RequestError:
            if self.pipe is not None:  # the loaded model is untouched: keep serving it
                raise
            self._needs_reload = True
            raise
        self.pipe = self._full_vae = None
        release_memory()
        self.__dict__.update({**fresh.__dict__, **kept})

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
            # diffusers' tiled decode takes the upscale to be 2**out_channels (8, as in TAESD);
            # a decoder with another upscale must tile by its own, or its tiles do not fit.
            vae.spatial_scale_factor = tiny_decoder_upscale(vae.config)
            vae.tile_latent_min_size = vae.tile_sample_min_size // vae.spatial_scale_factor
            self._fast_vaes[source] = vae.to(self.placement.device).eval()
        return self._fast_vaes[source]

    def lcm_lora(self, label: str | None = None) -> ChosenLora:
        """The fast tier's LCM-LoRA: the one a resolved request names (by label), else the plan's."""
        return lcm_lora_choice(self.plan, self._model_sources.get(label or "", label) or self.plan.lcm_lora)

    def _source_label(self, source: str) -> str:
        """How a fast decoder or an LCM-LoRA is named in a resolved request (a folder by its name,
        see `model_label`), remembering which id or folder the name stands for."""
        if source in self._model_sources:  # a label already (`generate` resolves a resolved request)
            return source
        label = model_label(source)
        self._model_sources[label] = source
        return label

    def preview_decoder(self) -> Any:
        """The tiny autoencoder for live previews, or None where it cannot be had (then previews
        fall back to a linear latent-to-RGB projection). Never downloads while offline."""
        if self._preview_vae is None:
            try:
                self._preview_vae = self.fast_vae()
            except ModelUnavailable:
                self._preview_vae = False
        return self._preview_vae or None

    @property
    def model_name(self) -> str:
        return Path(self.model.rstrip("/")).name

    def steps(self, request: ImageRequest) -> int:
        """The progress steps `request` takes: its denoising steps for each image (from a starting
        picture, the share its strength runs; at least one, the VAE's round trip), with hires fix's
        second pass."""
        steps = request.steps or self.defaults.steps or 1
        return (steps_run(request, steps) + hires.second_pass_steps(request, steps)) * request.num_images

    def inputs(self, request: ImageRequest) -> tuple[Any, Any]:
        """The request's starting picture and mask (each None where it has none), as stored."""
        from muselab.uploads import InputStore

        if request.init_image is None:
            return None, None
        if self.plan.inputs_dir is None:
            raise ValueError("this engine was given no inputs folder to find starting pictures in")
        store = InputStore(self.plan.inputs_dir)
        mask = None if request.mask is None else store.load(request.mask, "mask", "L")
        return store.load(request.init_image, "init_image"), mask

    def resolve(self, request: ImageRequest) -> ImageRequest:
        """Fill every unset field from the model's defaults, so the recipe is complete; LoRAs named
        by `<lora:...>` tags in the prompt join `loras`, each recorded with its hash."""
        request = apply_tier(with_prompt_loras(request).model_copy(update={"speed": request.speed or "quality"}))
        check_steps(request)
        width, height = request.width, request.height
        edits = edits_region(request)
        if self.pipe.unet.config.in_channels == INPAINTING_CHANNELS and not edits:
            raise RequestError(
                f"mask: '{self.model_name}' is an inpainting model: it repaints the masked area of a starting "
                "picture; send init_image and a mask (or outpaint), or choose another model"
            )
        if request.init_image is not None and not (width and height):
            # The input's shape (the repainted region's, for an edit), at the model's size.
            picture, mask = self.inputs(request)
            area = canvas(request, picture, mask).region_size if edits else picture.size
            fitted = fitted_size(area, self.native_size)
            width, height = width or fitted[0], height or fitted[1]
        uses_strength = request.init_image is not None or request.enable_hr
        fill = request.inpainting_fill or (OUTPAINT_FILL if request.mask is None else DEFAULT_FILL)
        request = request.model_copy(
            update={
                "strength": strength_of(request) if uses_strength else None,
                "resize_mode": (request.resize_mode or DEFAULT_RESIZE_MODE)
                if request.init_image is not None and not edits
                else None,
                "inpainting_fill": fill if edits else None,
            }
        )
        asked = hires.second_pass_steps(request, request.steps or self.defaults.steps or 1, before_strength=True)
        if hires.applies(request) and denoising_steps(asked, request.strength or 0.0) < 1:
            raise RequestError(
                "strength: hires fix's second pass runs hr_second_pass_steps (or steps) x strength steps, "
                "none here; raise either"
            )
        return request.model_copy(
            update={
                "emphasis": weights_record(request.prompt, request.negative_prompt),
                "lora_hashes": {lora.name: lora.file.hash for lora in chosen_loras(request, self.plan.lora_dir)},
                "model": model_label(self.model),
                "seed": request.seed if request.seed is not None else secrets.randbelow(MAX_SEED + 1),
                # A variation seed only where it is used; drawn like the seed where none is given.
                "subseed": (request.subseed if request.subseed is not None else secrets.randbelow(MAX_SEED + 1))
                if request.subseed_strength > 0
                else None,
                "width": width or self.native_size,
                "height": height or self.native_size,
                "steps": request.steps or self.defaults.steps,
                "guidance": request.guidance if request.guidance is not None else self.defaults.guidance,
                "scheduler": request.scheduler or self.defaults.scheduler,
                "decoder_model": self._source_label(request.decoder_model or self.fast_decoder)
                if request.decoder == "fast"
                else None,
                "decoder": request.decoder or "full",
                "lcm_lora_model": self._source_label(request.lcm_lora_model or self.plan.lcm_lora)
                if TIERS[request.speed or "quality"].lcm_lora
                else None,
            }
        )

    def generate(
        self,
        request: ImageRequest,
        on_progress: ProgressCallback | None = None,
        cancel: CancelToken | None = None,
        preview_every: int | None = None,
    ) -> GenerationResult:
        """`preview_every` steps a small preview rides on the progress event; by default every
        eighth of the way where the listener shows pictures (`wants_previews`), else none."""
        request = self.resolve(request)
        assert request.seed is not None and request.steps is not None
        self.prepare(request)  # where the job service has not (a direct call, a test, the benchmark)
        per_image = self.steps(request) // request.num_images
        if preview_every is None:
            preview_every = max(1, per_image // 8) if wants_previews(on_progress) else 0
        cancel = cancel or CancelToken()
        self.pipe.scheduler = steps_in_float32(make_scheduler(request.scheduler, self._scheduler_config))
        # One engine runs one generation at a time (the job service's run lock), so the decoder
        # can be chosen per request.
        if request.decoder == "fast":
            assert request.decoder_model is not None
            self.pipe.vae = self.fast_vae(self._model_sources.get(request.decoder_model, request.decoder_model))
        else:
            self.pipe.vae = self._full_vae
        if self.low_memory or hires.largest_area(request) >= TILED_DECODE_PIXELS:
            self.pipe.vae.enable_tiling()
        else:
            self.pipe.vae.disable_tiling()
        preview_vae = self.preview_decoder() if preview_every else None
        split = self.split_unet() if TIERS[request.speed or "quality"].step_cache else None
        picture, mask = self.inputs(request)
        edit = canvas(request, picture, mask) if edits_region(request) else None
        start = None  # img2img's starting picture, fitted to the requested size
        if picture is not None and edit is None:
            start = fit(picture, request.width, request.height, request.resize_mode or DEFAULT_RESIZE_MODE)
        if edit is not None:  # the region to repaint, at the size it is denoised at
            region = edit.cropped(edit.picture, request.width, request.height)
            region_mask = edit.cropped(edit.mask, request.width, request.height)
            pipe = inpainting_pipeline(self.pipe)
        else:
            # From a starting picture: the image-to-image pipeline over the same components, as set above.
            pipe = self.pipe if start is None else image_to_image(self.pipe)
        second_pass_pipe = image_to_image(self.pipe) if hires.applies(request) else None
        # A1111's emphasis and long prompts as embeddings (once for every image); plain prompts as text.
        prompts = pipeline_inputs(self.pipe, request.prompt, request.negative_prompt)
        clock = ProgressClock(per_image * request.num_images, on_progress, items=request.num_images)
        started = time.perf_counter()
        outputs: list[ImageOutput] = []
        for index in range(request.num_images):
            cancel.raise_if_cancelled()
            seed = (request.seed + index) % (MAX_SEED + 1)
            generator = torch.Generator("cpu").manual_seed(seed)

            def on_step_end(pipe: Any, step: int, timestep: Any, tensors: dict[str, Any], index=index) -> dict:
                if cancel.cancelled:
                    raise Cancelled()
                preview = None
                if preview_every and (step + 1) % preview_every == 0:
                    preview = latents_to_preview(tensors["latents"], preview_vae)
                clock.advance(index, preview=preview)
                return tensors

            def denoise(pipe: Any, steps: int, generator: Any = generator, **inputs: Any) -> Any:
                unet = pipe.unet
                if split is not None:  # a fresh cache for each image
                    pipe.unet = StepCachedUNet(unet, split)
                try:
                    with cancellable(cancel):
                        return pipe(
                            **prompts,
                            num_inference_steps=steps,
                            guidance_scale=request.guidance,
                            generator=generator,
                            callback_on_step_end=on_step_end,
                            callback_on_step_end_tensor_inputs=["latents"],
                            **inputs,
                        )
                finally:
                    pipe.unet = unet

            strength = request.strength or 0.0
            try:
                if (start is not None or edit is not None) and denoising_steps(request.steps, strength) == 0:
                    # Strength 0: nothing to denoise; the picture through the VAE, as A1111 returns it.
                    clock.advance(index)
                    image = round_trip(pipe, start if edit is None else region, generator)
                    outputs.append(ImageOutput(image=image if edit is None else edit.paste(image), seed=seed))
                    continue
                if edit is not None:
                    fill = request.inpainting_fill or DEFAULT_FILL
                    painted = inpaint_inputs(pipe, region, region_mask, fill, generator)
                    size = {"width": request.width, "height": request.height}
                    result = denoise(pipe, request.steps, strength=strength, **size, **painted.as_kwargs())
                    result.images[0] = edit.paste(result.images[0])
                elif start is not None:
                    result = denoise(pipe, request.steps, image=start, strength=strength)
                else:
                    # The same generator, past the starting noise: a sampler's own draws continue the
                    # seed's sequence, as when the pipeline draws the starting noise itself.
                    first = {"width": request.width, "height": request.height}
                    first["latents"] = self.initial_noise(request, generator, index)
                    if request.enable_hr:
                        first["output_type"] = "latent" if request.hr_upscaler == "Latent" else "pil"
                    result = denoise(pipe, request.steps, **first)
                    if request.enable_hr:
                        upscaled = hires.upscaled(result.images, request)
                        second = hires.second_pass_steps(request, request.steps, before_strength=True)
                        result = denoise(second_pass_pipe, second, image=upscaled, strength=strength)
            except Cancelled:
                raise Cancelled(completed=outputs) from None
            flagged = bool(result.nsfw_content_detected and result.nsfw_content_detected[0])
            outputs.append(ImageOutput(image=result.images[0], seed=seed, flagged=flagged))
        return engine_result(self, request, outputs, started)

    def split_unet(self) -> Any:
        """The UNet as its deep and shallow paths, for the balanced tier's step caching."""
        unet = self.pipe.unet
        problem = step_cache_obstacle(unet.config)
        if problem is None and hasattr(unet, "shallow_part") and unet.shallow_part is None:
            problem = "its converted UNet has no shallow path"
        if problem is not None:
            raise RequestError(
                f"speed: balanced reuses the UNet's deep features between steps, and '{self.model_name}' "
                f"cannot: {problem}. Choose quality, fast or turbo."
            )
        return unet if hasattr(unet, "shallow_part") else TorchSplitUNet(unet)

    def initial_noise(self, request: ImageRequest, generator: torch.Generator, index: int = 0) -> torch.Tensor:
        """The seed's starting latents, drawn in float32 from its CPU `generator` whatever the
        engine's dtype and device, then cast: so one seed starts every placement from the same
        noise (in float32, exactly the noise the pipeline would have drawn). Left to the
        pipeline, float16 noise comes from a half-precision path that, in some PyTorch builds,
        draws other numbers than float32's (on an H200, float16 pictures read 11 dB PSNR from
        float32's, all of it from the starting noise)."""
        shape = (
            1,
            int(self.pipe.unet.config.in_channels),
            request.height // self.pipe.vae_scale_factor,
            request.width // self.pipe.vae_scale_factor,
        )
        noise = torch.randn(shape, generator=generator, dtype=torch.float32)
        if request.subseed_strength > 0 and request.subseed is not None:
            # A1111's variation seed: image i blends in subseed + i's noise, as its seed is seed + i.
            other = torch.Generator("cpu").manual_seed((request.subseed + index) % (MAX_SEED + 1))
            noise = slerp(request.subseed_strength, noise, torch.randn(shape, generator=other, dtype=torch.float32))
        encoders = text_encoders(self.pipe)
        # The pipeline's latents take its prompt embeddings' dtype, i.e. the text encoder's.
        return noise.to(encoders[0].dtype if encoders else self.placement.dtype)


def slerp(weight: float, low: torch.Tensor, high: torch.Tensor) -> torch.Tensor:
    """A1111's spherical blend of two noises (`modules/processing.py:slerp`), over the same axis it
    uses (dim 1 of each 3-D noise), so a variation seed reproduces A1111's variations."""
    low, high = low[0], high[0]
    low_norm = low / torch.norm(low, dim=1, keepdim=True)
    high_norm = high / torch.norm(high, dim=1, keepdim=True)
    dot = (low_norm * high_norm).sum(1)
    if dot.mean() > 0.9995:
        return (low * (1 - weight) + high * weight)[None]
    omega = torch.acos(dot)
    so = torch.sin(omega)
    blended = (torch.sin((1.0 - weight) * omega) / so).unsqueeze(1) * low + (torch.sin(weight * omega) / so).unsqueeze(
        1
    ) * high
    return blended[None]


def lcm_lora_choice(plan: RuntimePlan, source: str | None = None) -> ChosenLora:
    """The fast tier's LCM-LoRA (`source`, default the plan's), downloaded the first time it is
    needed (unless offline)."""
    source = source or plan.lcm_lora
    folder = Path(locate_model(source, plan.offline, "LCM-LoRA (the fast speed tier's)"))
    path = folder / LCM_LORA_FILE
    if not path.is_file():
        raise ModelUnavailable(f"The LCM-LoRA folder '{source}' has no {LCM_LORA_FILE}.")
    return ChosenLora(LoraFile(model_label(source), path), 1.0, "the fast speed tier's LCM-LoRA (SD 1.x)")


def default_loras(plan: RuntimePlan, settings: Any) -> tuple[ChosenLora, ...]:
    """What a request that names no LoRA and no speed gets fused: the LCM-LoRA where the default
    tier is fast (and the model an SD 1.x one it fits); nothing where it cannot be had here."""
    from muselab.engines.image.speed import choose_speed

    speed = choose_speed(ImageRequest(prompt="-", model=plan.model), settings).speed
    if not TIERS[speed or "quality"].lcm_lora:
        return ()
    try:
        return (lcm_lora_choice(plan),)
    except ModelUnavailable:
        return ()  # the first fast request says what to download


def compile_unet(unet: Any, device: str) -> Any:
    """torch.compile the UNet. On CPUs inductor's freezing prepacks the convolution and linear
    weights for oneDNN (measured here: 6.3 s -> 5.1 s a step at 512x512 float32, after about
    100 s of compiling, a minute more when the timestep first changes; inductor's on-disk cache
    shortens both on later starts)."""
    if device == "cpu":
        import torch._inductor.config as inductor_config

        inductor_config.freezing = True
    return torch.compile(unet)
