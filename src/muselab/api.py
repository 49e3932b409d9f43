"""The HTTP API (FastAPI): jobs, progress as Server-Sent Events, files by id, history, feedback,
and A1111 / OpenAI compatible image routes. Safe by default: see `muselab.security`.
"""

from __future__ import annotations

import base64
import json
import logging
import time
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Annotated, Any, Literal

from fastapi import Body, FastAPI, Query, Request
from fastapi import Path as PathParam
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse
from fastapi_offline import FastAPIOffline
from pydantic import BaseModel, ConfigDict, Field
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from muselab import __version__
from muselab.config import Settings, model_label
from muselab.jobs import JobService, QueueFull, SaveOptions
from muselab.schemas import (
    MAX_PROMPT_CHARS,
    MAX_SEED,
    SCHEDULERS,
    ImageRequest,
    MusicRequest,
    RequestError,
    SceneRequest,
    describe_errors,
    parse_request,
)
from muselab.security import SecurityMiddleware, error_body
from muselab.store import FeedbackError

log = logging.getLogger("muselab.api")
#: Output and job ids: what `store.new_id` makes. Anything else is refused before a lookup.
ID_PATTERN = r"^[0-9a-f]{32}$"
OutputId = Annotated[str, PathParam(pattern=ID_PATTERN, description="An output's id: 32 lowercase hex digits.")]
JobId = Annotated[str, PathParam(pattern=ID_PATTERN, description="A job's id: 32 lowercase hex digits.")]
_MEDIA_TYPES = {
    ".png": "image/png",
    ".wav": "audio/wav",
    ".flac": "audio/flac",
    ".ogg": "audio/ogg",
    ".mp4": "video/mp4",
}


class ApiError(Exception):
    def __init__(self, status: int, message: str, kind: str = "invalid_request", headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.kind, self.headers = status, message, kind, headers


# ---------------------------------------------------------------- API models


class JobAccepted(BaseModel):
    id: str
    status: str
    queue_position: int | None = None
    status_url: str
    events_url: str


class Feedback(BaseModel):
    model_config = ConfigDict(extra="forbid")
    thumb: Literal[-1, 0, 1] | None = Field(default=None, description="1 up, -1 down, 0 clears.")
    stars: int | None = Field(default=None, ge=1, le=5)
    comment: str | None = Field(default=None, max_length=2000)


class A1111Txt2Img(BaseModel):
    """A1111's txt2img body. Fields muselab does not support are accepted and ignored."""

    model_config = ConfigDict(extra="allow")
    prompt: str = Field(min_length=1, max_length=MAX_PROMPT_CHARS)
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


class OpenAIImageRequest(BaseModel):
    model_config = ConfigDict(extra="allow")
    prompt: str = Field(min_length=1, max_length=MAX_PROMPT_CHARS)
    model: str | None = Field(default=None, max_length=300)
    n: int = Field(default=1, ge=1, le=8)
    size: str | None = Field(default=None, pattern=r"^\d{2,4}x\d{2,4}$")
    response_format: Literal["b64_json", "url"] = "b64_json"


# ---------------------------------------------------------------- the app


def create_app(settings: Settings, service: JobService | None = None) -> FastAPI:
    own_service = service is None

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        if own_service:
            await run_in_threadpool(app.state.service.shutdown, 10)

    # Swagger UI and ReDoc served from the package, not a CDN: /docs works offline and loads no
    # third-party script into a page that can call this API.
    app = FastAPIOffline(
        title="muselab",
        version=__version__,
        description="Text to music and text to image on your own machine.",
        lifespan=lifespan,
    )
    app.state.settings = settings
    app.state.service = service or JobService(settings)
    app.add_middleware(SecurityMiddleware, settings=settings)
    if settings.cors_origins:
        from fastapi.middleware.cors import CORSMiddleware

        app.add_middleware(
            CORSMiddleware,
            allow_origins=settings.cors_origins,
            allow_methods=["GET", "POST", "DELETE"],
            allow_headers=["Authorization", "Content-Type"],
        )
    _install_error_handlers(app)
    _add_routes(app)
    return app


def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def api_error(request: Request, exc: ApiError) -> JSONResponse:
        return JSONResponse(error_body(exc.message, exc.kind), exc.status, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        model = _model_for_path(request.url.path)
        message = describe_errors(model, exc.errors()) if model else _plain_errors(exc.errors())
        return JSONResponse(error_body(message, "invalid_request"), 422)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        message = exc.detail if isinstance(exc.detail, str) else "Request failed."
        return JSONResponse(error_body(message, "http_error"), exc.status_code, headers=exc.headers)

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error on %s", request.url.path)
        return JSONResponse(error_body("Internal error; the details are in the server log.", "server_error"), 500)


def _model_for_path(path: str) -> type[BaseModel] | None:
    for marker, model in (
        ("/music", MusicRequest),
        ("/jobs/image", ImageRequest),
        ("/jobs/scene", SceneRequest),
        ("/feedback", Feedback),
        ("/txt2img", A1111Txt2Img),
        ("/images/generations", OpenAIImageRequest),
    ):
        if marker in path:
            return model
    return None


def _plain_errors(errors: Any) -> str:
    return describe_errors(BaseModel, errors)


def _service(request: Request) -> JobService:
    return request.app.state.service


def _accepted(job_id: str, position: int | None, status: str) -> dict[str, Any]:
    return {
        "id": job_id,
        "status": status,
        "queue_position": position,
        "status_url": f"/api/jobs/{job_id}",
        "events_url": f"/api/jobs/{job_id}/events",
    }


def _submit(service: JobService, request: Any, source: str = "api") -> Any:
    try:
        return service.submit(request, source=source, save=SaveOptions())
    except QueueFull as exc:
        raise ApiError(429, str(exc), "busy", headers={"Retry-After": "5"}) from None
    except RequestError as exc:
        raise ApiError(422, str(exc)) from None


async def _submit_and_maybe_wait(service: JobService, request: Any, wait: bool) -> JSONResponse:
    job = _submit(service, request)
    if not wait:
        return JSONResponse(_accepted(job.id, service.position(job), job.status), 202)
    status = await run_in_threadpool(service.wait, job.id, service.settings.job_timeout + 60)
    return JSONResponse(status, 200)


def _output_file(service: JobService, output_id: str) -> Path:
    """The file of an output, found by id only; anything that resolves outside the folder is 404."""
    record = service.store.get_output(output_id)
    owned = None if record is None else service.store.owned_file(record)
    if owned is None:
        raise ApiError(404, "No such output.", "not_found")
    return owned


WaitQuery = Annotated[bool, Query(description="Wait for the job to finish and return its result.")]

MUSIC_EXAMPLE = {"prompt": "lo-fi beat with warm piano", "duration": 8, "seed": 7}
IMAGE_EXAMPLE = {"prompt": "a red fox in snow, watercolor", "steps": 25, "seed": 7}
SCENE_EXAMPLE = {"prompt": "a quiet harbour at dawn", "music_prompt": "calm ambient piano", "duration": 8}


def _add_routes(app: FastAPI) -> None:
    @app.get("/healthz", tags=["service"])
    async def healthz(request: Request) -> dict[str, Any]:
        service = _service(request)
        return {"status": "ok", "version": __version__, "active_jobs": len(service.active())}

    @app.get("/api/info", tags=["service"])
    async def info(request: Request) -> dict[str, Any]:
        """The models, the device and dtype, and each kind's engine and weights (no folder names)."""
        from muselab.engines import describe_runtime

        service = _service(request)
        settings = service.settings
        return {
            "version": __version__,
            "models": {kind: model_label(settings.model_for(kind)) for kind in ("music", "image")},
            "loaded": service.models.loaded(),
            "preset": settings.preset,
            "max_queue": settings.max_queue,
            "runtime": describe_runtime(settings, public=True),
            "preparing": service.preparation(),
        }

    @app.post("/api/jobs/music", status_code=202, tags=["jobs"], response_model=None)
    async def submit_music(
        request: Request,
        body: Annotated[MusicRequest, Body(openapi_examples={"beat": {"value": MUSIC_EXAMPLE}})],
        wait: WaitQuery = False,
    ) -> JSONResponse:
        """Queue a music job (202 with its id), or with `wait=true` return the finished job."""
        return await _submit_and_maybe_wait(_service(request), body, wait)

    @app.post("/api/jobs/image", status_code=202, tags=["jobs"], response_model=None)
    async def submit_image(
        request: Request,
        body: Annotated[ImageRequest, Body(openapi_examples={"fox": {"value": IMAGE_EXAMPLE}})],
        wait: WaitQuery = False,
    ) -> JSONResponse:
        """Queue an image job (202 with its id), or with `wait=true` return the finished job."""
        return await _submit_and_maybe_wait(_service(request), body, wait)

    @app.post("/api/jobs/scene", status_code=202, tags=["jobs"], response_model=None)
    async def submit_scene(
        request: Request,
        body: Annotated[SceneRequest, Body(openapi_examples={"harbour": {"value": SCENE_EXAMPLE}})],
        wait: WaitQuery = False,
    ) -> JSONResponse:
        """Queue a scene: a picture, its soundtrack and an MP4 of both, as one job."""
        return await _submit_and_maybe_wait(_service(request), body, wait)

    @app.get("/api/jobs", tags=["jobs"])
    async def list_jobs(
        request: Request,
        status: Annotated[str | None, Query(max_length=20)] = None,
        limit: Annotated[int, Query(ge=1, le=200)] = 50,
        offset: Annotated[int, Query(ge=0, le=1_000_000)] = 0,
    ) -> dict[str, Any]:
        service = _service(request)
        return {"active": service.active(), "recent": service.recent(status, limit, offset)}

    @app.get("/api/jobs/{job_id}", tags=["jobs"])
    async def job_status(request: Request, job_id: JobId) -> dict[str, Any]:
        status = _service(request).status(job_id, with_preview=True)
        if status is None:
            raise ApiError(404, "No such job.", "not_found")
        return status

    @app.post("/api/jobs/{job_id}/cancel", tags=["jobs"])
    async def cancel_job(request: Request, job_id: JobId) -> dict[str, Any]:
        service = _service(request)
        if service.status(job_id) is None:
            raise ApiError(404, "No such job.", "not_found")
        cancelled = service.cancel(job_id)
        return {"id": job_id, "cancelled": cancelled, "status": service.status(job_id)["status"]}  # type: ignore[index]

    @app.get("/api/jobs/{job_id}/events", tags=["jobs"], response_class=StreamingResponse)
    async def job_events(request: Request, job_id: JobId) -> StreamingResponse:
        """Server-Sent Events: `progress` events (with a preview for images), then one `done`."""
        service = _service(request)
        job = service.job(job_id)
        if job is None and service.status(job_id) is None:
            raise ApiError(404, "No such job.", "not_found")

        async def stream():
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

        return StreamingResponse(stream(), media_type="text/event-stream", headers={"Cache-Control": "no-store"})

    @app.get("/api/outputs", tags=["history"])
    async def list_outputs(
        request: Request,
        kind: Literal["music", "image", "scene"] | None = None,
        q: Annotated[str | None, Query(max_length=200, description="Text the prompt contains.")] = None,
        min_stars: Annotated[int | None, Query(ge=1, le=5)] = None,
        thumb: Literal[-1, 1] | None = None,
        limit: Annotated[int, Query(ge=1, le=200)] = 50,
        offset: Annotated[int, Query(ge=0, le=1_000_000)] = 0,
    ) -> dict[str, Any]:
        store = _service(request).store
        records = store.list_outputs(kind=kind, text=q, min_stars=min_stars, thumb=thumb, limit=limit, offset=offset)
        return {"outputs": [r.public() for r in records], "limit": limit, "offset": offset}

    @app.get("/api/outputs/{output_id}", tags=["history"])
    async def get_output(request: Request, output_id: OutputId) -> dict[str, Any]:
        record = _service(request).store.get_output(output_id)
        if record is None:
            raise ApiError(404, "No such output.", "not_found")
        return record.public()

    @app.get("/api/outputs/{output_id}/file", tags=["history"], response_class=FileResponse)
    async def output_file(request: Request, output_id: OutputId) -> FileResponse:
        path = _output_file(_service(request), output_id)
        return FileResponse(
            path,
            media_type=_MEDIA_TYPES.get(path.suffix.lower(), "application/octet-stream"),
            filename=path.name,
            headers={"X-Content-Type-Options": "nosniff", "Cache-Control": "private, max-age=3600"},
        )

    @app.delete("/api/outputs/{output_id}", tags=["history"])
    async def delete_output(request: Request, output_id: OutputId) -> dict[str, Any]:
        """Forget an output; its file is deleted only if it lies inside the outputs folder
        (`file_deleted` and `message` say which)."""
        deletion = _service(request).store.delete_output(output_id)
        if deletion is None:
            raise ApiError(404, "No such output.", "not_found")
        return deletion.public()

    @app.post("/api/outputs/{output_id}/feedback", tags=["history"])
    async def feedback(request: Request, output_id: OutputId, body: Feedback) -> dict[str, Any]:
        try:
            record = _service(request).store.set_feedback(output_id, body.thumb, body.stars, body.comment)
        except FeedbackError as exc:
            raise ApiError(422, str(exc)) from None
        if record is None:
            raise ApiError(404, "No such output.", "not_found")
        return record.public()

    @app.get("/api/history/export", tags=["history"])
    async def export(request: Request, format: Literal["jsonl", "csv"] = "jsonl") -> Response:
        text = await run_in_threadpool(_service(request).store.export, format)
        media_type = "application/x-ndjson" if format == "jsonl" else "text/csv"
        return Response(text, media_type=media_type)

    _add_compat_routes(app)


def _sse(event: str, data: Any) -> str:
    return f"event: {event}\ndata: {json.dumps(data)}\n\n"


# ---------------------------------------------------------------- compatibility routes

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


def _read_b64(service: JobService, output: dict[str, Any]) -> str:
    return base64.b64encode(_output_file(service, output["id"]).read_bytes()).decode()


#: How a synchronous route answers a job that did not succeed, by `Job.error_kind`: a time limit is
#: the request asking for more than this server allows (not a server fault); a model that cannot
#: be loaded or memory that runs out leave the server able to serve other requests.
_FAILURE_ANSWERS = {
    "timeout": (422, "time_limit"),
    "model_unavailable": (503, "model_unavailable"),
    "out_of_memory": (503, "out_of_memory"),
}


def _finished_or_error(status: dict[str, Any] | None) -> dict[str, Any]:
    if status is not None and status["status"] == "succeeded":
        return status
    message = (status or {}).get("error") or "the job did not finish"
    if status is None or status["status"] != "failed":
        raise ApiError(503, f"Generation stopped: {message}", "cancelled")
    code, kind = _FAILURE_ANSWERS.get(status.get("error_kind") or "", (500, "server_error"))
    raise ApiError(code, f"Generation failed: {message}", kind)


def _add_compat_routes(app: FastAPI) -> None:
    @app.post("/sdapi/v1/txt2img", tags=["compatibility"])
    async def a1111_txt2img(request: Request, body: A1111Txt2Img) -> dict[str, Any]:
        """AUTOMATIC1111's txt2img: base64 PNGs (with their `parameters` chunk) and the `info` JSON."""
        service = _service(request)
        try:
            image_request = parse_request(
                ImageRequest,
                {
                    "prompt": body.prompt,
                    "negative_prompt": body.negative_prompt,
                    "seed": None if body.seed == -1 else body.seed,
                    "steps": body.steps,
                    "guidance": body.cfg_scale,
                    "width": body.width,
                    "height": body.height,
                    "scheduler": _a1111_scheduler(body),
                    "num_images": min(body.batch_size * body.n_iter, 8),
                },
            )
        except RequestError as exc:
            raise ApiError(422, str(exc)) from None
        job = _submit(service, image_request, source="a1111")
        status = _finished_or_error(await run_in_threadpool(service.wait, job.id, service.settings.job_timeout + 60))
        outputs = status["outputs"]
        resolved = status["request"]
        seeds = [output["seed"] for output in outputs]
        from muselab.media import a1111_parameters

        infotexts = [a1111_parameters({**resolved, "seed": seed}, outputs[0]["recipe"]["model_name"]) for seed in seeds]
        info = {
            "prompt": resolved["prompt"],
            "all_prompts": [resolved["prompt"]] * len(outputs),
            "negative_prompt": resolved["negative_prompt"],
            "all_negative_prompts": [resolved["negative_prompt"]] * len(outputs),
            "seed": seeds[0] if seeds else None,
            "all_seeds": seeds,
            "subseed": -1,
            "all_subseeds": [-1] * len(outputs),
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
        return {
            "images": [_read_b64(service, output) for output in outputs],
            "parameters": body.model_dump(),
            "info": json.dumps(info),
        }

    @app.get("/sdapi/v1/progress", tags=["compatibility"])
    async def a1111_progress(request: Request) -> dict[str, Any]:
        service = _service(request)
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

    @app.post("/sdapi/v1/interrupt", tags=["compatibility"])
    async def a1111_interrupt(request: Request) -> dict[str, Any]:
        service = _service(request)
        stopped = [job["id"] for job in service.active() if job["kind"] == "image" and service.cancel(job["id"])]
        return {"interrupted": stopped}

    @app.get("/sdapi/v1/samplers", tags=["compatibility"])
    async def a1111_samplers() -> list[dict[str, Any]]:
        return [{"name": name, "aliases": [], "options": {}} for name in SCHEDULERS]

    @app.get("/sdapi/v1/sd-models", tags=["compatibility"])
    async def a1111_models(request: Request) -> list[dict[str, Any]]:
        """The image models a client may name: the configured one first (a folder by its name)."""
        settings = _service(request).settings
        current = model_label(settings.model_for("image"))
        labels = [current] + [label for label in settings.served_models("image") if label != current]
        return [
            {"title": label, "model_name": label.split("/")[-1], "hash": None, "filename": label} for label in labels
        ]

    @app.post("/v1/images/generations", tags=["compatibility"])
    async def openai_images(request: Request, body: OpenAIImageRequest) -> dict[str, Any]:
        """OpenAI's image generation: `data[].b64_json` (or `url`, served by this server)."""
        service = _service(request)
        width = height = None
        if body.size:
            width, height = (int(part) for part in body.size.split("x"))
        model = body.model if body.model and not body.model.startswith(("dall-e", "gpt-image")) else None
        if model is not None and model not in service.settings.served_models("image"):
            raise ApiError(404, f"The model '{model}' is not served here.", "invalid_request")
        try:
            image_request = parse_request(
                ImageRequest,
                {
                    "prompt": body.prompt,
                    "width": width,
                    "height": height,
                    "num_images": body.n,
                    "model": model,
                },
            )
        except RequestError as exc:
            raise ApiError(422, str(exc)) from None
        job = _submit(service, image_request, source="openai")
        status = _finished_or_error(await run_in_threadpool(service.wait, job.id, service.settings.job_timeout + 60))
        data = []
        for output in status["outputs"]:
            entry: dict[str, Any] = {"revised_prompt": status["request"]["prompt"]}
            if body.response_format == "url":
                entry["url"] = str(request.base_url).rstrip("/") + f"/api/outputs/{output['id']}/file"
            else:
                entry["b64_json"] = _read_b64(service, output)
            data.append(entry)
        return {"created": int(time.time()), "data": data}
