"""The UI's one link to the job service: in-process by default, or a running `muselab serve` by URL.

Both give plain dicts shaped like the HTTP API's answers, so the pages do not care which it is.
"""

from __future__ import annotations

import os
import sys
from typing import Any, Protocol

from muselab.config import Settings
from muselab.families import family
from muselab.schemas import RequestError, parse_request

ACTIVE = ("queued", "running")


class BackendError(RuntimeError):
    """Something the user should read: busy queue, unreachable server, bad token..."""


class Backend(Protocol):
    def submit(self, kind: str, data: dict[str, Any]) -> str: ...
    def status(self, job_id: str) -> dict[str, Any]: ...
    def cancel(self, job_id: str) -> None: ...
    def outputs(self, **filters: Any) -> list[dict[str, Any]]: ...
    def output_bytes(self, output_id: str) -> bytes: ...
    def feedback(self, output_id: str, thumb: int | None, stars: int | None, comment: str | None) -> None: ...
    def delete(self, output_id: str) -> str: ...
    def info(self) -> dict[str, Any]: ...

    def estimate(self, kind: str, data: dict[str, Any]) -> dict[str, Any] | None: ...

    # Batches and comparison grids (`muselab.batches`); their statuses are `GET /api/batches/ID`'s.
    def submit_batch(self, text: str, kind: str, dynamic: str, name: str | None = None) -> str: ...
    def submit_grid(self, request: dict[str, Any], x: str, y: str | None) -> str: ...
    def batch(self, batch_id: str) -> dict[str, Any]: ...
    def cancel_batch(self, batch_id: str) -> None: ...
    def batches(self) -> list[dict[str, Any]]: ...


def validate(kind: str, data: dict[str, Any]) -> Any:
    """Check a request before sending it; RequestError says which field to change."""
    return parse_request(family(kind).request, {k: v for k, v in data.items() if v not in (None, "")})


class LocalBackend:
    def __init__(self, settings: Settings):
        import atexit

        from muselab.jobs import JobService

        self.service = JobService(settings)
        self._batches.resume()  # what a stopped studio or server left of its batches goes on
        # In the studio's own process (`muselab ui` marks it) the end skips the interpreter's
        # teardown; anywhere else (tests, a library caller) that would hide the exit status.
        atexit.register(self._stop if os.environ.get("MUSELAB_UI_PROCESS") else self.service.shutdown)
        if settings.prepare_models:
            self.service.prepare()

    def _stop(self) -> None:
        """When the studio stops (SIGTERM, Ctrl-C): its jobs stop within a step (on OpenVINO, at
        once) and are recorded as interrupted, then the process ends without the interpreter's
        final teardown, where the native libraries' threads aborted it ("terminate called without
        an active exception")."""
        import logging

        self.service.shutdown(8)
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)

    def submit(self, kind: str, data: dict[str, Any]) -> str:
        from muselab.jobs import QueueFull

        request = validate(kind, data)
        try:
            return self.service.submit(request, source="ui").id
        except QueueFull as exc:
            raise BackendError(str(exc)) from None

    def status(self, job_id: str) -> dict[str, Any]:
        status = self.service.status(job_id, with_preview=True)
        if status is None:
            raise BackendError("That job is no longer known.")
        return status

    def cancel(self, job_id: str) -> None:
        self.service.cancel(job_id)

    def outputs(self, **filters: Any) -> list[dict[str, Any]]:
        return [record.public() for record in self.service.store.list_outputs(**filters)]

    def output_bytes(self, output_id: str) -> bytes:
        store = self.service.store
        record = store.get_output(output_id)
        path = None if record is None else store.owned_file(record)  # the API's rule, see owned_file
        if path is None:
            raise BackendError("That file is gone.")
        return path.read_bytes()

    def feedback(self, output_id: str, thumb: int | None, stars: int | None, comment: str | None) -> None:
        self.service.store.set_feedback(output_id, thumb, stars, comment)

    def delete(self, output_id: str) -> str:
        deletion = self.service.store.delete_output(output_id)
        return deletion.message if deletion else "Already deleted."

    def info(self) -> dict[str, Any]:
        return self.service.info()

    def estimate(self, kind: str, data: dict[str, Any]) -> dict[str, Any] | None:
        return self.service.estimate(validate(kind, data))

    @property
    def _batches(self) -> Any:
        from muselab.batches import batches_for

        return batches_for(self.service)

    def submit_batch(self, text: str, kind: str, dynamic: str, name: str | None = None) -> str:
        from muselab.prompt_list import parse

        return self._batches.submit(parse(text, kind), source="ui", name=name or None, dynamic=dynamic)

    def submit_grid(self, request: dict[str, Any], x: str, y: str | None) -> str:
        return self._batches.submit_grid(request, x, y or None, source="ui")

    def batch(self, batch_id: str) -> dict[str, Any]:
        status = self._batches.status(batch_id)
        if status is None:
            raise BackendError("That batch is no longer known.")
        return status

    def cancel_batch(self, batch_id: str) -> None:
        self._batches.cancel(batch_id)

    def batches(self) -> list[dict[str, Any]]:
        return self._batches.recent(20)


class RemoteBackend:
    """Talks to `muselab serve` over HTTP (with its token when one is set)."""

    def __init__(self, url: str, token: str | None = None):
        import httpx

        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self.client = httpx.Client(base_url=url.rstrip("/"), headers=headers, timeout=30)

    def _call(self, method: str, path: str, **kwargs: Any) -> Any:
        import httpx

        try:
            response = self.client.request(method, path, **kwargs)
        except httpx.HTTPError as exc:
            raise BackendError(f"The muselab server at {self.client.base_url} cannot be reached: {exc}") from None
        if response.status_code >= 400:
            try:
                message = response.json()["error"]["message"]
            except (ValueError, KeyError, TypeError):
                message = response.text[:300]
            if response.status_code == 422:
                raise RequestError(message)
            raise BackendError(message)
        return response

    def submit(self, kind: str, data: dict[str, Any]) -> str:
        request = validate(kind, data)
        body = request.model_dump(mode="json", exclude_none=True)
        return self._call("POST", f"/api/jobs/{kind}", json=body).json()["id"]

    def status(self, job_id: str) -> dict[str, Any]:
        return self._call("GET", f"/api/jobs/{job_id}").json()

    def cancel(self, job_id: str) -> None:
        self._call("POST", f"/api/jobs/{job_id}/cancel", json={})

    def outputs(self, **filters: Any) -> list[dict[str, Any]]:
        params = {"q" if k == "text" else k: v for k, v in filters.items() if v is not None}
        return self._call("GET", "/api/outputs", params=params).json()["outputs"]

    def output_bytes(self, output_id: str) -> bytes:
        return self._call("GET", f"/api/outputs/{output_id}/file").content

    def feedback(self, output_id: str, thumb: int | None, stars: int | None, comment: str | None) -> None:
        body = {k: v for k, v in {"thumb": thumb, "stars": stars, "comment": comment}.items() if v is not None}
        self._call("POST", f"/api/outputs/{output_id}/feedback", json=body)

    def delete(self, output_id: str) -> str:
        return self._call("DELETE", f"/api/outputs/{output_id}").json().get("message", "Deleted.")

    def info(self) -> dict[str, Any]:
        return {**self._call("GET", "/api/info").json(), "served_by": str(self.client.base_url)}

    def estimate(self, kind: str, data: dict[str, Any]) -> dict[str, Any] | None:
        body = validate(kind, data).model_dump(mode="json", exclude_none=True)
        try:
            return self._call("POST", f"/api/estimate/{kind}", json=body).json()
        except BackendError:  # a server without tiers for this kind, or from before estimates
            return None

    def submit_batch(self, text: str, kind: str, dynamic: str, name: str | None = None) -> str:
        body = {"text": text, "kind": kind, "dynamic": dynamic, "name": name or None}
        return self._call("POST", "/api/batches", json=body).json()["id"]

    def submit_grid(self, request: dict[str, Any], x: str, y: str | None) -> str:
        return self._call("POST", "/api/grids", json={"request": request, "x": x, "y": y or None}).json()["id"]

    def batch(self, batch_id: str) -> dict[str, Any]:
        return self._call("GET", f"/api/batches/{batch_id}").json()

    def cancel_batch(self, batch_id: str) -> None:
        self._call("POST", f"/api/batches/{batch_id}/cancel", json={})

    def batches(self) -> list[dict[str, Any]]:
        return self._call("GET", "/api/batches", params={"limit": 20}).json()["batches"]
