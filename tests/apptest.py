"""What the studio's AppTest files share: a studio data folder on the tiny models, opening a page,
rerunning it until something shows, and the history it writes."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from streamlit.testing.v1 import AppTest

import muselab.ui
from muselab.config import Settings

APP = str(Path(muselab.ui.__file__).parent / "app.py")


def studio_data(tiny_dir: Path, tmp_path_factory: pytest.TempPathFactory, name: str) -> Iterator[Path]:
    """An empty data folder (but for the tiny models) that the studio's in-process service uses;
    the body of each AppTest file's module-scoped `ui_env` fixture."""
    data = tmp_path_factory.mktemp(name)
    (data / "tiny-models").symlink_to(tiny_dir / "tiny-models")
    patch = pytest.MonkeyPatch()
    for key, value in {"MUSELAB_DATA_DIR": str(data), "MUSELAB_PRESET": "tiny", "HF_HUB_OFFLINE": "1"}.items():
        patch.setenv(key, value)
    patch.delenv("MUSELAB_UI_API_URL", raising=False)
    yield data
    from muselab.ui.common import backend

    backend().service.shutdown(10)
    patch.undo()


def open_page(page: str) -> AppTest:
    at = AppTest.from_file(APP, default_timeout=60).run()
    if page != "home":
        at.switch_page(f"views/{page}.py").run()
    assert not at.exception, at.exception
    return at


def run_until(at: AppTest, done, timeout: float = 120) -> AppTest:
    """Rerun the page (as the live-progress fragment does) until `done(at)` holds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        at.run()
        assert not at.exception, at.exception
        if done(at):
            return at
        time.sleep(0.2)
    raise AssertionError("the page never got there")


def store(ui_env):
    from muselab.store import HistoryStore

    return HistoryStore.for_settings(Settings(data_dir=ui_env))
