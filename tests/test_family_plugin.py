"""A model family added from outside: docs/examples/sine_family.py, one file, edits nothing in
muselab, and is then a command, an API route and a studio page, with progress and cancel."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import soundfile as sf
from fastapi.testclient import TestClient
from streamlit.testing.v1 import AppTest

import muselab.ui
from conftest import REPO, run_cli
from muselab import families
from muselab.config import Settings

EXAMPLES = REPO / "docs" / "examples"
APP = str(Path(muselab.ui.__file__).parent / "app.py")


@pytest.fixture
def sine_plugin(monkeypatch):
    """The plugin found the way an installed one is: by the module name in MUSELAB_PLUGINS."""
    monkeypatch.syspath_prepend(str(EXAMPLES))
    monkeypatch.setenv("MUSELAB_PLUGINS", "sine_family")
    families._families.cache_clear()
    yield
    monkeypatch.undo()
    families._families.cache_clear()


@pytest.fixture
def sine_env(cli_env, tmp_path):
    env = dict(
        cli_env, MUSELAB_PLUGINS="sine_family", PYTHONPATH=str(EXAMPLES), MUSELAB_DATA_DIR=str(tmp_path / "data")
    )
    return env


def test_the_family_is_one_file_that_edits_nothing_in_muselab():
    """The whole family: its module. Registration and tiny builder live in it; no muselab file
    names it."""
    source = (EXAMPLES / "sine_family.py").read_text()
    assert "FAMILY = Family(" in source and "def build_tiny(" in source and "class SineEngine" in source
    named = [
        path for path in (REPO / "src").rglob("*.py") if "sine_family" in (text := path.read_text()) or "Sine" in text
    ]
    assert named == []


def test_the_cli_offers_its_fields_and_makes_a_tagged_wav(sine_env, tmp_path):
    helped = run_cli(["sine", "--help"], sine_env)
    assert helped.returncode == 0
    for option in ("--frequency", "--duration", "--clips", "--seed", "--format", "--from", "--json"):
        assert option in helped.stdout
    done = run_cli(
        ["sine", "a calm tone", "-d", "1", "--frequency", "220", "--seed", "5", "--preset", "tiny", "--json"], sine_env
    )
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    [file] = report["files"]
    audio, rate = sf.read(file["path"])
    assert rate == 16000 and len(audio) == 16000
    assert report["request"]["frequency"] == 220 and report["request"]["model"] == "tiny-sine"
    progress = [json.loads(line) for line in done.stderr.splitlines() if line.startswith('{"event": "progress"')]
    assert progress and progress[-1]["step"] == progress[-1]["total"] == 10
    # The recipe in the file re-runs it: the same seed gives the same samples.
    again = run_cli(["sine", "--from", file["path"], "--preset", "tiny", "--json"], sine_env)
    assert again.returncode == 0, again.stderr
    assert (sf.read(json.loads(again.stdout)["files"][0]["path"])[0] == audio).all()
    bad = run_cli(["sine", "x", "--frequency", "5", "--preset", "tiny"], sine_env)
    assert bad.returncode == 2 and "frequency: must be a number from 20 to 4000 (got 5.0)" in bad.stderr


def test_ctrl_c_cancels_a_sine_job(sine_env, tmp_path):
    process = subprocess.Popen(
        [sys.executable, "-m", "muselab", "sine", "long", "-d", "30", "--preset", "tiny", "--json"],
        env=sine_env,
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert process.stderr is not None
    for line in process.stderr:
        if line.startswith('{"event": "progress"'):
            break
    process.send_signal(signal.SIGINT)
    _, rest = process.communicate(timeout=60)
    assert process.returncode == 130 and "Cancelled" in rest


def test_the_api_has_its_route_schema_progress_and_cancel(sine_plugin, tiny_dir, tmp_path):
    from muselab.api import create_app

    settings = Settings(data_dir=tmp_path / "data", preset="tiny", offline=True)
    with TestClient(create_app(settings), base_url="http://127.0.0.1:7860") as client:
        schema = client.get("/openapi.json").json()
        assert "/api/jobs/sine" in schema["paths"]
        refused = client.post("/api/jobs/sine", json={"prompt": "x", "frequency": 1e6})
        assert refused.status_code == 422 and "frequency" in refused.text
        job = client.post("/api/jobs/sine", json={"prompt": "a tone", "duration": 20}).json()
        deadline = time.monotonic() + 60
        while (status := client.get(f"/api/jobs/{job['id']}").json())["progress"] is None:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert status["progress"]["total"] == 200 and status["model"] == "tiny-sine"
        assert client.post(f"/api/jobs/{job['id']}/cancel").json()["cancelled"] is True
        while (status := client.get(f"/api/jobs/{job['id']}").json())["status"] in ("queued", "running"):
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert status["status"] == "cancelled"
        done = client.post("/api/jobs/sine?wait=true", json={"prompt": "short", "duration": 0.5, "seed": 1}).json()
        assert done["status"] == "succeeded" and done["outputs"][0]["kind"] == "sine"
        assert client.get(f"/api/outputs/{done['outputs'][0]['id']}/file").content[:4] == b"RIFF"


def test_the_studio_has_its_page_with_fields_from_the_schema(sine_plugin, tmp_path, monkeypatch):
    for name, value in {"MUSELAB_DATA_DIR": str(tmp_path), "MUSELAB_PRESET": "tiny", "HF_HUB_OFFLINE": "1"}.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("MUSELAB_UI_API_URL", raising=False)
    monkeypatch.setenv("MUSELAB_PREPARE_MODELS", "false")
    at = AppTest.from_file(APP, default_timeout=60).run()
    assert "Sine" in [button.label for button in at.button]
    # The shared family page, registered under the kind's own address.
    page = next(h for h, info in at._registered_pages.items() if info.get("url_pathname") == "sine")
    at._page_hash = page
    at.run()
    assert not at.exception, at.exception
    at.text_area(key="sine.prompt").input("a calm tone")
    at.slider(key="sine.duration").set_value(0.5)
    assert at.slider(key="sine.frequency").value == 440.0  # the schema's default, in Advanced settings
    at.button(key="sine.generate").click().run()
    deadline = time.monotonic() + 60
    while not at.get("audio"):
        assert time.monotonic() < deadline, [e.value for e in at.error]
        time.sleep(0.2)
        at.run()
    assert [button.label for button in at.get("download_button")][:1] == ["WAV"]
    from muselab.ui.common import backend

    backend().service.shutdown(10)


def test_a_plugin_that_cannot_be_imported_is_named_in_the_error(monkeypatch, sine_env):
    monkeypatch.setenv("MUSELAB_PLUGINS", "no_such_family_module")
    families._families.cache_clear()
    try:
        with pytest.raises(families.PluginError, match=r"'no_such_family_module'.*MUSELAB_PLUGINS"):
            families.families()
    finally:
        monkeypatch.undo()
        families._families.cache_clear()
    done = run_cli(["music", "--help"], dict(sine_env, MUSELAB_PLUGINS="no_such_family_module"))
    assert done.returncode == 2 and "no_such_family_module" in done.stderr and "Traceback" not in done.stderr
