"""Shared fixtures: the tiny models are built once per test session and loaded like real ones."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from muselab.config import Settings
from muselab.devices import choose_placement
from muselab.quiet import quiet_libraries

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session", autouse=True)
def shared_conversion_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One OpenVINO conversion cache for the whole session (each tiny model converts once), kept
    out of the user's own cache folder. Settings built in tests read it from the environment."""
    folder = tmp_path_factory.mktemp("muselab-cache")
    os.environ["MUSELAB_CACHE_DIR"] = str(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A data dir whose tiny-models/ holds both tiny models, built once through save_pretrained."""
    from muselab.testing.tiny import build_tiny_models

    quiet_libraries()
    data_dir = tmp_path_factory.mktemp("muselab-data")
    build_tiny_models(data_dir / "tiny-models")
    return data_dir


@pytest.fixture(scope="session")
def tiny_settings(tiny_dir: Path) -> Settings:
    return Settings(data_dir=tiny_dir, preset="tiny", offline=True)


@pytest.fixture(scope="session")
def image_engine(tiny_settings: Settings):
    from muselab.engines.image.engine import ImageEngine

    return ImageEngine.load(tiny_settings.model_for("image"), choose_placement(), offline=True)


@pytest.fixture(scope="session")
def music_engine(tiny_settings: Settings):
    from muselab.engines.music.engine import MusicEngine

    return MusicEngine.load(tiny_settings.model_for("music"), choose_placement(), offline=True)


@pytest.fixture
def cli_env(tiny_dir: Path, tmp_path: Path) -> dict[str, str]:
    """Environment for running the real `muselab` command in a subprocess, fully offline."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MUSELAB_")}
    env.update(
        MUSELAB_DATA_DIR=str(tiny_dir),
        MUSELAB_CACHE_DIR=os.environ["MUSELAB_CACHE_DIR"],
        MUSELAB_OUTPUT_DIR=str(tmp_path / "outputs"),
        HF_HOME=str(tmp_path / "hf-home"),
        HF_HUB_OFFLINE="1",
        PYTHONUNBUFFERED="1",
    )
    return env


def run_cli(args: list[str], env: dict[str, str], cwd: Path | None = None, timeout: float = 180):
    """Run `muselab ARGS` as a user would, in a fresh process."""
    return subprocess.run(
        [sys.executable, "-m", "muselab", *args],
        env=env,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def sse_events(client, url: str) -> list[tuple[str, dict]]:
    """The Server-Sent Events of `url` (a job's or a batch's), as (name, data) pairs, up to `done`."""
    import json

    events = []
    with client.stream("GET", url) as stream:
        assert stream.headers["content-type"].startswith("text/event-stream")
        name = None
        for line in stream.iter_lines():
            if line.startswith("event: "):
                name = line.removeprefix("event: ")
            elif line.startswith("data: "):
                events.append((name, json.loads(line.removeprefix("data: "))))
                if name == "done":
                    break
    return events
