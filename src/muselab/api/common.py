"""What the routers share: the job service and settings as dependencies, the id path parameters,
and submitting, waiting for and reading back jobs."""

from __future__ import annotations

import base64
from pathlib import Path
from typing import Annotated, Any

from fastapi import Depends, Request
from fastapi import Path as PathParam
from starlette.concurrency import run_in_threadpool

from muselab.api.errors import ApiError
from muselab.config import Settings
from muselab.jobs import Job, JobService, QueueFull, SaveOptions
from muselab.schemas import ImageRequest, RequestError, parse_request

#: Output and job ids: what `store.new_id` makes. Anything else is refused before a lookup.
ID_PATTERN = r"^[0-9a-f]{32}$"
OutputId = Annotated[str, PathParam(pattern=ID_PATTERN, description="An output's id: 32 lowercase hex digits.")]
JobId = Annotated[str, PathParam(pattern=ID_PATTERN, description="A job's id: 32 lowercase hex digits.")]
BatchId = Annotated[str, PathParam(pattern=ID_PATTERN, description="A batch's id: 32 lowercase hex digits.")]


# Async so that FastAPI calls them on the event loop: a sync dependency would take a threadpool
# thread, and those are what waiting routes (`?wait=true`, the compatibility routes) hold.
async def get_service(request: Request) -> JobService:
    """The app's job service (`create_app` puts it on `app.state`)."""
    return request.app.state.service


ServiceDep = Annotated[JobService, Depends(get_service)]


async def get_settings(service: ServiceDep) -> Settings:
    """The settings jobs run with: the service's own, as a service handed to `create_app` brings them."""
    return service.settings


SettingsDep = Annotated[Settings, Depends(get_settings)]


def submit(service: JobService, request: Any, source: str = "api", callback: str | None = None) -> Job:
    """Queue `request`; a full queue is 429 (with Retry-After), a request it refuses 422."""
    try:
        return service.submit(request, source=source, save=SaveOptions(), callback=callback)
    except QueueFull as exc:
        raise ApiError(429, str(exc), "busy", headers={"Retry-After": "5"}) from None
    except RequestError as exc:
        raise ApiError(422, str(exc)) from None


async def wait_for(service: JobService, job: Job) -> dict[str, Any] | None:
    """The job's status once it is over; the job's own time limit ends it well before this one."""
    return await run_in_threadpool(service.wait, job.id, service.settings.job_timeout + 60)


def output_path(service: JobService, output_id: str) -> Path:
    """The file of an output, found by id only; anything that resolves outside the folder is 404."""
    record = service.store.get_output(output_id)
    owned = None if record is None else service.store.owned_file(record)
    if owned is None:
        raise ApiError(404, "No such output.", "not_found")
    return owned


# ---------------------------------------------------------------- for the compatibility routes

#: How a synchronous route answers a job that did not succeed, by `Job.error_kind`: a time limit is
#: the request asking for more than this server allows (not a server fault); a model that cannot
#: be loaded or memory that runs out leave the server able to serve other requests.
_FAILURE_ANSWERS = {
    "timeout": (422, "time_limit"),
    "bad_request": (422, "invalid_request"),
    "model_unavailable": (503, "model_unavailable"),
    "out_of_memory": (503, "out_of_memory"),
}


async def generate_images(service: JobService, fields: dict[str, Any], source: str) -> dict[str, Any]:
    """Run an image job made of `fields` to its end and return its status; a request it refuses
    is 422, and a job that does not succeed is answered as `_FAILURE_ANSWERS` says."""
    try:
        image_request = parse_request(ImageRequest, fields)
    except RequestError as exc:
        raise ApiError(422, str(exc)) from None
    return _finished_or_error(await wait_for(service, submit(service, image_request, source=source)))


def _finished_or_error(status: dict[str, Any] | None) -> dict[str, Any]:
    if status is not None and status["status"] == "succeeded":
        return status
    message = (status or {}).get("error") or "the job did not finish"
    if status is None or status["status"] != "failed":
        raise ApiError(503, f"Generation stopped: {message}", "cancelled")
    code, kind = _FAILURE_ANSWERS.get(status.get("error_kind") or "", (500, "server_error"))
    raise ApiError(code, f"Generation failed: {message}", kind)


def read_b64(service: JobService, output: dict[str, Any]) -> str:
    """An output's file as base64, as the compatibility APIs return images."""
    return base64.b64encode(output_path(service, output["id"]).read_bytes()).decode()
