"""Every error the API answers, in one shape (`security.error_body`), whichever route raised it."""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException

from muselab.api.security import error_body
from muselab.schemas import describe_errors

log = logging.getLogger("muselab.api")


class ApiError(Exception):
    """A refusal a route raises: answered as `status` with `error_body(message, kind)`."""

    def __init__(self, status: int, message: str, kind: str = "invalid_request", headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.kind, self.headers = status, message, kind, headers


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(ApiError, _api_error)  # type: ignore[arg-type]
    app.add_exception_handler(RequestValidationError, _invalid)  # type: ignore[arg-type]
    app.add_exception_handler(StarletteHTTPException, _http_error)  # type: ignore[arg-type]
    app.add_exception_handler(Exception, _unexpected)


async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
    return JSONResponse(error_body(exc.message, exc.kind), exc.status, headers=exc.headers)


async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
    message = describe_errors(body_model(request), exc.errors())
    return JSONResponse(error_body(message, "invalid_request"), 422)


async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    message = exc.detail if isinstance(exc.detail, str) else "Request failed."
    return JSONResponse(error_body(message, "http_error"), exc.status_code, headers=exc.headers)


async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
    log.exception("unhandled error on %s", request.url.path)
    return JSONResponse(error_body("Internal error; the details are in the server log.", "server_error"), 500)


def body_model(request: Request) -> type[BaseModel]:
    """The model the matched route reads its body from (`BaseModel` for a route without one).

    A validation error is described against it, so the message names that request's fields and
    their bounds; taking it from the route means a route added later (a model family's new kind)
    is described right without a list here to keep in step."""
    field = getattr(request.scope.get("route"), "body_field", None)
    model = getattr(getattr(field, "field_info", None), "annotation", None)
    return model if isinstance(model, type) and issubclass(model, BaseModel) else BaseModel
