"""The OpenAI-compatible image route (`/v1/images/generations`), for clients of OpenAI's API."""

from __future__ import annotations

import time
from typing import Any, Literal

from fastapi import APIRouter, Request
from pydantic import BaseModel, ConfigDict, Field

from muselab.api.common import ServiceDep, SettingsDep, generate_images, read_b64
from muselab.api.errors import ApiError
from muselab.schemas import MAX_PROMPT_CHARS

router = APIRouter(tags=["compatibility"])


class OpenAIImageRequest(BaseModel):
    model_config = ConfigDict(extra="allow")
    prompt: str = Field(min_length=1, max_length=MAX_PROMPT_CHARS)
    model: str | None = Field(default=None, max_length=300)
    n: int = Field(default=1, ge=1, le=8)
    size: str | None = Field(default=None, pattern=r"^\d{2,4}x\d{2,4}$")
    response_format: Literal["b64_json", "url"] = "b64_json"


@router.post("/v1/images/generations")
async def openai_images(
    request: Request, service: ServiceDep, settings: SettingsDep, body: OpenAIImageRequest
) -> dict[str, Any]:
    """OpenAI's image generation: `data[].b64_json` (or `url`, served by this server)."""
    width = height = None
    if body.size:
        width, height = (int(part) for part in body.size.split("x"))
    # OpenAI's own model names mean "the default model" here.
    model = body.model if body.model and not body.model.startswith(("dall-e", "gpt-image")) else None
    if model is not None and model not in settings.served_models("image"):
        raise ApiError(404, f"The model '{model}' is not served here.", "invalid_request")
    fields = {"prompt": body.prompt, "width": width, "height": height, "num_images": body.n, "model": model}
    status = await generate_images(service, fields, source="openai")
    data = []
    for output in status["outputs"]:
        entry: dict[str, Any] = {"revised_prompt": status["request"]["prompt"]}
        if body.response_format == "url":
            entry["url"] = str(request.base_url).rstrip("/") + f"/api/outputs/{output['id']}/file"
        else:
            entry["b64_json"] = read_b64(service, output)
        data.append(entry)
    return {"created": int(time.time()), "data": data}
