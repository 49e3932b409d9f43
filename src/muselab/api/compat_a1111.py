"""AUTOMATIC1111-compatible image routes (`/sdapi/v1/...`), for clients written for its web UI."""

from __future__ import annotations

import json
import time
from typing import Any

from fastapi import APIRouter
from pydantic import BaseModel, ConfigDict, Field

from muselab.api.common import ServiceDep, SettingsDep, generate_images, read_b64
from muselab.api.errors import ApiError
from muselab.config import model_label
from muselab.loras import available
from muselab.schemas import MAX_PROMPT_CHARS, MAX_SEED, MAX_UPLOAD_CHARS, SCHEDULERS

router = APIRouter(tags=["compatibility"])

_A1111_SAMPLERS = {
    "DPM++ 2M Karras": "DPM++ 2M Karras",
    "DPM++ 2M": "DPM++ 2M",
    "Euler a": "Euler a",
    "Euler": "Euler",
    "DDIM": "DDIM",
    "PLMS": "PNDM",
    "PNDM": "PNDM",
    "LCM": "LCM",
}


class A1111Txt2Img(BaseModel):
    """A1111's txt2img body. Fields muselab does not support are accepted and ignored."""

    model_config = ConfigDict(extra="allow")
    # May be empty with a script whose lines bring the prompts; muselab's request then names it.
    prompt: str = Field(default="", max_length=MAX_PROMPT_CHARS)
    negative_prompt: str = Field(default="", max_length=MAX_PROMPT_CHARS)
    seed: int = Field(default=-1, ge=-1, le=MAX_SEED)
    steps: int | None = Field(default=None, ge=1, le=150)
    cfg_scale: float | None = Field(default=None, ge=0, le=30)
    width: int | None = Field(default=None, ge=64, le=2048, multiple_of=8)
    height: int | None = Field(default=None, ge=64, le=2048, multiple_of=8)
    sampler_name: str | None = Field(default=None, max_length=100)
    sampler_index: str | None = Field(default=None, max_length=100)
    scheduler: str | None = Field(default=None, max_length=100)
    batch_size: int = Field(default=1, ge=1, le=8)
    n_iter: int = Field(default=1, ge=1, le=8)
    subseed: int = Field(default=-1, ge=-1, le=MAX_SEED)
    subseed_strength: float = Field(default=0.0, ge=0, le=1)
    enable_hr: bool = False
    hr_scale: float = Field(default=2.0, ge=1, le=4)
    hr_upscaler: str | None = Field(default=None, max_length=100)
    hr_second_pass_steps: int = Field(default=0, ge=0, le=150)
    denoising_strength: float | None = Field(default=None, ge=0, le=1)
    script_name: str | None = Field(default=None, max_length=200)
    script_args: list[Any] = Field(default_factory=list, max_length=16)


class A1111Img2Img(A1111Txt2Img):
    """A1111's img2img body as `webuiapi` sends it; unknown fields are accepted and ignored."""

    init_images: list[str] = Field(default_factory=list, max_length=8)
    denoising_strength: float | None = Field(default=0.75, ge=0, le=1)
    resize_mode: int = Field(default=0, ge=0, le=3)
    mask: str | None = None
    mask_blur: int = Field(default=4, ge=0, le=64)
    inpainting_fill: int = Field(default=1, ge=0, le=3)
    inpaint_full_res: bool = False
    inpaint_full_res_padding: int = Field(default=32, ge=0, le=256)
    inpainting_mask_invert: int = Field(default=0, ge=0, le=1)


#: A1111's inpainting_fill numbers ("masked content").
_MASKED_CONTENT = ("fill", "original", "latent noise", "latent nothing")
#: A1111's resize_mode numbers (3, "just resize (latent upscale)", resizes the picture here too).
_RESIZE_MODES = {0: "just resize", 1: "crop and resize", 2: "resize and fill", 3: "just resize"}


@router.post("/sdapi/v1/txt2img")
async def a1111_txt2img(service: ServiceDep, body: A1111Txt2Img) -> dict[str, Any]:
    """AUTOMATIC1111's txt2img: base64 PNGs (with their `parameters` chunk) and the `info` JSON.
    With `script_name` "prompts from file or textbox" (its `script_args`' text: a prompt a line,
    with options), every line is a job of one batch, answered together."""
    if (body.script_name or "").strip().lower() == PROMPTS_FROM_FILE:
        return await _prompt_list(service, body)
    if body.script_name:
        raise ApiError(
            422, f"script_name: muselab runs the '{PROMPTS_FROM_FILE}' script only (got {body.script_name!r})"
        )
    return await _images(service, body, _fields(body))


PROMPTS_FROM_FILE = "prompts from file or textbox"


async def _prompt_list(service: Any, body: A1111Txt2Img) -> dict[str, Any]:
    """A1111's script: each line's options over the body's fields; a line's prompt goes before the
    body's prompt (after it with prompt_position "end"), as A1111 joins them."""
    from starlette.concurrency import run_in_threadpool

    from muselab.batches import batches_for
    from muselab.prompt_list import line_fields
    from muselab.schemas import ImageRequest, RequestError, parse_request

    texts = [arg for arg in body.script_args if isinstance(arg, str) and arg not in ("start", "end")]
    at_end = "end" in body.script_args
    defaults = {key: value for key, value in _fields(body).items() if value is not None}
    requests = []
    try:
        lines = [line for line in (texts[-1] if texts else "").splitlines() if line.strip()]
        for number, line in enumerate(lines, start=1):
            given = line_fields(line, "image")
            fields = {**defaults, **given, "kind": "image"}
            own, base = str(given.get("prompt") or ""), body.prompt.strip()
            fields["prompt"] = " ".join(part for part in ((base, own) if at_end else (own, base)) if part)
            try:
                requests.append(parse_request(ImageRequest, fields))
            except RequestError as exc:
                raise RequestError(f"script_args, line {number}: {exc}") from None
        if not requests:
            raise RequestError("script_args: the prompt text holds no line")
        batches = batches_for(service)
        batch_id = batches.submit(requests, source="a1111")
    except RequestError as exc:
        raise ApiError(422, str(exc), "invalid_request") from None
    status = await run_in_threadpool(batches.wait, batch_id, service.settings.job_timeout * len(requests) + 60)
    outputs = [output for item in status["items"] for output in item["outputs"]]
    if status["status"] != "succeeded":
        failed = next((item for item in status["items"] if item["status"] != "succeeded"), {})
        raise ApiError(503, f"Generation stopped: {failed.get('error') or status['status']}", "cancelled")
    from muselab.media import a1111_parameters

    infotexts = [a1111_parameters(output["recipe"]["request"], output["recipe"]["model_name"]) for output in outputs]
    return {
        "images": [read_b64(service, output) for output in outputs],
        "parameters": body.model_dump(),
        "info": json.dumps(
            {
                "all_prompts": [output["prompt"] for output in outputs],
                "all_seeds": [output["seed"] for output in outputs],
                "infotexts": infotexts,
                "batch_id": batch_id,
            }
        ),
    }


@router.post("/sdapi/v1/img2img")
async def a1111_img2img(service: ServiceDep, body: A1111Img2Img) -> dict[str, Any]:
    """AUTOMATIC1111's img2img: the first of `init_images` (base64, with or without a data URL
    prefix) denoised from `denoising_strength`; answered as txt2img is."""
    if not body.init_images:
        raise ApiError(
            422, "init_images: send the picture to start from (base64 PNG, JPEG or WebP).", "invalid_request"
        )
    fields = {
        **_fields(body),
        "init_image": body.init_images[0],
        "strength": body.denoising_strength,
        "resize_mode": _RESIZE_MODES[body.resize_mode],
        "enable_hr": False,  # A1111's img2img has no hires fix
    }
    if body.mask:
        fields |= {
            "mask": body.mask,
            "mask_blur": body.mask_blur,
            "inpainting_fill": _MASKED_CONTENT[body.inpainting_fill],
            "inpaint_full_res": body.inpaint_full_res,
            "inpaint_full_res_padding": body.inpaint_full_res_padding,
            "inpainting_mask_invert": bool(body.inpainting_mask_invert),
        }
    return await _images(service, body, fields)


class A1111PngInfo(BaseModel):
    image: str = Field(max_length=MAX_UPLOAD_CHARS)


@router.post("/sdapi/v1/png-info")
async def a1111_png_info(body: A1111PngInfo) -> dict[str, Any]:
    """AUTOMATIC1111's PNG Info: a picture's generation text (`info`), its `parameters` parsed into
    A1111's keys, and its other text chunks (`items`). The picture is read in memory and never kept."""
    from muselab.media import MetadataError, a1111_fields, png_text
    from muselab.schemas import RequestError
    from muselab.uploads import decode_base64, decode_image

    try:
        data = decode_base64(body.image, "image")
        decode_image(data, "image")  # a picture, within the limits, before its chunks are read
        text = png_text(data)
    except (RequestError, MetadataError) as error:
        raise ApiError(422, str(error), "invalid_request") from None
    info = text.get("parameters", "")
    items = {key: value for key, value in text.items() if key != "parameters"}
    return {"info": info, "items": items, "parameters": a1111_fields(info) if info else {}}


async def _images(service: Any, body: A1111Txt2Img, fields: dict[str, Any]) -> dict[str, Any]:
    status = await generate_images(service, fields, source="a1111")
    parameters = body.model_dump(exclude={"init_images", "mask"})  # not the pictures back again
    return {
        "images": [read_b64(service, output) for output in status["outputs"]],
        "parameters": parameters,
        "info": json.dumps(_info(status)),
    }


def _fields(body: A1111Txt2Img) -> dict[str, Any]:
    return {
        "prompt": body.prompt,
        "negative_prompt": body.negative_prompt,
        "seed": None if body.seed == -1 else body.seed,
        "steps": body.steps,
        "guidance": body.cfg_scale,
        "width": body.width,
        "height": body.height,
        "scheduler": _a1111_scheduler(body),
        "num_images": min(body.batch_size * body.n_iter, 8),
        "subseed": None if body.subseed == -1 else body.subseed,
        "subseed_strength": body.subseed_strength,
        "enable_hr": body.enable_hr,
        "hr_scale": body.hr_scale,
        # A1111's upscaler names: its latent ones ("Latent", "Latent (bicubic)"...) upscale the
        # latents; every other (ESRGAN and friends, not here) the picture, here with Lanczos.
        "hr_upscaler": "Latent" if (body.hr_upscaler or "").startswith("Latent") else "Lanczos",
        "hr_second_pass_steps": body.hr_second_pass_steps,
        "strength": body.denoising_strength if body.enable_hr else None,
    }


def _a1111_scheduler(body: A1111Txt2Img) -> str | None:
    name = body.sampler_name or body.sampler_index
    if not name:
        return None
    if name == "DPM++ 2M" and (body.scheduler or "").lower() == "karras":
        return "DPM++ 2M Karras"
    if name not in _A1111_SAMPLERS:
        raise ApiError(
            422,
            f"sampler_name '{name}' is not supported; use one of {', '.join(_A1111_SAMPLERS)}.",
            "invalid_request",
        )
    return _A1111_SAMPLERS[name]


def _info(status: dict[str, Any]) -> dict[str, Any]:
    """txt2img's `info`: what A1111 reports of a finished batch, infotexts included."""
    from muselab.media import a1111_parameters

    outputs = status["outputs"]
    resolved = status["request"]
    seeds = [output["seed"] for output in outputs]
    infotexts = [a1111_parameters({**resolved, "seed": seed}, outputs[0]["recipe"]["model_name"]) for seed in seeds]
    return {
        "prompt": resolved["prompt"],
        "all_prompts": [resolved["prompt"]] * len(outputs),
        "negative_prompt": resolved["negative_prompt"],
        "all_negative_prompts": [resolved["negative_prompt"]] * len(outputs),
        "seed": seeds[0] if seeds else None,
        "all_seeds": seeds,
        "subseed": resolved.get("subseed") if resolved.get("subseed") is not None else -1,
        "all_subseeds": [
            (resolved["subseed"] + index) % (MAX_SEED + 1) if resolved.get("subseed") is not None else -1
            for index in range(len(outputs))
        ],
        "subseed_strength": resolved.get("subseed_strength") or 0,
        "width": resolved["width"],
        "height": resolved["height"],
        "sampler_name": resolved["scheduler"],
        "cfg_scale": resolved["guidance"],
        "steps": resolved["steps"],
        "batch_size": len(outputs),
        "sd_model_name": outputs[0]["recipe"]["model_name"] if outputs else None,
        "infotexts": infotexts,
        "job_timestamp": time.strftime("%Y%m%d%H%M%S"),
    }


@router.get("/sdapi/v1/progress")
async def a1111_progress(service: ServiceDep) -> dict[str, Any]:
    running = [job for job in service.active() if job["kind"] == "image"]
    # A one-time model conversion is not sampling: A1111 clients see 0 until the steps start.
    if not running or running[0]["progress"] is None or running[0]["progress"]["stage"] == "converting":
        return {
            "progress": 0.0,
            "eta_relative": 0.0,
            "state": {"job_count": len(running)},
            "current_image": None,
        }
    job = running[0]
    progress = job["progress"]
    live = service.status(job["id"], with_preview=True) or {}
    preview = live.get("preview", "")
    return {
        "progress": progress["fraction"],
        "eta_relative": progress["eta"] or 0.0,
        "state": {
            "job_count": len(running),
            "sampling_step": progress["step"],
            "sampling_steps": progress["total"],
            "job": job["id"],
        },
        "current_image": preview.split(",", 1)[1] if preview else None,
    }


@router.post("/sdapi/v1/interrupt")
async def a1111_interrupt(service: ServiceDep) -> dict[str, Any]:
    stopped = [job["id"] for job in service.active() if job["kind"] == "image" and service.cancel(job["id"])]
    return {"interrupted": stopped}


@router.get("/sdapi/v1/samplers")
async def a1111_samplers() -> list[dict[str, Any]]:
    return [{"name": name, "aliases": [], "options": {}} for name in SCHEDULERS]


@router.get("/sdapi/v1/sd-models")
async def a1111_models(settings: SettingsDep) -> list[dict[str, Any]]:
    """The image models a client may name: the configured one first (a folder by its name)."""
    current = model_label(settings.model_for("image"))
    labels = [current] + [label for label in settings.served_models("image") if label != current]
    return [{"title": label, "model_name": label.split("/")[-1], "hash": None, "filename": label} for label in labels]


@router.get("/sdapi/v1/loras")
async def a1111_loras(settings: SettingsDep) -> list[dict[str, Any]]:
    """The LoRAs in the LoRA folder, as A1111 lists them (the file by its name only: the server's
    folders are not the client's business). Use one with `<lora:NAME:WEIGHT>` in the prompt."""
    return [
        {"name": lora.name, "alias": lora.name, "path": lora.path.name, "metadata": {}}
        for lora in available(settings.loras)
    ]


@router.post("/sdapi/v1/refresh-loras")
async def a1111_refresh_loras(settings: SettingsDep) -> None:
    """A1111 rescans its LoRA folder here; muselab reads the folder on every request already."""
