"""The HTTP API (FastAPI): jobs, progress as Server-Sent Events, files by id, history, feedback,
and A1111 / OpenAI compatible image routes. Safe by default: see `muselab.api.security`.

One router a module: `jobs` (service info, submitting and following jobs), `batches` (batches and
comparison grids), `history` (outputs,
files, feedback, export), `compat_a1111` and `compat_openai`; `errors` answers every failure in
one shape, and `common` holds what the routers share (the job service as a dependency, ids).
"""

from __future__ import annotations

from contextlib import asynccontextmanager
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from collections.abc import AsyncIterator

    from fastapi import FastAPI

    from muselab.config import Settings
    from muselab.jobs import JobService


def create_app(settings: Settings, service: JobService | None = None) -> FastAPI:
    """The API app: `settings` guard it (`security.SecurityMiddleware`, CORS) and, without a
    `service`, make the job service it runs and shuts down."""
    # Imported here, not above: the routers bring in the job service and with it torch (seconds),
    # and `muselab ui` imports `muselab.api.security` only to check an address.
    from fastapi_offline import FastAPIOffline
    from starlette.concurrency import run_in_threadpool

    from muselab import __version__
    from muselab.api import batches, compat_a1111, compat_openai, history, jobs
    from muselab.api.errors import install_error_handlers
    from muselab.api.security import SecurityMiddleware
    from muselab.families import request_types
    from muselab.jobs import JobService

    own_service = service is None

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        from muselab.batches import batches_for

        # Batches a stopped server left running go on where they were (no item twice).
        await run_in_threadpool(batches_for(app.state.service).resume)
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
    install_error_handlers(app)
    for router in (
        jobs.service_router,
        jobs.submit_router(request_types()),  # read now, so a family registered before this gets its route
        jobs.router,
        batches.router,
        history.router,
        compat_a1111.router,
        compat_openai.router,
    ):
        app.include_router(router)
    return app
