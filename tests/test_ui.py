"""The Streamlit studio, headless (AppTest), on the tiny models: every page, errors, cancel, feedback."""

from __future__ import annotations

import re
import time
from pathlib import Path

import pytest
from streamlit.testing.v1 import AppTest

import muselab.ui
from muselab.config import Settings

APP = str(Path(muselab.ui.__file__).parent / "app.py")


@pytest.fixture(scope="module")
def ui_env(tiny_dir, tmp_path_factory):
    data = tmp_path_factory.mktemp("ui-data")
    (data / "tiny-models").symlink_to(tiny_dir / "tiny-models")
    patch = pytest.MonkeyPatch()
    for name, value in {"MUSELAB_DATA_DIR": str(data), "MUSELAB_PRESET": "tiny", "HF_HUB_OFFLINE": "1"}.items():
        patch.setenv(name, value)
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


def test_home_has_the_two_entry_points_and_the_device(ui_env):
    at = open_page("home")
    labels = [button.label for button in at.button]
    assert labels[:2] == ["Music", "Image"]
    captions = " ".join(caption.value for caption in at.caption)
    assert "tiny-musicgen" in captions and "tiny-stable-diffusion" in captions
    # Where it runs and how: the device and dtype, then each kind's engine and weights.
    assert re.search(r"Running: cpu \((float32|bfloat16)\) · images: (torch|openvino), float weights", captions)
    assert re.search(r" · music: (torch|openvino), int8(-dynamic)? weights", captions)


def test_music_generates_plays_downloads_and_stores_feedback(ui_env):
    at = open_page("music")
    at.text_area(key="music.prompt").input("calm piano, 70 bpm")
    at.slider(key="music.duration").set_value(2)
    at.button(key="music.generate").click().run()
    run_until(at, lambda page: page.get("audio"))
    assert [button.label for button in at.get("download_button")] == ["WAV", "FLAC"]
    assert "calm piano, 70 bpm" in [text.value for text in at.text]
    assert len(at.get("image")) >= 1  # the waveform picture
    output_id = at.session_state["music.job"]
    at.feedback(key=next(f.key for f in at.get("feedback") if f.key.startswith("thumb."))).set_value(1)
    at.feedback(key=next(f.key for f in at.get("feedback") if f.key.startswith("stars."))).set_value(3)
    comment_key = next(t.key for t in at.text_input if t.key.startswith("comment."))
    at.text_input(key=comment_key).input("nice and calm")
    at.button(key=comment_key.replace("comment.", "rate.")).click().run()
    assert not at.exception
    [record] = store(ui_env).list_outputs(job_id=output_id)
    assert (record.thumb, record.stars, record.comment) == (1, 4, "nice and calm")


def test_use_these_settings_again(ui_env):
    at = open_page("music")
    at.text_area(key="music.prompt").input("warm synth pad")
    at.slider(key="music.duration").set_value(1)
    at.button(key="music.generate").click().run()
    run_until(at, lambda page: page.get("audio"))
    at.text_area(key="music.prompt").input("something else").run()
    at.button(key="music.reuse").click().run()
    assert at.text_area(key="music.prompt").value == "warm synth pad"
    assert at.slider(key="music.duration").value == 1
    assert at.number_input(key="music.seed").value >= 0


def test_bad_input_is_explained_in_the_page(ui_env):
    at = open_page("music")
    at.text_area(key="music.prompt").input("   ")
    at.button(key="music.generate").click().run()
    assert not at.exception
    assert "prompt: must be non-blank text" in at.error[0].value
    assert "music.job" not in at.session_state


def test_missing_weights_say_what_to_do(ui_env, monkeypatch):
    monkeypatch.setenv("MUSELAB_ALLOW_ANY_MODEL", "1")  # as `muselab ui` sets it on 127.0.0.1
    at = open_page("image")
    at.text_area(key="image.prompt").input("a fox")
    at.text_input(key="image.model").input("someone/not-downloaded")
    at.button(key="image.generate").click().run()
    run_until(at, lambda page: page.error)
    message = at.error[0].value
    assert "someone/not-downloaded" in message and "muselab models download someone/not-downloaded" in message
    assert "--preset tiny" in message and "Traceback" not in message


def test_an_exposed_studio_takes_only_the_served_models(ui_env):
    at = open_page("image")
    at.text_area(key="image.prompt").input("a fox")
    at.text_input(key="image.model").input("/root")
    at.button(key="image.generate").click().run()
    assert "model: must be one of the models this server offers" in at.error[0].value
    assert "image.job" not in at.session_state


def test_image_page_grid_downloads_and_cancel(ui_env):
    at = open_page("image")
    at.text_area(key="image.prompt").input("a red fox in snow")
    at.number_input(key="image.num_images").set_value(2)
    at.number_input(key="image.steps").set_value(3)
    at.button(key="image.generate").click().run()
    run_until(at, lambda page: len(page.get("download_button")) == 2)
    assert [button.label for button in at.get("download_button")] == ["PNG", "PNG"]

    at.number_input(key="image.steps").set_value(150)
    at.number_input(key="image.num_images").set_value(8)
    at.button(key="image.generate").click().run()
    run_until(at, lambda page: any(button.key == "image.cancel" for button in page.button))
    at.button(key="image.cancel").click().run()
    run_until(at, lambda page: page.warning and "Cancelled" in page.warning[0].value)
    assert "Nothing partial was saved" in at.warning[0].value


def test_scene_shows_picture_player_and_video(ui_env):
    at = open_page("scene")
    at.text_area(key="scene.prompt").input("a quiet harbour at dawn")
    at.slider(key="scene.duration").set_value(2)
    at.button(key="scene.generate").click().run()
    run_until(at, lambda page: page.get("video"), timeout=180)
    assert len(at.get("audio")) == 1 and len(at.get("image")) >= 1
    assert sorted(button.label for button in at.get("download_button")) == ["MP4", "PNG", "WAV"]


def open_output(at: AppTest, output_id: str) -> AppTest:
    """Click a tile's Open button: the output's detail view (a dialog) is drawn."""
    at.button(key=f"open.{output_id}").click().run()
    assert not at.exception, at.exception
    return at


def test_gallery_lists_filters_opens_and_deletes(ui_env):
    at = open_page("gallery")
    texts = [text.value for text in at.text]
    assert "calm piano, 70 bpm" in texts and "a quiet harbour at dawn" in texts
    assert len(at.get("imgs") or at.get("image")) >= 3  # a thumbnail on every tile: pictures, waveforms, frames
    at.selectbox(key="gallery.kind").set_value("Scene").run()
    assert [text.value for text in at.text] == ["a quiet harbour at dawn"]
    assert not at.get("video")  # a tile shows the scene's frame; its detail plays it
    scene = next(button for button in at.button if button.key.startswith("open.")).key.removeprefix("open.")
    assert open_output(at, scene).get("video")
    at = open_page("gallery")
    at.text_input(key="gallery.text").input("70 bpm").run()
    assert [text.value for text in at.text] == ["calm piano, 70 bpm"]
    output_id = next(button for button in at.button if button.key.startswith("open.")).key.removeprefix("open.")
    open_output(at, output_id)
    assert "nice and calm" in [text.value for text in at.text]  # its comment, as text
    assert [button.label for button in at.get("download_button")] == ["WAV", "FLAC"] and at.get("audio")
    at.button(key=f"delete.{output_id}").click().run()
    assert store(ui_env).get_output(output_id) is None
    assert [text.value for text in at.text] == []


def test_prompts_are_shown_as_text_not_html(ui_env):
    at = open_page("image")
    hostile = "<img src=x onerror=alert(1)> **bold**"
    at.text_area(key="image.prompt").input(hostile)
    at.number_input(key="image.steps").set_value(1)
    at.button(key="image.generate").click().run()
    run_until(at, lambda page: page.get("download_button"))
    at = open_page("gallery")
    assert hostile in [text.value for text in at.text]
    assert all(hostile not in markdown.value for markdown in at.markdown)


def test_gallery_shows_a_comment_as_text_never_as_markdown(ui_env):
    """A comment with a link and an image would make every visitor's browser fetch its address."""
    hostile = "**bold** ![x](http://127.0.0.1:9/pixel.png) [click](http://127.0.0.1:9/) www.example.test :red[x]"
    from PIL import Image

    history = store(ui_env)
    recipe = {"request": {"prompt": "commented"}, "model_name": "m"}
    picture = ui_env / "outputs" / "commented.png"
    picture.parent.mkdir(exist_ok=True)
    Image.new("RGB", (8, 8)).save(picture)
    history.add_job("d" * 32, "image", {"prompt": "commented"}, "cli")
    output = history.finish_job(
        "d" * 32,
        "succeeded",
        outputs=[{"path": picture, "kind": "image", "prompt": "commented", "seed": 1, "recipe": recipe}],
    )[0]
    history.set_feedback(output.id, stars=2, comment=hostile)
    at = open_output(open_page("gallery"), output.id)
    assert hostile in [text.value for text in at.text]
    rendered = [
        element.value
        for kind in ("markdown", "caption", "toast", "error", "warning", "info")
        for element in getattr(at, kind)
    ]
    assert not any("](http" in value or "**bold**" in value for value in rendered), rendered


def test_plain_text_survives_markdown_as_written():
    """Rendered as Markdown (CommonMark with tables and strikethrough, as Streamlit's), escaped
    user text makes no link, image or styling, and reads exactly as it was written."""
    import html

    from markdown_it import MarkdownIt

    from muselab.ui.common import plain

    markdown = MarkdownIt("commonmark").enable(["table", "strikethrough"])
    hostile = "**b** ![x](http://h/x.png) [l](https://h) <http://h> _i_ `c` # h ~~s~~ a|b"
    made = markdown.render(hostile)
    assert "<img" in made and "<a " in made and "<strong>" in made  # what the escaping must prevent
    shown = markdown.render(plain(hostile))
    for tag in ("<img", "<a ", "<strong>", "<em>", "<code>", "<s>", "<h1>", "<table>"):
        assert tag not in shown, tag
    assert html.unescape(shown.removeprefix("<p>").removesuffix("</p>\n")) == hostile


def test_the_studio_can_drive_a_running_server(ui_env, tiny_dir, tmp_path, monkeypatch):
    from test_server import Server

    server = Server(tmp_path / "server-data", tiny_dir, MUSELAB_API_TOKEN="t0ken").start()
    try:
        monkeypatch.setenv("MUSELAB_UI_API_URL", server.url)
        monkeypatch.setenv("MUSELAB_API_TOKEN", "t0ken")
        at = open_page("music")
        at.text_area(key="music.prompt").input("remote strings")
        at.slider(key="music.duration").set_value(1)
        at.button(key="music.generate").click().run()
        run_until(at, lambda page: page.get("audio"))
        assert [button.label for button in at.get("download_button")] == ["WAV", "FLAC"]
        # The front page says the server's device and engines, not this machine's.
        home = " ".join(caption.value for caption in open_page("home").caption)
        assert f"Running on {server.url}: cpu (" in home and " · music: " in home
        import httpx

        listed = httpx.get(server.url + "/api/outputs", headers={"authorization": "Bearer t0ken"}).json()
        assert [o["prompt"] for o in listed["outputs"]] == ["remote strings"]
    finally:
        server.stop()


def test_a_scene_stopped_during_its_soundtrack_shows_the_picture_it_kept(ui_env):
    from muselab.schemas import SceneRequest
    from muselab.ui.common import backend

    service = backend().service
    job = service.submit(SceneRequest(prompt="a lighthouse at night", duration=30, steps=2, seed=4))
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        progress = service.status(job.id)["progress"]
        if progress is not None and progress["stage"] == "music":
            break
        time.sleep(0.005)
    service.cancel(job.id)
    assert service.wait(job.id, 60)["status"] == "cancelled"
    at = open_page("scene")
    at.session_state["scene.job"] = job.id
    at.run()
    assert not at.exception, at.exception
    assert "1 finished file(s) kept" in at.warning[0].value
    assert at.get("imgs") or at.get("image")
    assert not at.get("audio") and not at.get("video")
    assert [button.label for button in at.get("download_button")] == ["PNG"]


def test_image_page_picks_loras_with_weights_and_the_picture_records_them(ui_env, tiny_dir):
    from muselab.engines.image.tiny import build_tiny_lora

    build_tiny_lora(tiny_dir / "tiny-models" / "tiny-stable-diffusion", ui_env / "loras" / "inkwash.safetensors")
    at = open_page("image")
    assert at.multiselect(key="image.loras").options == ["inkwash"]
    at.text_area(key="image.prompt").input("a red fox")
    at.number_input(key="image.steps").set_value(2)
    at.multiselect(key="image.loras").select("inkwash").run()
    at.slider(key="image.lora_weight.inkwash").set_value(0.6)
    at.button(key="image.generate").click().run()
    run_until(at, lambda page: len(page.get("download_button")) == 1)
    job = store(ui_env).list_jobs(limit=1)[0]
    assert job["request"]["loras"] == ["inkwash:0.6"] and job["request"]["lora_hashes"]["inkwash"]
    at.button(key="image.reuse").click().run()  # the recipe's LoRAs come back into the widgets
    assert at.multiselect(key="image.loras").value == ["inkwash"]
    assert at.slider(key="image.lora_weight.inkwash").value == 0.6
