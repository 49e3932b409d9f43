"""The history routes: outputs (listed, by id, their files), deleting them, feedback, and export."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from fastapi import APIRouter, Query
from fastapi.responses import FileResponse, Response
from pydantic import BaseModel, ConfigDict, Field
from starlette.concurrency import run_in_threadpool

from muselab.api.common import OutputId, ServiceDep, output_path
from muselab.api.errors import ApiError
from muselab.store import FeedbackError

router = APIRouter(tags=["history"])

_MEDIA_TYPES = {
    ".png": "image/png",
    ".wav": "audio/wav",
    ".flac": "audio/flac",
    ".ogg": "audio/ogg",
    ".mp4": "video/mp4",
}


class Feedback(BaseModel):
    model_config = ConfigDict(extra="forbid")
    thumb: Literal[-1, 0, 1] | None = Field(default=None, description="1 up, -1 down, 0 clears.")
    stars: int | None = Field(default=None, ge=1, le=5)
    comment: str | None = Field(default=None, max_length=2000)


@router.get("/api/outputs")
async def list_outputs(
    service: ServiceDep,
    kind: Annotated[
        str | None, Query(pattern=r"^[a-z][a-z0-9_-]{0,31}$", description="music, image, scene or a plugin's kind.")
    ] = None,
    q: Annotated[str | None, Query(max_length=200, description="Text the prompt contains.")] = None,
    min_stars: Annotated[int | None, Query(ge=1, le=5)] = None,
    thumb: Literal[-1, 1] | None = None,
    batch: Annotated[
        str | None, Query(pattern=r"^[0-9a-f]{32}$", description="Only the outputs of this batch (its id).")
    ] = None,
    limit: Annotated[int, Query(ge=1, le=200)] = 50,
    offset: Annotated[int, Query(ge=0, le=1_000_000)] = 0,
) -> dict[str, Any]:
    records = service.store.list_outputs(
        kind=kind, text=q, min_stars=min_stars, thumb=thumb, batch_id=batch, limit=limit, offset=offset
    )
    return {"outputs": [r.public() for r in records], "limit": limit, "offset": offset}


@router.get("/api/outputs/{output_id}")
async def get_output(service: ServiceDep, output_id: OutputId) -> dict[str, Any]:
    record = service.store.get_output(output_id)
    if record is None:
        raise ApiError(404, "No such output.", "not_found")
    return record.public()


@router.get("/api/outputs/{output_id}/file", response_class=FileResponse)
async def output_file(service: ServiceDep, output_id: OutputId) -> FileResponse:
    path = output_path(service, output_id)
    return FileResponse(
        path,
        media_type=_MEDIA_TYPES.get(path.suffix.lower(), "application/octet-stream"),
        filename=path.name,
        headers={"X-Content-Type-Options": "nosniff", "Cache-Control": "private, max-age=3600"},
    )


@router.delete("/api/outputs/{output_id}")
async def delete_output(service: ServiceDep, output_id: OutputId) -> dict[str, Any]:
    """Forget an output; its file is deleted only if it lies inside the outputs folder
    (`file_deleted` and `message` say which)."""
    deletion = service.store.delete_output(output_id)
    if deletion is None:
        raise ApiError(404, "No such output.", "not_found")
    return deletion.public()


@router.post("/api/outputs/{output_id}/feedback")
async def feedback(service: ServiceDep, output_id: OutputId, body: Feedback) -> dict[str, Any]:
    try:
        record = service.store.set_feedback(output_id, body.thumb, body.stars, body.comment)
    except FeedbackError as exc:
        raise ApiError(422, str(exc)) from None
    if record is None:
        raise ApiError(404, "No such output.", "not_found")
    return record.public()


@router.get("/api/history/export")
async def export(service: ServiceDep, format: Literal["jsonl", "csv"] = "jsonl") -> Response:
    text = await run_in_threadpool(service.store.export, format)
    media_type = "application/x-ndjson" if format == "jsonl" else "text/csv"
    return Response(text, media_type=media_type)
