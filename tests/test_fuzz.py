"""Property-based fuzzing of the API from its own OpenAPI schema: no input may cause a server error,
and no answer may name a folder of the machine. `MUSELAB_FUZZ_EXAMPLES` sets the examples per
operation (100 here; `make fuzz` runs more)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import schemathesis
import torch
from hypothesis import HealthCheck, Phase, given, settings
from schemathesis.checks import not_a_server_error

from muselab.api import create_app
from muselab.config import Settings

EXAMPLES = int(os.environ.get("MUSELAB_FUZZ_EXAMPLES", "100"))

schemathesis_app = {}


def _app(tiny_dir, tmp_path_factory):
    if "app" not in schemathesis_app:
        data = tmp_path_factory.mktemp("fuzz-data")
        (data / "tiny-models").symlink_to(tiny_dir / "tiny-models")
        # The time limit bounds the huge sizes and step counts the fuzzer asks for. Whether a job
        # finishes within it depends on the machine; the answer must not: a job stopped by it is
        # answered as a time limit (422), never as a server error.
        config = Settings(data_dir=data, preset="tiny", offline=True, max_queue=4, job_timeout=0.5)
        schemathesis_app["app"] = create_app(config)
        schemathesis_app["private"] = private_folders(data, tiny_dir)
    return schemathesis_app["app"]


def _as_local(app):
    """The test client calls itself 'testserver'; present it as localhost, as a real client would."""

    async def local_app(scope, receive, send):
        if scope["type"] == "http":
            headers = [(k, v) for k, v in scope["headers"] if k != b"host"]
            scope = {**scope, "headers": [*headers, (b"host", b"127.0.0.1:7860")]}
        await app(scope, receive, send)

    return local_app


def private_folders(*folders: Path) -> list[str]:
    """Folders whose names no answer may carry: the data and model folders, the conversion cache,
    the Hugging Face cache and the home folder (they name the user and the machine)."""
    from muselab.config import hf_cache_dir

    folders = (*folders, Path(os.environ["MUSELAB_CACHE_DIR"]), hf_cache_dir(), Path.home())
    return sorted({str(folder) for folder in folders} | {str(folder.resolve()) for folder in folders})


@schemathesis.check
def names_no_local_folder(ctx, response, case) -> None:
    text = response.content.decode("utf-8", "replace")
    leaked = [folder for folder in schemathesis_app["private"] if folder in text]
    assert not leaked, f"{case.method} {case.formatted_path} answered with the local folder(s) {leaked}"


@pytest.fixture(scope="module")
def api_schema(tiny_dir, tmp_path_factory):
    app = _app(tiny_dir, tmp_path_factory)
    yield schemathesis.openapi.from_asgi("/openapi.json", _as_local(app))
    app.state.service.shutdown(10)


def test_no_input_causes_a_server_error(api_schema):
    """Every operation, fuzzed within a bounded number of examples (schemathesis + hypothesis)."""
    # Earlier tests compiled OpenVINO models in this thread, and CPU_DENORMALS_OPTIMIZATION also
    # makes the compiling thread flush denormals to zero: Hypothesis refuses to draw floats then.
    torch.set_flush_denormal(False)
    operations = [result.ok() for result in api_schema.get_all_operations()]
    assert len(operations) >= 20
    statuses: list[int] = []
    for operation in operations:

        @given(case=operation.as_strategy())
        @settings(
            max_examples=EXAMPLES,
            deadline=None,
            derandomize=True,
            phases=[Phase.explicit, Phase.generate],
            suppress_health_check=list(HealthCheck),
            database=None,
        )
        def fuzz(case):
            if case.path.endswith("/events"):
                # A live stream would never end by itself: the events of an id that is not there.
                case.path_parameters = dict.fromkeys(case.path_parameters or {"job_id": None}, "0" * 32)
            response = case.call(timeout=60)
            statuses.append(response.status_code)
            case.validate_response(response, checks=[not_a_server_error, names_no_local_folder])

        fuzz()
    # The run really exercised the API: many calls, both accepted and refused inputs.
    assert len(statuses) > EXAMPLES // 3 * len(operations)
    assert any(code < 300 for code in statuses) and any(code == 422 for code in statuses)
