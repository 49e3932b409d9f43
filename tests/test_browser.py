"""One real-browser run: Playwright drives Debian's chromium against `muselab ui` on the tiny models.

It saves a screenshot of every page, at 1280x800 and 400x800, under test-output/screenshots/.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from PIL import Image

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
SHOTS = Path(__file__).resolve().parents[1] / "test-output" / "screenshots"

pytestmark = pytest.mark.skipif(
    not Path(CHROMIUM).exists() and not os.environ.get("CI"), reason="Debian's chromium is not installed"
)


def start_studio(data: Path, cache: str | None = None) -> tuple[subprocess.Popen, str]:
    """`muselab ui --preset tiny` on a free port, with `data` as its data folder; waits until it answers."""
    from test_server import free_port

    port = free_port()
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("MUSELAB_")},
        "MUSELAB_DATA_DIR": str(data),
        "MUSELAB_CACHE_DIR": cache or os.environ["MUSELAB_CACHE_DIR"],
        "HF_HUB_OFFLINE": "1",
    }
    process = subprocess.Popen(
        [sys.executable, "-m", "muselab", "ui", "--preset", "tiny", "--port", str(port)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        try:
            if httpx.get(url + "/_stcore/health", timeout=2).status_code == 200:
                return process, url
        except httpx.TransportError:
            time.sleep(0.3)
    process.kill()
    raise AssertionError("the studio did not start")


def stop(process: subprocess.Popen) -> None:
    process.terminate()
    try:
        process.wait(20)
    except subprocess.TimeoutExpired:
        process.kill()


@pytest.fixture(scope="module")
def studio(tiny_dir, tmp_path_factory):
    data = tmp_path_factory.mktemp("browser-data")
    (data / "tiny-models").symlink_to(tiny_dir / "tiny-models")
    process, url = start_studio(data)
    yield url
    stop(process)


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        instance = playwright.chromium.launch(
            executable_path=CHROMIUM,
            args=[
                "--no-sandbox",
                "--headless=new",
                "--disable-gpu",
                "--autoplay-policy=no-user-gesture-required",
                "--disable-background-networking",
                "--disable-component-update",
                "--no-first-run",
            ],
        )
        yield instance
        instance.close()


def shoot(page, name: str) -> None:
    """Screenshots at desktop and phone width; the page must not scroll sideways at either."""
    SHOTS.mkdir(parents=True, exist_ok=True)
    for width in (1280, 400):
        page.set_viewport_size({"width": width, "height": 800})
        page.wait_for_timeout(400)
        page.screenshot(path=str(SHOTS / f"{name}-{width}.png"), full_page=True)
        overflow = page.evaluate("document.documentElement.scrollWidth - document.documentElement.clientWidth")
        assert overflow <= 1, f"{name} scrolls sideways at {width}px"
    page.set_viewport_size({"width": 1280, "height": 800})


def go(page, url: str, path: str, heading: str) -> None:
    page.goto(f"{url}/{path}")
    page.get_by_role("heading", name=heading).first.wait_for(timeout=60_000)


def generate(page) -> None:
    page.get_by_role("button", name="Generate").click()


def start_a_long_image_job(page) -> None:
    """On the Image page: 8 images of 150 steps, minutes of work on the tiny models."""
    page.get_by_label("Describe the picture", exact=True).fill("a long one")
    page.get_by_label("Images", exact=True).fill("8")
    page.keyboard.press("Tab")
    page.get_by_text("Advanced settings").click()
    page.get_by_label("Steps (empty = model default)", exact=True).fill("150")
    page.keyboard.press("Tab")
    generate(page)


def assert_audio_plays(page) -> None:
    audio = page.locator("audio").first
    audio.wait_for(state="attached", timeout=120_000)
    page.wait_for_function("document.querySelector('audio') && document.querySelector('audio').readyState >= 1")
    page.evaluate("document.querySelector('audio').play()")
    page.wait_for_function("!document.querySelector('audio').paused && document.querySelector('audio').currentTime > 0")


def test_the_studio_in_a_real_browser(studio, browser, tmp_path):
    page = browser.new_page(viewport={"width": 1280, "height": 800}, accept_downloads=True)
    page.set_default_timeout(60_000)

    go(page, studio, "", "muselab")
    music_button = page.locator(".st-key-home-music button")
    music_button.wait_for()
    assert page.locator(".st-key-home-image button").is_visible()
    page.get_by_text("Running: cpu (").wait_for()
    shoot(page, "home")

    music_button.click()
    page.get_by_role("heading", name="Music").first.wait_for()
    page.get_by_label("Describe the music", exact=True).fill("calm piano, 70 bpm")
    page.keyboard.press("Tab")
    generate(page)
    assert_audio_plays(page)
    with page.expect_download() as wav:
        page.get_by_role("button", name="WAV").first.click()
    saved = tmp_path / "music.wav"
    wav.value.save_as(saved)
    assert saved.read_bytes()[:4] == b"RIFF" and wav.value.suggested_filename.endswith(".wav")
    shoot(page, "music")

    go(page, studio, "image", "Image")
    page.get_by_label("Describe the picture", exact=True).fill("a red fox in snow, watercolor")
    page.keyboard.press("Tab")
    # Before Generate: what each tier would take here, and the tier chosen on the first control.
    expected = page.get_by_text("Expected here:").first
    expected.wait_for()
    assert all(f"{tier} ~" in expected.inner_text() for tier in ("Turbo", "Fast", "Balanced", "Quality"))
    page.get_by_label("Speed", exact=True).click()
    page.get_by_role("option", name="balanced", exact=True).click()
    generate(page)
    png_button = page.get_by_role("button", name="PNG").first
    png_button.wait_for(timeout=120_000)
    assert page.locator("[data-testid='stImage'] img").count() >= 1
    with page.expect_download() as png:
        png_button.click()
    saved = tmp_path / "fox.png"
    png.value.save_as(saved)
    assert saved.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    recipe = json.loads(Image.open(saved).text["muselab"])["request"]
    assert (recipe["speed"], recipe["steps"]) == ("balanced", 25)  # the tier picked in the page
    shoot(page, "image")

    go(page, studio, "scene", "Scene")
    page.get_by_label("Describe the scene", exact=True).fill("a quiet harbour at dawn")
    page.keyboard.press("Tab")
    generate(page)
    page.locator("video").first.wait_for(state="attached", timeout=180_000)
    assert page.locator("[data-testid='stImage'] img").count() >= 1
    assert_audio_plays(page)
    shoot(page, "scene")

    go(page, studio, "gallery", "Gallery")
    for prompt in ("calm piano, 70 bpm", "a red fox in snow, watercolor", "a quiet harbour at dawn"):
        page.get_by_text(prompt, exact=True).first.wait_for()
    shoot(page, "gallery")

    go(page, studio, "image", "Image")
    start_a_long_image_job(page)
    cancel = page.get_by_role("button", name="Cancel")
    cancel.wait_for(timeout=120_000)
    cancel.scroll_into_view_if_needed()
    page.get_by_text("denoising steps").first.wait_for()  # the live progress bar with its ETA
    shoot(page, "image-running")
    cancel.click()
    page.get_by_text("Cancelled. Nothing partial was saved").wait_for(timeout=120_000)


NAVIGATION = ["Home", "Music", "Image", "Scene", "Batch", "Compare", "Gallery"]


def navigation_labels(page) -> list[str]:
    links = page.locator("[data-testid='stSidebarNav'] a")
    links.first.wait_for(timeout=60_000)
    # Each link's text is its icon's ligature name, then its label.
    return [label.strip().splitlines()[-1] for label in links.all_inner_texts()]


def test_a_link_or_a_reload_shows_the_same_navigation_as_home(studio, browser):
    """Bookmarks and the reload button are how people come back: each page reached directly shows
    the studio's navigation (not Streamlit's module names) and its own title."""
    page = browser.new_page(viewport={"width": 1280, "height": 800})
    page.set_default_timeout(60_000)
    go(page, studio, "", "muselab")
    assert navigation_labels(page) == NAVIGATION
    for path, heading in (("music", "Music"), ("image", "Image"), ("gallery", "Gallery"), ("scene", "Scene")):
        go(page, studio, path, heading)
        assert navigation_labels(page) == NAVIGATION, path
        page.reload()
        page.get_by_role("heading", name=heading).first.wait_for()
        assert navigation_labels(page) == NAVIGATION, f"{path} after a reload"
        assert page.title() == "muselab"


def test_sigterm_mid_job_stops_the_studio_cleanly_and_records_the_job_interrupted(tiny_dir, browser, tmp_path):
    import signal
    import sqlite3

    (tmp_path / "tiny-models").symlink_to(tiny_dir / "tiny-models")
    process, url = start_studio(tmp_path)
    try:
        page = browser.new_page(viewport={"width": 1280, "height": 800})
        page.set_default_timeout(60_000)
        go(page, url, "image", "Image")
        start_a_long_image_job(page)
        page.get_by_text("denoising steps").first.wait_for(timeout=120_000)  # running
        stopped_at = time.monotonic()
        process.send_signal(signal.SIGTERM)
        process.wait(10)
        assert time.monotonic() - stopped_at < 10
        errors = process.stderr.read() if process.stderr else ""
        assert process.returncode in (0, -signal.SIGTERM), errors  # not an abort (-6)
        assert "terminate called" not in errors and "Traceback" not in errors
        rows = sqlite3.connect(tmp_path / "history.sqlite3").execute("SELECT status FROM jobs").fetchall()
        assert rows == [("interrupted",)]
        assert not list((tmp_path / "outputs").glob("*.png"))
    finally:
        if process.poll() is None:
            process.kill()


def fill_history(data: Path, count: int) -> None:
    """`count` small pictures in the history of a studio's data folder, as finished jobs leave them."""
    from PIL import Image

    from muselab.media import save_image
    from muselab.store import HistoryStore, new_id

    store = HistoryStore(data / "history.sqlite3", data / "outputs")
    for number in range(count):
        request = {"prompt": f"picture {number}", "seed": number, "steps": 1, "guidance": 7.5}
        request.update(width=64, height=64, scheduler="Euler", kind="image")
        recipe = {"software": "muselab", "model_name": "m", "device": "cpu", "dtype": "float32", "request": request}
        picture = Image.new("RGB", (64, 64), ((number * 37) % 256, (number * 91) % 256, 120))
        path = save_image(picture, recipe, data / "outputs" / f"picture-{number}.png")
        job = new_id()
        store.add_job(job, "image", request, "cli")
        store.finish_job(
            job,
            "succeeded",
            outputs=[{"path": path, "kind": "image", "prompt": request["prompt"], "seed": number, "recipe": recipe}],
        )


def test_the_gallery_is_a_grid_whose_first_screen_holds_a_dozen_outputs(tiny_dir, browser, tmp_path):
    (tmp_path / "tiny-models").symlink_to(tiny_dir / "tiny-models")
    fill_history(tmp_path, 30)
    process, url = start_studio(tmp_path)
    try:
        page = browser.new_page(viewport={"width": 1280, "height": 800})
        page.set_default_timeout(60_000)
        go(page, url, "gallery", "Gallery")
        tiles = page.locator("[class*='st-key-tile-']")
        tiles.nth(11).locator("img").wait_for()
        boxes = [tiles.nth(index).bounding_box() for index in range(tiles.count())]
        on_first_screen = [box for box in boxes if box and box["y"] >= 0 and box["y"] + box["height"] <= 800]
        assert len(on_first_screen) >= 12, f"{len(on_first_screen)} tiles on the first screen"
        assert tiles.count() == 24 and page.get_by_role("button", name="Show more").count() == 1  # paged
        shoot(page, "gallery-grid")
        tiles.first.get_by_role("button", name="Open").click()
        dialog = page.get_by_role("dialog")
        dialog.get_by_text("picture 29", exact=True).wait_for()
        dialog.get_by_role("button", name="PNG").wait_for()
        assert dialog.get_by_role("button", name="PNG").count() == 1 and dialog.locator("img").count() >= 1
        assert dialog.get_by_role("button", name="Re-run").count() == 1
        assert dialog.get_by_role("button", name="Delete").count() == 1
        shoot(page, "gallery-detail")
    finally:
        stop(process)


def test_a_new_user_from_empty_caches_gets_an_image_and_a_clip_with_moving_progress(browser, tmp_path):
    """The path `make run` takes: an empty data folder (the tiny models are built) and an empty
    conversion cache (each model is converted for OpenVINO once, while the first page is open)."""
    data, cache = tmp_path / "data", tmp_path / "cache"
    data.mkdir()
    process, url = start_studio(data, cache=str(cache))
    try:
        page = browser.new_page(viewport={"width": 1280, "height": 800})
        page.set_default_timeout(120_000)
        go(page, url, "", "muselab")
        go(page, url, "image", "Image")
        page.get_by_label("Describe the picture", exact=True).fill("a first fox")
        page.keyboard.press("Tab")
        generate(page)
        seen: list[str] = []
        deadline = time.monotonic() + 600
        while not page.get_by_role("button", name="PNG").count():
            assert time.monotonic() < deadline, seen[-5:]
            bar = page.locator("[data-testid='stProgress']")
            if bar.count():
                with contextlib.suppress(Exception):  # the bar went between count() and reading it
                    seen.append(bar.first.inner_text(timeout=1000))
            page.wait_for_timeout(500)
        assert page.locator("[data-testid='stImage'] img").count() >= 1
        texts = [text for text in dict.fromkeys(seen) if text.strip()]
        assert len(texts) >= 3, texts  # the progress text changed while the first image was made
        assert not any("cached in" in text or str(cache) in text or "(one time) (one time)" in text for text in texts)
        go(page, url, "music", "Music")
        page.get_by_label("Describe the music", exact=True).fill("a first tune")
        page.keyboard.press("Tab")
        generate(page)
        assert_audio_plays(page)
        go(page, url, "gallery", "Gallery")
        for prompt in ("a first fox", "a first tune"):
            page.get_by_text(prompt, exact=True).first.wait_for()
    finally:
        stop(process)


def test_inpainting_a_painted_mask_keeps_the_rest_of_the_picture(studio, browser, tmp_path):
    """Upload a picture, paint over its top left corner, inpaint on the tiny models, download: the
    picture keeps its size, and far from the painted stroke its pixels are the input's exactly."""
    import numpy as np

    side = 64
    ramp = Image.linear_gradient("L").resize((side, side))
    channels = (ramp, ramp.transpose(Image.Transpose.ROTATE_90), Image.new("L", (side, side), 90))
    start = tmp_path / "start.png"
    Image.merge("RGB", channels).save(start)

    page = browser.new_page(viewport={"width": 1280, "height": 800}, accept_downloads=True)
    page.set_default_timeout(60_000)
    go(page, studio, "image", "Image")
    page.get_by_label("Describe the picture", exact=True).fill("a red fox in snow")
    page.keyboard.press("Tab")
    page.get_by_text("Start from a picture").click()
    page.locator("[data-testid='stFileUploaderDropzoneInput']").set_input_files(str(start))
    page.get_by_text(f"{side} x {side} pixels").wait_for()
    page.get_by_role("radio", name="Paint a mask").click()
    hint = page.get_by_text("Paint over what to repaint")
    hint.wait_for()
    canvas = page.locator("canvas").last
    canvas.scroll_into_view_if_needed()
    box = canvas.bounding_box()
    assert box and box["width"] > 300  # the picture shown large enough to paint on
    per_pixel = box["width"] / side
    # A stroke along the top left, picture rows 4-8 and columns 3-26 or so (the brush is 24 px wide).
    page.mouse.move(box["x"] + 3 * per_pixel, box["y"] + 6 * per_pixel)
    page.mouse.down()
    page.mouse.move(box["x"] + 26 * per_pixel, box["y"] + 6 * per_pixel, steps=12)
    page.mouse.up()
    hint.wait_for(state="detached")  # the drawing reached the studio: the request has a mask now
    shoot(page, "image-inpainting")
    generate(page)
    png_button = page.get_by_role("button", name="PNG").first
    png_button.wait_for(timeout=120_000)
    with page.expect_download() as png:
        png_button.click()
    saved = tmp_path / "inpainted.png"
    png.value.save_as(saved)
    result = Image.open(saved)
    recipe = json.loads(result.text["muselab"])["request"]
    assert recipe["mask"].startswith("sha256:") and recipe["init_image"].startswith("sha256:")
    assert result.size == (side, side)
    before, after = (np.asarray(picture.convert("RGB"), dtype=int) for picture in (Image.open(start), result))
    assert np.abs(after[:14] - before[:14]).max() > 0  # the painted part was repainted
    far = (slice(24, side), slice(0, side)), (slice(0, side), slice(40, side))  # beyond stroke and blur
    for rows, columns in far:
        assert np.array_equal(after[rows, columns], before[rows, columns])


def test_continue_this_makes_a_longer_clip_from_the_one_shown(studio, browser, tmp_path):
    """Make a clip, press Continue this under it, generate: the new clip starts from it and lasts
    longer (the download's length), and the page says which clip it continues."""
    import math

    import soundfile as sf

    from muselab.media import read_metadata

    page = browser.new_page(viewport={"width": 1280, "height": 800}, accept_downloads=True)
    page.set_default_timeout(60_000)
    go(page, studio, "music", "Music")
    page.get_by_label("Describe the music", exact=True).fill("a slow waltz")
    page.keyboard.press("Tab")
    generate(page)
    continue_button = page.get_by_role("button", name="Continue this")
    continue_button.wait_for(timeout=120_000)
    with page.expect_download() as wav:
        page.get_by_role("button", name="WAV").first.click()
    first = tmp_path / "first.wav"
    wav.value.save_as(first)
    first_seconds = sf.info(str(first)).duration
    continue_button.click()
    shown = page.get_by_text(wav.value.suggested_filename, exact=True)
    shown.wait_for()  # the starting clip, in the Continue a clip section
    shown.scroll_into_view_if_needed()
    page.get_by_text(f"{first_seconds:.1f} s", exact=True).wait_for()
    duration = math.ceil(first_seconds) + 10  # the clip and 10 s more, to begin with
    page.get_by_text(
        f"The piece: {duration} s in all; you get the clip, then {duration - first_seconds:.1f} s"
    ).wait_for()
    shoot(page, "music-continue")
    first_player = page.locator("audio").first.get_attribute("src")
    assert first_player
    generate(page)
    page.wait_for_function(  # the new clip's player, in place of the first one's
        "src => { const audio = document.querySelector('audio');"
        " return audio && audio.src && !audio.src.endsWith(src) }",
        arg=first_player,
        timeout=180_000,
    )
    with page.expect_download() as longer:
        page.get_by_role("button", name="WAV").first.click()
    second = tmp_path / "second.wav"
    longer.value.save_as(second)
    assert longer.value.suggested_filename != wav.value.suggested_filename
    assert sf.info(str(second)).duration == pytest.approx(duration, abs=0.1) and duration > first_seconds
    recipe = read_metadata(second)["recipe"]["request"]
    assert recipe["audio_prompt"].startswith("sha256:") and recipe["prompt"] == "a slow waltz"


def test_a_pasted_prompt_list_runs_as_a_batch_and_shows_each_picture(studio, browser):
    """Paste two lines on the Batch page, run them: one bar for the batch, then each item's picture
    under its prompt, and the batch among the recent ones."""
    page = browser.new_page(viewport={"width": 1280, "height": 800})
    page.set_default_timeout(60_000)
    go(page, studio, "batch", "Batch")
    page.get_by_label("Prompt list", exact=True).fill(
        "a lighthouse at dusk --steps 2 --width 64 --height 64\na paper boat --steps 2 --seed 5 --width 64 --height 64"
    )
    page.keyboard.press("Tab")
    page.get_by_role("button", name="Run").click()
    for item in (0, 1):
        page.locator(f".st-key-batch-item-{item} [data-testid='stImage'] img").wait_for(timeout=120_000)
    page.get_by_text("All 2 done").wait_for()
    for prompt in ("a lighthouse at dusk", "a paper boat"):
        assert page.locator(".st-key-batch-item-0, .st-key-batch-item-1").get_by_text(prompt, exact=True).count() == 1
    assert page.get_by_role("button", name="PNG").count() == 2
    page.get_by_role("heading", name="Recent batches").wait_for()
    page.locator(".st-key-batch-item-0").scroll_into_view_if_needed()
    shoot(page, "batch")
