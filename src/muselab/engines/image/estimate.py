"""How long an image will take on this machine, for each speed tier, before Generate: from this
machine's own finished jobs of the same model, backend and tier where there are some, else from
the work itself (the UNet's and the VAE decoder's FLOPs, counted on the model's architecture)
over this machine's measured matmul speed. Each estimate says which it is."""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import json
import statistics
from pathlib import Path
from typing import TYPE_CHECKING, Any

from muselab.config import model_label
from muselab.engines.image import hires
from muselab.engines.image.family import GENERIC_DEFAULTS, SD1_UNET, SD1_VAE
from muselab.engines.image.img2img import steps_run
from muselab.engines.image.speed import TIERS, apply_tier, auto_choice, choose_speed, turbo_model
from muselab.engines.image.step_cache import full_calls
from muselab.families import catalogue_entry
from muselab.schemas import ImageRequest

if TYPE_CHECKING:
    from muselab.config import Settings

#: The share of the matmul probe's speed a whole UNet step reaches. The OpenVINO UNet step
#: measured at or near the probe's peak on the AVX2 EPYC (docs/PERFORMANCE.md); this machine's own
#: runs replace the guess as soon as there are any.
STEP_EFFICIENCY = 0.9
#: Runs of the same model, backend and tier an estimate from history uses (the latest).
HISTORY_RUNS = 5
#: Names how `Work` is counted, so a stored count from an older way is counted again.
WORK_VERSION = "2: with the shallow path"
ORDER = ("turbo", "fast", "balanced", "quality")


@dataclasses.dataclass(frozen=True)
class Work:
    """GFLOP of one UNet row (one image, no CFG pair), of its shallow path alone (the balanced
    tier's cached steps; 0 where the UNet has none) and of one full VAE decode, at `side` pixels."""

    unet: float
    decode: float
    side: int
    shallow: float = 0.0


def estimate_tiers(request: ImageRequest, settings: Settings, runs: list[dict[str, Any]]) -> dict[str, Any]:
    """{tier: {seconds, source, steps, model}} for each tier, for `request`'s size, image count
    and (where it sets them) steps and guidance; `runs` are this machine's finished image jobs
    (`HistoryStore.run_times`), newest first."""
    from muselab.engines.runtime import image_plan

    chosen = choose_speed(request, settings).speed
    asked = request.speed if request.speed not in (None, "auto") else None
    if asked is None and settings.speed != "auto":
        asked = settings.speed
    reason = f"{asked} was asked for" if asked else auto_choice(settings)[1]
    tiers: dict[str, Any] = {}
    for tier in ORDER:
        tiered = request.model_copy(update={"speed": tier})
        if tier == "turbo" and not request.model:
            tiered = tiered.model_copy(update={"model": turbo_model(settings)})
        model = tiered.model or settings.model_for("image")
        plan = image_plan(settings, model=model)
        backend = dataclasses.replace(plan.placement, quantize=plan.quantize, backend=plan.backend).dtype_name
        filled = _filled(apply_tier(tiered), model)
        work = model_work(model, settings.cache_dir)
        if work is None:
            missing = "the model is not on this machine yet"
            tiers[tier] = {"seconds": None, "source": missing, "model": model_label(model)}
            continue
        gflop = _gflop(filled, work)
        kind_of_run = (model_label(model), backend, tier, filled.decoder)
        same = [run for run in runs if _kind_of_run(run) == kind_of_run][:HISTORY_RUNS]
        rates = [run["seconds"] / _gflop(_parsed(run), work) for run in same if run["seconds"] > 0]
        if rates:
            seconds = statistics.median(rates) * gflop
            source = f"from {len(rates)} earlier run{'s' if len(rates) > 1 else ''} here"
        else:
            seconds = gflop / (_peak_gflops(plan.placement.device, plan.dtype) * STEP_EFFICIENCY)
            source = "estimated from this machine's measured speed, no run of it here yet"
        tiers[tier] = {
            "seconds": round(seconds, 1 if seconds >= 10 else 2),
            "source": source,
            "steps": filled.steps,
            "model": model_label(model),
        }
    return {"tiers": tiers, "chosen": chosen, "reason": reason}


def _filled(request: ImageRequest, model: str) -> ImageRequest:
    defaults = catalogue_entry(model) or GENERIC_DEFAULTS
    return request.model_copy(
        update={
            "steps": request.steps or defaults.steps or 25,
            "guidance": request.guidance if request.guidance is not None else defaults.guidance,
            "decoder": request.decoder or "full",
        }
    )


def _gflop(request: ImageRequest, work: Work) -> float:
    area = (request.width or work.side) * (request.height or work.side) / work.side**2
    rows = 2 if (request.guidance or 0) > 1 else 1  # classifier-free guidance runs the UNet twice
    decode = work.decode if request.decoder == "full" else 0.0  # TAESD costs about 1% of it
    steps = steps_run(request, request.steps or 1)
    unet = steps * work.unet
    if TIERS[request.speed or "quality"].step_cache and work.shallow:
        deep = full_calls(steps)
        unet = deep * work.unet + (steps - deep) * work.shallow
    work_per_image = area * (rows * unet + decode)
    if hires.applies(request):  # the second pass, at the larger size
        side = {"width": request.width or work.side, "height": request.height or work.side}
        width, height = hires.hires_size(request.model_copy(update=side))
        second = hires.second_pass_steps(request, request.steps or 1)
        work_per_image += width * height / work.side**2 * (rows * second * work.unet + decode)
    return request.num_images * work_per_image


def _parsed(run: dict[str, Any]) -> ImageRequest:
    return ImageRequest.model_validate(run["request"])


def _kind_of_run(run: dict[str, Any]) -> tuple[str, str, str, str]:
    request = run["request"]
    return run["model"], run["dtype"], request.get("speed") or "quality", request.get("decoder") or "full"


def model_work(model: str, cache_dir: Path | None = None) -> Work | None:
    """The work of `model` (hub id or folder): counted on its own configs where they are on this
    machine, on the SD 1.x architecture for a catalogue model not downloaded yet (sd-turbo's SD 2.1
    UNet and VAE cost the same within 1%), else None. Kept in `cache_dir` once counted: a later
    process reads it instead of importing diffusers and counting again."""
    from muselab.engines.base import LOADING, cached_snapshot

    folder = Path(model).expanduser()
    if not folder.is_dir():
        with contextlib.suppress(ValueError):  # not a hub id either
            folder = cached_snapshot(model) or folder
    unet_file, vae_file = folder / "unet" / "config.json", folder / "vae" / "config.json"
    if unet_file.is_file() and vae_file.is_file():
        configs = (unet_file.read_text(), vae_file.read_text())
    elif catalogue_entry(model) is not None:
        configs = (json.dumps(SD1_UNET), json.dumps(SD1_VAE))
    else:
        return None
    stored = None
    if cache_dir is not None:
        digest = hashlib.sha256("\n".join((WORK_VERSION, *configs)).encode()).hexdigest()[:16]
        stored = cache_dir / "estimates" / f"work-{digest}.json"
        with contextlib.suppress(OSError, ValueError, TypeError):
            return Work(**json.loads(stored.read_text()))
    # diffusers builds (and first imports) under process-wide state another thread's load would
    # trip on: one at a time. A load in progress holds it for seconds; the estimate waits that long
    # at most, else has no figure this time.
    if not LOADING.acquire(timeout=30):
        return None
    try:
        work = _counted(*configs)
    finally:
        LOADING.release()
    if stored is not None:
        with contextlib.suppress(OSError):
            stored.parent.mkdir(parents=True, exist_ok=True)
            temporary = stored.with_suffix(".part")
            temporary.write_text(json.dumps(dataclasses.asdict(work)))
            temporary.replace(stored)  # whole or not at all, for a process reading it meanwhile
    return work


@functools.lru_cache(maxsize=16)
def _counted(unet_config: str, vae_config: str) -> Work:
    """Count the FLOPs of one UNet row and one VAE decode at the model's native size, on PyTorch's
    meta device: shapes only, no weights and no arithmetic (a few seconds, once per model)."""
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from torch.utils.flop_counter import FlopCounterMode

    from muselab.engines.image.step_cache import ShallowUNet, unsupported_reason

    unet_options = {key: value for key, value in json.loads(unet_config).items() if not key.startswith("_")}
    vae_options = {key: value for key, value in json.loads(vae_config).items() if not key.startswith("_")}
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(unet_options)
        vae = AutoencoderKL.from_config(vae_options)
        side = int(unet.config.sample_size)
        scale = 2 ** (len(vae.config.block_out_channels) - 1)
        latent = torch.empty(1, int(unet.config.in_channels), side, side)
        text = torch.empty(1, 77, int(unet.config.cross_attention_dim))
        with FlopCounterMode(display=False) as unet_flops:
            unet(latent, torch.tensor(500), text)
        with FlopCounterMode(display=False) as vae_flops:
            vae.decode(torch.empty(1, int(vae.config.latent_channels), side, side))
        with FlopCounterMode(display=False) as shallow_flops:
            if unsupported_reason(unet.config) is None:
                features = torch.empty(1, int(unet.config.block_out_channels[0]), side, side)
                ShallowUNet(unet)(latent, torch.tensor(500), text, features)
    return Work(
        unet_flops.get_total_flops() / 1e9,
        vae_flops.get_total_flops() / 1e9,
        side * scale,
        shallow_flops.get_total_flops() / 1e9,
    )


@functools.cache
def _peak_gflops(device: str, dtype: Any) -> float:
    """This machine's matmul speed in the engine's dtype, measured once per process with matrices
    big enough to reach the chip's peak (a fraction of a second)."""
    from muselab.devices import matmul_gflops

    return matmul_gflops(dtype, 2048, 3, device=device, now=True)
