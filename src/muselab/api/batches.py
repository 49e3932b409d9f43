"""Batches and comparison grids over HTTP: `POST /api/batches` (a prompt list, or requests),
`POST /api/grids` (one request along one or two axes), a batch's progress and items, and its
cancel. Each item is a job of the same service (`GET /api/jobs/{id}` follows it too)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Query, Request
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.concurrency import run_in_threadpool

from muselab.api.common import BatchId, ServiceDep
from muselab.api.errors import ApiError
from muselab.batches import batches_for
from muselab.prompt_list import parse, parse_items
from muselab.schemas import RequestError

router = APIRouter(tags=["batches"])

CallbackUrl = Annotated[
    str | None,
    Field(
        default=None,
        max_length=2000,
        description="POSTed the status JSON of each job and then of the batch when they end, signed "
        "(X-Muselab-Signature: sha256=HMAC); its host must be on the server's allow-list (MUSELAB_WEBHOOK_HOSTS).",
    ),
]


class BatchBody(BaseModel):
    model_config = ConfigDict(extra="forbid")

    text: str | None = Field(
        default=None,
        max_length=2_000_000,
        description="A prompt list: a prompt a line with options after it (`a red fox --steps 20 --seed 5`, "
        "A1111's prompts-from-file style), or JSON Lines of requests.",
    )
    items: list[dict[str, Any]] | None = Field(
        default=None, max_length=100_000, description="Requests, each as /api/jobs/KIND takes it, with its kind."
    )
    kind: str = Field(default="image", max_length=40, description="The kind of a line or item that names none.")
    dynamic: Literal["random", "combinatorial"] = Field(
        default="random",
        description="Dynamic prompts ({a|b|c}, __wildcard__): random picks one a job; combinatorial makes a job "
        "of every combination.",
    )
    name: str | None = Field(default=None, max_length=200)
    callback_url: CallbackUrl = None


class AxisBody(BaseModel):
    model_config = ConfigDict(extra="forbid")

    field: str = Field(max_length=60)
    values: list[Any] = Field(min_length=1, max_length=32)


class GridBody(BaseModel):
    model_config = ConfigDict(extra="forbid")

    request: dict[str, Any] = Field(description="The request every cell starts from, with its kind (default image).")
    x: str | AxisBody = Field(description='The x axis: "FIELD=V1,V2,..." or {"field": ..., "values": [...]}.')
    y: str | AxisBody | None = Field(default=None, description="The y axis, as x; none for one row.")
    name: str | None = Field(default=None, max_length=200)
    callback_url: CallbackUrl = None


def _accepted(batch: dict[str, Any]) -> dict[str, Any]:
    return {
        "id": batch["id"],
        "status": batch["status"],
        "total": batch["total"],
        "status_url": f"/api/batches/{batch['id']}",
    }


@router.post("/api/batches", status_code=202)
async def submit_batch(service: ServiceDep, body: BatchBody) -> dict[str, Any]:
    """Queue a batch (202 with its id): `text` (a prompt list) or `items` (requests)."""
    if (body.text is None) == (body.items is None):
        raise ApiError(422, "Invalid request:\n  - text, items: give one of them (a prompt list, or requests)")
    batches = batches_for(service)

    def start() -> str:
        requests = parse(body.text, body.kind) if body.text is not None else parse_items(body.items or [], body.kind)
        return batches.submit(requests, name=body.name, callback=body.callback_url, dynamic=body.dynamic)

    try:
        batch_id = await run_in_threadpool(start)
    except RequestError as exc:
        raise ApiError(422, service.redact(str(exc))) from None
    return _accepted(batches.status(batch_id) or {})


@router.post("/api/grids", status_code=202)
async def submit_grid(service: ServiceDep, body: GridBody) -> dict[str, Any]:
    """Queue a comparison grid (202 with its batch id): the request with x's field set to each of its
    values (and y's), one seed for all cells; an image grid ends with one labelled grid PNG too."""
    batches = batches_for(service)
    axis = [None if a is None else a if isinstance(a, str) else a.model_dump() for a in (body.x, body.y)]
    try:
        batch_id = await run_in_threadpool(
            lambda: batches.submit_grid(body.request, axis[0], axis[1], name=body.name, callback=body.callback_url)
        )
    except RequestError as exc:
        raise ApiError(422, service.redact(str(exc))) from None
    return _accepted(batches.status(batch_id) or {})


@router.get("/api/batches")
async def list_batches(service: ServiceDep, limit: Annotated[int, Query(ge=1, le=200)] = 50) -> dict[str, Any]:
    return {"batches": await run_in_threadpool(batches_for(service).recent, limit)}


@router.get("/api/batches/{batch_id}")
async def batch_status(service: ServiceDep, batch_id: BatchId) -> dict[str, Any]:
    """The batch: status, done / total with its ETA, the item running now, each item with its job
    and outputs, the grid picture (for a grid), and its webhook deliveries."""
    status = await run_in_threadpool(batches_for(service).status, batch_id)
    if status is None:
        raise ApiError(404, "No such batch.", "not_found")
    return status


@router.get("/api/batches/{batch_id}/events", response_class=StreamingResponse)
async def batch_events(request: Request, service: ServiceDep, batch_id: BatchId) -> StreamingResponse:
    """Server-Sent Events: `progress` (the batch without its items) whenever an item ends or the
    running one moves, then one `done` with the whole status."""
    batches = batches_for(service)
    if await run_in_threadpool(batches.status, batch_id) is None:
        raise ApiError(404, "No such batch.", "not_found")

    async def stream() -> AsyncIterator[str]:
        seen = None
        while True:
            status = await run_in_threadpool(batches.status, batch_id) or {}
            if status.get("status") != "running":
                yield f"event: done\ndata: {json.dumps(status)}\n\n"
                return
            summary = {key: value for key, value in status.items() if key != "items"}
            moved = json.dumps([summary["done"], (summary["current"] or {}).get("progress")])
            if moved != seen:
                seen = moved
                yield f"event: progress\ndata: {json.dumps(summary)}\n\n"
            if await request.is_disconnected():
                return
            await asyncio.sleep(0.25)

    return StreamingResponse(stream(), media_type="text/event-stream", headers={"Cache-Control": "no-store"})


@router.post("/api/batches/{batch_id}/cancel")
async def cancel_batch(service: ServiceDep, batch_id: BatchId) -> dict[str, Any]:
    batches = batches_for(service)
    if await run_in_threadpool(batches.status, batch_id) is None:
        raise ApiError(404, "No such batch.", "not_found")
    cancelled = await run_in_threadpool(batches.cancel, batch_id)
    return {"id": batch_id, "cancelled": cancelled}
