"""What keeps a muselab server safe to run: which requests it answers at all, how big and how slow
they may be, and the HTTP protocol that drops clients who never finish their headers.

`SecurityMiddleware` wraps the API (see `muselab.api.create_app`); `SlowClientH11Protocol` is
the HTTP protocol `muselab serve` runs uvicorn with. README's "Safe by default" lists each rule
with the test that holds it.
"""

from __future__ import annotations

import asyncio
import hmac
import ipaddress
import json
from typing import Any
from urllib.parse import urlsplit

import h11
from starlette.types import ASGIApp, Message, Receive, Scope, Send
from uvicorn.protocols.http.h11_impl import H11Protocol

LOOPBACK_NAMES = {"localhost", "127.0.0.1", "::1"}
BODY_METHODS = ("POST", "PUT", "PATCH", "DELETE")


def error_body(message: str, kind: str, param: str | None = None) -> dict[str, Any]:
    """One error shape for every route (it is also OpenAI's): {"error": {"message", "type", ...}}."""
    return {"error": {"message": message, "type": kind, "param": param, "code": None}}


def is_loopback(host: str) -> bool:
    if host in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


#: The routes that take their pictures and clips as multipart files (`api/jobs.py:submit_job_with_files`).
FILE_PATHS = frozenset({"/api/jobs/image/files", "/api/jobs/music/files"})
#: The routes whose body may carry a picture or a clip (base64 or a file): up to
#: `max_upload_body_bytes`; every other route keeps `max_body_bytes`.
UPLOAD_PATHS = frozenset(
    {
        "/api/jobs/image",
        "/api/estimate/image",
        "/api/jobs/music",  # a clip to continue, a melody
        "/api/estimate/music",
        "/sdapi/v1/img2img",
        "/sdapi/v1/png-info",
        "/api/batches",  # a long prompt list, or JSON Lines requests with their pictures
        "/api/grids",
    }
    | FILE_PATHS
)


class SecurityMiddleware:
    """Stops other web pages and other machines from driving a local server.

    - A loopback-bound server answers only requests whose Host is loopback (stops DNS rebinding).
    - With a token configured, every route but /healthz needs `Authorization: Bearer <token>`.
    - State-changing requests must send JSON (a cross-site form cannot) and, when the browser
      sends an Origin, it must be this server's own or a configured CORS origin.
    - Request bodies are capped in size, with a Content-Length or chunked, and must arrive within
      `client_timeout` seconds.
    """

    def __init__(self, app: ASGIApp, settings: Any):
        self.app, self.settings = app, settings
        self.loopback_only = is_loopback(settings.host)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        refusal = self._refuse(scope, headers)
        if refusal is None and scope["method"] in BODY_METHODS:
            body, refusal = await self._read_body(receive, self.body_limit(scope["path"]))
            if refusal is None:
                receive = _replay(body, receive)
        if refusal is not None:
            status, message, kind = refusal
            await _answer(send, status, error_body(message, kind))
            return
        await self.app(scope, receive, send)

    def _refuse(self, scope: Scope, headers: dict[str, str]) -> tuple[int, str, str] | None:
        host = urlsplit("//" + headers.get("host", "")).hostname or ""
        if self.loopback_only and not is_loopback(host):
            return 421, "This server only answers requests addressed to localhost.", "forbidden_host"
        token = self.settings.api_token
        if token and scope["path"] != "/healthz":
            given = headers.get("authorization", "")
            if not hmac.compare_digest(given.encode(), f"Bearer {token}".encode()):
                return 401, "Missing or wrong token: send 'Authorization: Bearer <token>'.", "unauthorized"
        if scope["method"] in BODY_METHODS:
            origin = headers.get("origin")
            if origin and not self._origin_allowed(origin, headers.get("host", "")):
                return 403, f"Requests from the web origin {origin} are not allowed.", "forbidden_origin"
            has_body = headers.get("content-length", "0") != "0" or "transfer-encoding" in headers
            content_type = headers.get("content-type", "").split(";")[0].strip().lower()
            # JSON only, which a web page cannot send cross-site without a preflight; the file
            # routes take multipart instead, and there a browser's own word that the request
            # comes from another site (Sec-Fetch-Site, which no page can set) refuses it too.
            expected = "multipart/form-data" if scope["path"] in FILE_PATHS else "application/json"
            if scope["method"] != "DELETE" and (has_body or content_type) and content_type != expected:
                return 415, f"Send the request body as {expected} (Content-Type: {expected}).", "unsupported_media"
            if expected != "application/json" and headers.get("sec-fetch-site", "none") not in ("same-origin", "none"):
                return 403, "Files from another site's page are not accepted.", "forbidden_origin"
            try:
                length = int(headers.get("content-length", "0"))
            except ValueError:
                return 400, "Invalid Content-Length header.", "invalid_request"
            if length > self.body_limit(scope["path"]):
                return self._too_large(self.body_limit(scope["path"]))
        return None

    def body_limit(self, path: str) -> int:
        """Bodies are small JSON, but for the routes that take a picture (`UPLOAD_PATHS`)."""
        if path in UPLOAD_PATHS:
            return max(self.settings.max_body_bytes, self.settings.max_upload_body_bytes)
        return self.settings.max_body_bytes

    @staticmethod
    def _too_large(limit: int) -> tuple[int, str, str]:
        return 413, f"Request body too large (limit {limit} bytes).", "too_large"

    def _origin_allowed(self, origin: str, host_header: str) -> bool:
        if origin in self.settings.cors_origins:
            return True
        parsed = urlsplit(origin)
        return parsed.scheme in ("http", "https") and parsed.netloc == host_header

    async def _read_body(self, receive: Receive, limit: int) -> tuple[bytes, tuple[int, str, str] | None]:
        """The whole body, read before the app sees it: cut off past the size limit (a chunked
        body has no Content-Length to check first) or past the time limit (a body trickled a
        byte at a time would hold a connection, and the job queue's slot, for as long as it likes)."""
        chunks: list[bytes] = []
        size = 0
        deadline = asyncio.get_running_loop().time() + self.settings.client_timeout
        while True:
            remaining = deadline - asyncio.get_running_loop().time()
            try:
                message = await asyncio.wait_for(receive(), max(remaining, 0.001))
            except TimeoutError:
                return b"", (
                    408,
                    f"The request body did not arrive within {self.settings.client_timeout:g} s.",
                    "timeout",
                )
            if message["type"] == "http.disconnect":
                return b"", (400, "The client went away before sending the whole body.", "invalid_request")
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                return b"", self._too_large(limit)
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks), None


def _replay(body: bytes, receive: Receive) -> Receive:
    """A `receive` that gives the app the body already read, then what the client does next."""
    sent = False

    async def replay() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay


async def _answer(send: Send, status: int, body: dict[str, Any]) -> None:
    data = json.dumps(body).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode())]
    if status in (408, 413):
        headers.append((b"connection", b"close"))  # the rest of the body is not read
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": data})


class SlowClientH11Protocol(H11Protocol):
    """uvicorn's HTTP/1.1 protocol, plus a time limit on a request's headers.

    uvicorn waits for headers without end: a client that connects and sends nothing, or trickles a
    header a byte every few seconds (slowloris), holds a connection for as long as it likes, and
    enough of them hold them all. Here the headers must be complete within `client_timeout`
    seconds of the connection (or of the last response on a kept-alive one), or the connection
    is closed. Bodies have the same limit in `SecurityMiddleware`."""

    client_timeout = 30.0

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._header_timer: asyncio.TimerHandle | None = None
        self._arm_header_timer()

    def data_received(self, data: bytes) -> None:
        if self._header_timer is None and self.conn.their_state is h11.IDLE:
            self._arm_header_timer()  # a kept-alive connection's next request starts
        super().data_received(data)
        if self.conn.their_state is not h11.IDLE:
            self._disarm_header_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm_header_timer()
        super().connection_lost(exc)

    def _arm_header_timer(self) -> None:
        self._header_timer = self.loop.call_later(self.client_timeout, self._headers_too_slow)

    def _disarm_header_timer(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _headers_too_slow(self) -> None:
        self._header_timer = None
        if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
            self.transport.close()


def protocol_with_timeout(seconds: float) -> type[SlowClientH11Protocol]:
    """The protocol class for uvicorn's `http` setting, with this server's client time limit."""
    return type("MuselabH11Protocol", (SlowClientH11Protocol,), {"client_timeout": seconds})
