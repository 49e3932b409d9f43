"""Speed tiers: how much work an image costs, chosen openly. Each tier trades look for time in a
way published work has measured; docs/PERFORMANCE.md cites it and has this machine's timings.

- quality: the model's own sampler (25 DPM++ 2M Karras steps, CFG 7.5: two UNet rows a step).
- balanced: the same sampler and steps with the UNet's deep features reused between neighbouring
  steps (DeepCache, Ma et al., CVPR 2024; `step_cache`): the whole UNet every third step, a shallow
  path (under a tenth of its work) on the others.
- fast: the LCM-LoRA (Luo et al. 2023, "LCM-LoRA: A Universal Stable-Diffusion Acceleration
  Module") fused into the SD 1.x model, 4 LCM steps at guidance 1 (one UNet row, no CFG pair), the
  tiny autoencoder (TAESD) to decode.
- turbo: sd-turbo (Sauer et al. 2023, "Adversarial Diffusion Distillation"), 1 step, no guidance,
  TAESD.
- auto: fast on a CPU, quality on a GPU (where quality takes seconds).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from muselab.schemas import ImageRequest, RequestError

if TYPE_CHECKING:
    from muselab.config import Settings

TURBO_MODEL = "stabilityai/sd-turbo"
LCM_LORA = "latent-consistency/lcm-lora-sdv1-5"
LCM_LORA_FILE = "pytorch_lora_weights.safetensors"
#: LCM's schedule is distilled from 50 steps: its scheduler takes at most that many.
LCM_MAX_STEPS = 50


@dataclass(frozen=True)
class Tier:
    name: str
    summary: str
    steps: int | None = None  # None: the model's own default
    guidance: float | None = None
    scheduler: str | None = None
    decoder: str = "full"
    lcm_lora: bool = False
    step_cache: bool = False


TIERS = {
    "quality": Tier("quality", "the model's own sampler and steps, with guidance (two UNet rows a step)"),
    "balanced": Tier(
        "balanced",
        "the model's own sampler and steps, the UNet's deep features reused between steps (DeepCache)",
        step_cache=True,
    ),
    "fast": Tier(
        "fast",
        "LCM-LoRA on the SD 1.x model: 4 LCM steps without guidance (one UNet row), tiny autoencoder",
        steps=4,
        guidance=1.0,
        scheduler="LCM",
        decoder="fast",
        lcm_lora=True,
    ),
    "turbo": Tier("turbo", "sd-turbo: 1 step, no guidance, tiny autoencoder", 1, 0.0, "Euler a", "fast"),
}


def auto_speed(device: str, lcm_lora_here: bool = True) -> tuple[str, str]:
    """What `auto` means on `device`, and why."""
    if device != "cpu":
        return "quality", f"auto on {device}: quality, which takes seconds there"
    if not lcm_lora_here:
        return "quality", (
            f"auto on a CPU would be fast, but its LCM-LoRA is not here and muselab is offline "
            f"(muselab models download {LCM_LORA}): quality"
        )
    return "fast", "auto on a CPU: fast (LCM-LoRA, 4 steps), since quality takes minutes an image here"


def lcm_lora_here(settings: Settings) -> bool:
    """Whether the fast tier's LCM-LoRA can be had: on disk, in the cache, downloadable, or the
    tiny preset's (built with the tiny models when first loaded, so not on disk yet on a first run)."""
    from muselab.engines.base import cached_snapshot

    source = lcm_lora(settings)
    if settings.preset == "tiny" or Path(source).expanduser().is_dir() or not settings.is_offline():
        return True
    try:
        return cached_snapshot(source) is not None
    except ValueError:
        return False


def turbo_model(settings: Settings) -> str:
    """The model the turbo tier runs: MUSELAB_MODELS' "turbo", the tiny preset's, else sd-turbo."""
    return settings.models.get("turbo") or (settings.model_for("image") if settings.preset == "tiny" else TURBO_MODEL)


def lcm_lora(settings: Settings) -> str:
    """Hub id or folder of the LCM-LoRA the fast tier fuses (MUSELAB_MODELS' "lcm-lora" to change it)."""
    return settings.model_for("lcm-lora")


def auto_choice(settings: Settings) -> tuple[str, str]:
    """The tier `auto` picks on this machine, and why."""
    from muselab.devices import choose_placement

    device = choose_placement(settings.device, settings.dtype).device
    return auto_speed(device, device != "cpu" or lcm_lora_here(settings))


def choose_speed(request: ImageRequest, settings: Settings) -> ImageRequest:
    """`request` with its tier decided (the request's, else MUSELAB_SPEED; `auto` by this machine's
    device), and sd-turbo as its model for turbo where it names none."""
    speed = request.speed or settings.speed
    if speed == "auto":
        speed, _ = auto_choice(settings)
        # `auto` yields to a sampler or step count the user chose that the fast tier cannot run.
        own_sampler = request.scheduler not in (None, "LCM") or (request.steps or 0) > LCM_MAX_STEPS
        if speed == "fast" and own_sampler:
            speed = "quality"
    updates: dict[str, object] = {"speed": speed}
    if speed == "turbo" and not request.model:
        updates["model"] = turbo_model(settings)
    return request.model_copy(update=updates)


def apply_tier(request: ImageRequest) -> ImageRequest:
    """The tier's steps, guidance, sampler and decoder where the request leaves them to it."""
    tier = TIERS[request.speed or "quality"]
    return request.model_copy(
        update={
            "steps": request.steps or tier.steps,
            "guidance": request.guidance if request.guidance is not None else tier.guidance,
            "scheduler": request.scheduler or tier.scheduler,
            "decoder": request.decoder or tier.decoder,
        }
    )


def check_steps(request: ImageRequest) -> None:
    """The LCM sampler (the fast tier's) takes at most LCM_MAX_STEPS steps."""
    if request.scheduler == "LCM" and (request.steps or 0) > LCM_MAX_STEPS:
        raise RequestError(
            f"steps: the LCM sampler (the fast tier's) takes 1-{LCM_MAX_STEPS} steps (got {request.steps}); "
            "ask for fewer, or another speed or sampler"
        )


def check_request(request: ImageRequest, settings: Settings) -> ImageRequest:
    """Before a request queues: its speed tier decided (and its model, for turbo), its prompt's
    LoRA tags moved to `loras`, each LoRA found, its steps within what its sampler takes, and its
    starting picture and mask (untrusted uploads) checked, together, and only then kept, named by
    their hashes from then on."""
    from muselab.engines.image.inpaint import check_edit
    from muselab.engines.image.lora import chosen_loras, with_prompt_loras
    from muselab.uploads import InputStore

    request = choose_speed(with_prompt_loras(request), settings)
    chosen_loras(request, settings.loras)
    check_steps(apply_tier(request))
    store = InputStore(settings.inputs)
    picture = None if request.init_image is None else store.read(request.init_image, "init_image")
    mask = None if request.mask is None else store.read(request.mask, "mask", "L")
    check_edit(request, picture, mask)
    if picture is not None:  # checked and kept once, at submit: the job names them by hash
        update = {"init_image": store.kept(request.init_image, picture)}
        if mask is not None:
            update["mask"] = store.kept(request.mask, mask)
        request = request.model_copy(update=update)
    return request
