"""The service and job routes: health and info, a submit route per kind of request, the job list,
a job's status, its progress as Server-Sent Events, and cancel."""

from __future__ import annotations

import base64
import inspect
import json
from collections.abc import AsyncIterator, Mapping
from typing import Annotated, Any

from fastapi import APIRouter, Body, Query, Request
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel
from starlette.concurrency import run_in_threadpool

from muselab import __version__
from muselab.api.common import JobId, ServiceDep, SettingsDep, submit, wait_for
from muselab.api.errors import ApiError
from muselab.families import request_types
from muselab.jobs import Job, JobService
from muselab.schemas import RequestError, field_option, parse_request
from muselab.uploads import MAX_UPLOAD_BYTES

service_router = APIRouter(tags=["service"])
router = APIRouter(tags=["jobs"])

WaitQuery = Annotated[bool, Query(description="Wait for the job to finish and return its result.")]
CallbackQuery = Annotated[
    str | None,
    Query(
        max_length=2000,
        description="A URL to POST the job's status JSON to when it ends, signed (X-Muselab-Signature: "
        "sha256=HMAC-SHA256 of the body); its host must be on the server's allow-list (MUSELAB_WEBHOOK_HOSTS).",
    ),
]

#: Request examples shown in /docs, by kind; a kind without one is documented by its schema alone.
EXAMPLES: dict[str, dict[str, Any]] = {
    "music": {"beat": {"value": {"prompt": "lo-fi beat with warm piano", "duration": 8, "seed": 7}}},
    "image": {"fox": {"value": {"prompt": "a red fox in snow, watercolor", "steps": 25, "seed": 7}}},
    "scene": {
        "harbour": {"value": {"prompt": "a quiet harbour at dawn", "music_prompt": "calm ambient piano", "duration": 8}}
    },
}


class JobAccepted(BaseModel):
    id: str
    status: str
    queue_position: int | None = None
    status_url: str
    events_url: str


@service_router.get("/healthz")
async def healthz(service: ServiceDep) -> dict[str, Any]:
    return {"status": "ok", "version": __version__, "active_jobs": len(service.active())}


@service_router.get("/api/info")
async def info(service: ServiceDep, settings: SettingsDep) -> dict[str, Any]:
    """The models, the device and dtype, and each kind's engine and weights (no folder names)."""
    return {"version": __version__, "max_queue": settings.max_queue, **service.info()}


@service_router.get("/api/cluster")
async def cluster(service: ServiceDep) -> dict[str, Any]:
    """Where jobs run: in this process, or the Ray Serve deployments (replicas by state, their nodes
    and devices, their settings), with each model's jobs running and waiting here and the jobs
    finished in the last ten minutes."""
    return await run_in_threadpool(service.cluster)


def request_type_of(kind: str) -> Any:
    """The request schema of `kind` from a route's path; a kind no family makes is 404."""
    types = request_types()
    if kind not in types:
        raise ApiError(404, f"No kind '{kind}'; the kinds are {', '.join(types)}.", "not_found")
    return types[kind]


@service_router.post("/api/estimate/{kind}")
async def estimate(
    service: ServiceDep, kind: str, body: Annotated[dict[str, Any] | None, Body()] = None
) -> dict[str, Any]:
    """How long a request of `kind` would take on this machine, for each speed tier: `seconds`
    and where the figure comes from (this machine's earlier runs, or its measured speed), and the
    tier `auto` picks here (`chosen`). The body is the request as for /api/jobs/KIND; the prompt
    may be left out."""
    request_type = request_type_of(kind)
    data = {"prompt": "-", **(body or {}), "kind": kind}
    try:
        request = parse_request(request_type, data)
    except RequestError as exc:
        raise ApiError(422, str(exc)) from None
    try:
        estimate = await run_in_threadpool(service.estimate, request)
    except RequestError as exc:  # a model this server does not offer
        raise ApiError(422, str(exc)) from None
    if estimate is None:
        raise ApiError(404, f"'{kind}' requests have no speed tiers to estimate.", "not_found")
    return estimate


# ---------------------------------------------------------------- submitting


async def submit_job(
    service: ServiceDep, body: Any, wait: WaitQuery = False, callback_url: CallbackQuery = None
) -> JSONResponse:
    """Queue a job (202 with its id), or with `wait=true` return the finished job.

    The route for each kind is this function with `body` typed as that kind's request
    (`submit_router`)."""
    job = submit(service, body, callback=callback_url)
    if not wait:
        return JSONResponse(_accepted(job.id, service.position(job), job.status), 202)
    return JSONResponse(await wait_for(service, job), 200)


def submit_router(request_types: Mapping[str, type[BaseModel]]) -> APIRouter:
    """`POST /api/jobs/{kind}` for each kind of request: FastAPI validates the body as that kind's
    request class, and OpenAPI shows its schema. `create_app` passes the model families' request
    types (`muselab.families.request_types`), so a kind a family adds gets its route without an
    edit here."""
    routes = APIRouter(tags=["jobs"])
    signature = inspect.signature(submit_job, eval_str=True)
    for kind, request_type in request_types.items():
        body = Annotated[request_type, Body(openapi_examples=EXAMPLES.get(kind))]  # type: ignore[valid-type]
        article = "an" if kind[:1] in ("a", "e", "i", "o", "u") else "a"
        about = f"Queue {article} {kind} job (202 with its id), or with `wait=true` return the finished job."
        if request_type.__doc__:
            about += "\n\n" + inspect.cleandoc(request_type.__doc__)

        async def endpoint(**arguments: Any) -> JSONResponse:
            return await submit_job(**arguments)

        # FastAPI reads the parameters from the signature: submit_job's, with this kind's body.
        endpoint.__signature__ = signature.replace(  # type: ignore[attr-defined]
            parameters=[
                param.replace(annotation=body) if param.name == "body" else param
                for param in signature.parameters.values()
            ]
        )
        routes.add_api_route(
            f"/api/jobs/{kind}",
            endpoint,
            methods=["POST"],
            name=f"submit_{kind}",
            description=about,
            status_code=202,
            response_model=None,
        )
    return routes


@router.post("/api/jobs/{kind}/files", status_code=202, response_model=None)
async def submit_job_with_files(
    request: Request, service: ServiceDep, kind: str, wait: WaitQuery = False, callback_url: CallbackQuery = None
) -> JSONResponse:
    """Queue a job whose pictures or clips come as files: `multipart/form-data` with a `request`
    part (the JSON `/api/jobs/KIND` takes, without the files) and one file part per upload field
    (`audio_prompt` and `melody` for music, `init_image` and `mask` for images). Each file is
    checked as a base64 one is, and the same limits apply."""
    request_type = request_type_of(kind)
    uploads = [name for name, info in request_type.model_fields.items() if field_option(info).upload]
    try:
        form = await request.form(max_files=len(uploads), max_fields=1, max_part_size=MAX_UPLOAD_BYTES + 1)
    except Exception as exc:  # not multipart, too many parts, a part too large
        raise ApiError(422, f"request: a multipart/form-data body was expected ({exc})") from None
    try:
        data = json.loads(str(form.get("request") or "{}"))
    except json.JSONDecodeError:
        raise ApiError(422, "request: the 'request' part must be the job's JSON") from None
    if not isinstance(data, dict):
        raise ApiError(422, "request: the 'request' part must be a JSON object")
    for name, part in form.multi_items():
        if name == "request":
            continue
        if name not in uploads or isinstance(part, str):
            raise ApiError(422, f"{name}: not a file field of {kind} requests; they are {', '.join(uploads)}")
        payload = await part.read(MAX_UPLOAD_BYTES + 1)
        if len(payload) > MAX_UPLOAD_BYTES:
            raise ApiError(422, f"{name}: the upload is over {MAX_UPLOAD_BYTES // 2**20} MB")
        data[name] = base64.b64encode(payload).decode()
    try:
        parsed = parse_request(request_type, {**data, "kind": kind})
    except RequestError as exc:
        raise ApiError(422, str(exc)) from None
    return await submit_job(service, parsed, wait, callback_url)


def _accepted(job_id: str, position: int | None, status: str) -> dict[str, Any]:
    return {
        "id": job_id,
        "status": status,
        "queue_position": position,
        "status_url": f"/api/jobs/{job_id}",
        "events_url": f"/api/jobs/{job_id}/events",
    }


# ---------------------------------------------------------------- following jobs


@router.get("/api/jobs")
async def list_jobs(
    service: ServiceDep,
    status: Annotated[str | None, Query(max_length=20)] = None,
    limit: Annotated[int, Query(ge=1, le=200)] = 50,
    offset: Annotated[int, Query(ge=0, le=1_000_000)] = 0,
) -> dict[str, Any]:
    return {"active": service.active(), "recent": service.recent(status, limit, offset)}


@router.get("/api/jobs/{job_id}")
async def job_status(service: ServiceDep, job_id: JobId) -> dict[str, Any]:
    status = service.status(job_id, with_preview=True)
    if status is None:
        raise ApiError(404, "No such job.", "not_found")
    return {**status, "deliveries": service.webhooks.deliveries(job_id=job_id)}


@router.post("/api/jobs/{job_id}/cancel")
async def cancel_job(service: ServiceDep, job_id: JobId) -> dict[str, Any]:
    if service.status(job_id) is None:
        raise ApiError(404, "No such job.", "not_found")
    cancelled = service.cancel(job_id)
    return {"id": job_id, "cancelled": cancelled, "status": service.status(job_id)["status"]}  # type: ignore[index]


@router.get("/api/jobs/{job_id}/events", response_class=StreamingResponse)
async def job_events(request: Request, service: ServiceDep, job_id: JobId) -> StreamingResponse:
    """Server-Sent Events: `progress` events (with a preview for images), then one `done`."""
    job = service.job(job_id)
    if job is None and service.status(job_id) is None:
        raise ApiError(404, "No such job.", "not_found")
    return StreamingResponse(
        _events(request, service, job, job_id), media_type="text/event-stream", headers={"Cache-Control": "no-store"}
    )


async def _events(request: Request, service: JobService, job: Job | None, job_id: str) -> AsyncIterator[str]:
    """A live job's changes until it ends (a finished or unknown-to-memory one: just `done`)."""
    version = -1
    last_preview = None
    while True:
        if job is None or job.done.is_set():
            yield _sse("done", service.status(job_id))
            return
        version = await run_in_threadpool(service.wait_for_change, job, version, 10.0)
        if await request.is_disconnected():
            return
        if job.done.is_set():
            continue
        snapshot = service.snapshot(job, with_preview=job.preview_png is not last_preview)
        last_preview = job.preview_png
        yield _sse("progress", snapshot)


def _sse(event: str, data: Any) -> str:
    return f"event: {event}\ndata: {json.dumps(data)}\n\n"
