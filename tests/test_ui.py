"""The Streamlit studio, headless (AppTest), on the tiny models: every page, errors, cancel, feedback."""

from __future__ import annotations

import re
import time

import pytest
from streamlit.testing.v1 import AppTest

from apptest import open_page, run_until, store, studio_data
from muselab.config import Settings


@pytest.fixture(scope="module")
def ui_env(tiny_dir, tmp_path_factory):
    yield from studio_data(tiny_dir, tmp_path_factory, "ui-data")


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


# Picture editing: a starting picture, a mask, outpainting, hires fix, and Edit this / Upscale / Vary.


def gradient_png(side: int = 64) -> bytes:
    """A picture whose every pixel differs from its neighbours' (a plain one would hide a shift)."""
    import io

    from PIL import Image

    ramp = Image.linear_gradient("L").resize((side, side))
    channels = (ramp, ramp.transpose(Image.Transpose.ROTATE_90), Image.new("L", (side, side), 90))
    buffer = io.BytesIO()
    Image.merge("RGB", channels).save(buffer, format="PNG")
    return buffer.getvalue()


def picture_of(value: str, ui_env, mode: str = "RGB"):
    """A picture a request names: a stored input's reference, or base64 as the studio sends it."""
    from muselab.uploads import InputStore, decode_base64, decode_image, is_reference

    if is_reference(value):
        return InputStore(Settings(data_dir=ui_env).inputs).load(value, "picture", mode)
    return decode_image(decode_base64(value, "picture"), "picture", mode)


@pytest.fixture
def submitted(ui_env, monkeypatch):
    """Each request the studio sends, as it sends it."""
    from muselab.ui.backend import LocalBackend

    sent: list[dict] = []
    send = LocalBackend.submit

    def record(self, kind, data):
        sent.append({"kind": kind, **data})
        return send(self, kind, data)

    monkeypatch.setattr(LocalBackend, "submit", record)
    return sent


def with_picture(data: bytes | None = None, name: str = "start.png") -> AppTest:
    at = open_page("image")
    at.text_area(key="image.prompt").input("a red fox")
    at.file_uploader(key="image.upload").upload(name, data or gradient_png(), "image/png").run()
    assert not at.exception, at.exception
    return at


def last_job(ui_env) -> dict:
    return store(ui_env).list_jobs(limit=1)[0]


def test_an_uploaded_picture_starts_the_image_with_its_strength(ui_env):
    at = with_picture()
    assert at.selectbox(key="image.size").value == "Model default"  # its shape at the model's size
    at.selectbox(key="image.size").set_value("picture")  # or its own size, 64 x 64
    assert "64 x 64 pixels" in [caption.value for caption in at.caption]
    at.number_input(key="image.strength").set_value(0.5)
    at.number_input(key="image.steps").set_value(4)
    at.button(key="image.generate").click().run()
    run_until(at, lambda page: page.get("download_button"))
    request = last_job(ui_env)["request"]
    assert request["init_image"].startswith("sha256:") and request["strength"] == 0.5
    assert (request["width"], request["height"]) == (64, 64)
    from muselab.uploads import decode_image

    kept = picture_of(request["init_image"], ui_env)
    assert kept.tobytes() == decode_image(gradient_png(), "picture").tobytes()  # the very picture uploaded
    at.button(key="image.remove_picture").click().run()
    assert at.file_uploader(key="image.upload") and at.selectbox(key="image.size").value == "Model default"


def test_a_file_that_is_no_picture_is_refused_naming_the_field(ui_env):
    at = with_picture(b"GIF89a, or so it says", name="fox.png")
    shown = at.error[0].value.replace("\\", "")  # as it reads, the Markdown escapes rendered
    assert "init_image: a PNG, JPEG or WebP picture" in shown and "this is not one" in shown
    assert "image.picture" not in at.session_state and not [b for b in at.button if b.key == "image.remove_picture"]


def painted(width: int, height: int, box: tuple[int, int, int, int]) -> dict:
    """What the mask painter sends back once `box` is painted: its drawing as a PNG data URL."""
    import base64
    import io

    from PIL import Image

    drawing = Image.new("RGBA", (width, height), (0, 0, 0, 0))
    drawing.paste((255, 0, 170, 140), box)
    buffer = io.BytesIO()
    drawing.save(buffer, format="PNG")
    url = "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()
    return {"drawing": {"raw": {"objects": [{"type": "path"}]}, "data": url}, "backgroundFit": None}


def test_a_painted_mask_goes_in_the_request_at_the_pictures_size(ui_env, submitted):
    import hashlib

    at = with_picture()
    at.segmented_control(key="image.edit_mode").set_value("paint").run()
    assert "Paint over what to repaint" in " ".join(caption.value for caption in at.caption)
    canvas = "image.canvas." + hashlib.sha256(gradient_png()).hexdigest()[:16]
    at.session_state[canvas] = painted(448, 448, (0, 0, 224, 224))  # the top left quarter
    at.run()
    at.number_input(key="image.mask_blur").set_value(8)
    at.toggle(key="image.inpainting_mask_invert").set_value(True)
    at.selectbox(key="image.inpainting_fill").set_value("latent noise")
    at.toggle(key="image.inpaint_full_res").set_value(True).run()
    at.number_input(key="image.inpaint_full_res_padding").set_value(16)
    at.button(key="image.generate").click().run()
    assert not at.exception, at.exception
    request = submitted[-1]
    mask = picture_of(request["mask"], ui_env, "L")
    assert mask.size == (64, 64)
    assert mask.getpixel((4, 4)) == 255 and mask.getpixel((60, 60)) == 0 and mask.getbbox() == (0, 0, 32, 32)
    assert request["init_image"] and request["mask_blur"] == 8 and request["inpainting_mask_invert"] is True
    assert request["inpainting_fill"] == "latent noise"
    assert (request["inpaint_full_res"], request["inpaint_full_res_padding"]) == (True, 16)


def test_an_uploaded_mask_outpainting_and_hires_fix_reach_the_request(ui_env, submitted):
    at = with_picture()
    at.segmented_control(key="image.edit_mode").set_value("upload").run()
    at.file_uploader(key="image.mask_upload").set_value(("mask.png", gradient_png(32), "image/png")).run()
    jobs = len(store(ui_env).list_jobs(limit=100))
    at.button(key="image.generate").click().run()
    assert "mask: must be the size of" in at.error[0].value  # the service's words, naming the field
    assert len(store(ui_env).list_jobs(limit=100)) == jobs
    at.file_uploader(key="image.mask_upload").set_value(("mask.png", gradient_png(), "image/png")).run()
    at.button(key="image.generate").click().run()
    assert not at.error and picture_of(submitted[-1]["mask"], ui_env).size == (64, 64)

    at.segmented_control(key="image.edit_mode").set_value("outpaint").run()
    at.number_input(key="image.outpaint").set_value(16)
    at.multiselect(key="image.outpaint_sides").set_value(["left", "right"])
    at.button(key="image.generate").click().run()
    request = submitted[-1]
    assert (request["outpaint"], request["outpaint_sides"], request.get("mask")) == (16, ["left", "right"], None)
    assert not [toggle for toggle in at.toggle if toggle.key == "image.enable_hr"]  # text-to-image only

    at.button(key="image.remove_picture").click().run()  # hires fix is for text-to-image
    at.toggle(key="image.enable_hr").set_value(True).run()
    at.slider(key="image.hr_scale").set_value(1.5)
    at.selectbox(key="image.hr_upscaler").set_value("Latent")
    at.number_input(key="image.hr_second_pass_steps").set_value(3)
    at.number_input(key="image.strength").set_value(0.6)
    at.button(key="image.generate").click().run()
    request = submitted[-1]
    assert request.get("init_image") is None and request["enable_hr"] is True
    assert (request["hr_scale"], request["hr_upscaler"], request["hr_second_pass_steps"]) == (1.5, "Latent", 3)
    assert request["strength"] == 0.6


def first_picture(ui_env, prompt: str) -> AppTest:
    at = open_page("image")
    at.text_area(key="image.prompt").input(prompt)
    at.selectbox(key="image.size").set_value("Tiny 64 (test models)")
    at.number_input(key="image.steps").set_value(4)
    at.number_input(key="image.seed").set_value(7)
    at.button(key="image.generate").click().run()
    return run_until(at, lambda page: page.get("download_button"))


def finished(at: AppTest, before: str) -> AppTest:
    """Rerun until the page's job is a new one, done, with its picture."""
    return run_until(
        at,
        lambda page: (
            page.session_state["image.job"] != before
            and page.get("download_button")
            and not any(button.key == "image.cancel" for button in page.button)
        ),
    )


def output_picture(ui_env, job_id: str):
    from PIL import Image

    [record] = store(ui_env).list_outputs(job_id=job_id)
    return Image.open(record.path).convert("RGB")


def press_under_picture(at, ui_env, action: str, job: str) -> dict:
    """Click `action` (edit, upscale, vary) under `job`'s picture and wait for the job it starts:
    that job's request."""
    [output] = store(ui_env).list_outputs(job_id=job)
    at.button(key=f"{action}.{output.id}").click().run()
    finished(at, job)
    return last_job(ui_env)["request"]


def test_vary_makes_a_picture_near_this_one_with_a_variation_seed(ui_env):
    at = first_picture(ui_env, "a lighthouse")
    first = at.session_state["image.job"]
    request = press_under_picture(at, ui_env, "vary", first)
    assert "Variation of seed 7: variation seed " in at.info[0].value
    assert (request["prompt"], request["seed"], request["subseed_strength"]) == ("a lighthouse", 7, 0.2)
    assert request["subseed"] is not None
    varied = output_picture(ui_env, at.session_state["image.job"])
    assert varied.size == (64, 64) and varied.tobytes() != output_picture(ui_env, first).tobytes()
    at.button(key="image.reuse").click().run()  # the variation seed comes back into Advanced settings
    assert at.number_input(key="image.subseed").value == request["subseed"]
    assert at.slider(key="image.subseed_strength").value == 0.2


def test_upscale_redraws_the_picture_at_twice_its_size(ui_env):
    at = first_picture(ui_env, "a windmill")
    first = at.session_state["image.job"]
    [output] = store(ui_env).list_outputs(job_id=first)
    assert "128 x 128" in at.button(key=f"upscale.{output.id}").help
    at.button(key=f"upscale.{output.id}").click().run()
    assert "Upscale to 128 x 128 pixels" in at.info[0].value
    finished(at, first)
    request = last_job(ui_env)["request"]
    assert (request["width"], request["height"], request["strength"]) == (128, 128, 0.3)
    assert (request["prompt"], request["seed"]) == ("a windmill", 7)
    assert picture_of(request["init_image"], ui_env).tobytes() == output_picture(ui_env, first).tobytes()
    assert output_picture(ui_env, at.session_state["image.job"]).size == (128, 128)
    # Vary on an edit (it has no starting noise to blend): the same edit with a new seed.
    varied = press_under_picture(at, ui_env, "vary", at.session_state["image.job"])
    assert "The same edit with a new seed" in at.info[0].value
    assert varied["seed"] != 7 and varied["subseed_strength"] == 0 and varied["init_image"] == request["init_image"]


def test_edit_this_opens_the_image_page_on_the_picture_with_its_prompt(ui_env):
    at = first_picture(ui_env, "a harbour crane")
    first = at.session_state["image.job"]
    [output] = store(ui_env).list_outputs(job_id=first)
    at.text_area(key="image.prompt").input("something else").run()
    at.button(key=f"edit.{output.id}").click().run()
    assert not at.exception, at.exception
    assert at.text_area(key="image.prompt").value == "a harbour crane"
    assert at.session_state["image.picture"]["size"] == (64, 64)
    assert "The picture's own (64 x 64)" in at.selectbox(key="image.size").options
    at.number_input(key="image.strength").set_value(0.4)
    at.button(key="image.generate").click().run()
    finished(at, first)
    request = last_job(ui_env)["request"]
    assert request["strength"] == 0.4
    assert picture_of(request["init_image"], ui_env).tobytes() == output_picture(ui_env, first).tobytes()


def test_the_gallery_edits_upscales_and_varies_a_picture(ui_env):
    [output] = store(ui_env).list_outputs(job_id=first_picture(ui_env, "a lantern").session_state["image.job"])
    at = open_output(open_page("gallery"), output.id)
    labels = {button.label for button in at.button if (button.key or "").endswith(output.id)}
    assert {"Edit this", "Upscale", "Vary"} <= labels
    at.button(key=f"edit.{output.id}").click().run()
    assert not at.exception, at.exception
    assert at.text_area(key="image.prompt").value == "a lantern" and at.session_state["image.picture"]
    assert "gallery.open" not in at.session_state  # the dialog closed behind it
    at = open_output(open_page("gallery"), output.id)
    at.button(key=f"vary.{output.id}").click().run()
    assert not at.exception, at.exception
    assert "Variation of seed 7: variation seed " in at.info[0].value and at.session_state["image.job"]


# Clips on the Music page: continue one (an upload, or Continue this), follow a melody (an upload,
# or Use as melody).


def tone_wav(seconds: float, pitch: float = 440.0, rate: int = 32000) -> bytes:
    import io

    import numpy as np
    import soundfile as sf

    time_ = np.arange(int(seconds * rate)) / rate
    buffer = io.BytesIO()
    sf.write(buffer, (0.3 * np.sin(2 * np.pi * pitch * time_)).astype("float32"), rate, format="WAV")
    return buffer.getvalue()


def output_seconds(ui_env, job_id: str) -> float:
    import soundfile as sf

    [record] = store(ui_env).list_outputs(job_id=job_id)
    return sf.info(str(record.path)).duration


def music_finished(at: AppTest, before: str | None) -> AppTest:
    """Rerun until the Music page's job is a new one, done, with its clip."""
    return run_until(
        at,
        lambda page: (
            page.session_state["music.job"] != before
            and page.get("audio")
            and not any(button.key == "music.cancel" for button in page.button)
        ),
    )


def first_clip(prompt: str, seconds: int = 2) -> AppTest:
    at = open_page("music")
    at.text_area(key="music.prompt").input(prompt)
    at.slider(key="music.duration").set_value(seconds)
    at.button(key="music.generate").click().run()
    return music_finished(at, None)


def test_an_uploaded_clip_is_continued_whole_or_only_its_new_part(ui_env, submitted):
    at = open_page("music")
    assert at.slider(key="music.duration").proto.max == 300  # long pieces, past the model's 30 s
    at.text_area(key="music.prompt").input("a march")
    at.file_uploader(key="music.clip_upload").upload("tune.wav", tone_wav(1.0), "audio/wav").run()
    assert not at.exception, at.exception
    assert "tune.wav" in [text.value for text in at.text] and "1.0 s" in [caption.value for caption in at.caption]
    assert at.slider(key="music.duration").value == 11  # the clip and 10 s more, to begin with
    at.slider(key="music.duration").set_value(3).run()
    assert "The piece: 3 s in all; you get the clip, then 2.0 s of new music." in [c.value for c in at.caption]
    at.button(key="music.generate").click().run()
    music_finished(at, None)
    import base64

    assert base64.b64decode(submitted[-1]["audio_prompt"]) == tone_wav(1.0)  # the very file, sent as base64
    job = last_job(ui_env)
    assert job["status"] == "succeeded" and job["request"]["audio_prompt"].startswith("sha256:")
    assert output_seconds(ui_env, job["id"]) == pytest.approx(3, abs=0.05)  # the clip and what follows it

    at.toggle(key="music.new_only").set_value(True).run()
    assert "you get only the 2.0 s of new music" in " ".join(caption.value for caption in at.caption)
    before = at.session_state["music.job"]
    at.button(key="music.generate").click().run()
    music_finished(at, before)
    assert last_job(ui_env)["request"]["new_only"] is True
    assert output_seconds(ui_env, at.session_state["music.job"]) == pytest.approx(2, abs=0.05)

    at.button(key="music.reuse").click().run()  # the clip comes back with the recipe, by its reference
    assert at.session_state["music.clip"]["value"] == last_job(ui_env)["request"]["audio_prompt"]
    assert "The clip that piece continued" in [text.value for text in at.text]
    assert at.toggle(key="music.new_only").value is True
    at.button(key="music.remove_clip").click().run()  # back to a piece of its own
    assert at.file_uploader(key="music.clip_upload") and "tune.wav" not in [text.value for text in at.text]


def test_a_file_that_is_no_clip_is_refused_naming_the_field(ui_env):
    at = open_page("music")
    at.file_uploader(key="music.clip_upload").upload("tune.wav", b"RIFF, or so it says", "audio/wav").run()
    shown = at.error[0].value.replace("\\", "")
    assert "audio_prompt: a WAV, FLAC, OGG or MP3 clip" in shown and "this is not one" in shown
    assert "music.clip" not in at.session_state


def test_continue_this_makes_a_longer_piece_from_the_clip_with_its_prompt(ui_env, submitted):
    at = first_clip("a slow waltz")
    first = at.session_state["music.job"]
    [output] = store(ui_env).list_outputs(job_id=first)
    at.text_area(key="music.prompt").input("something else").run()
    at.button(key=f"continue.{output.id}").click().run()
    assert not at.exception, at.exception
    assert at.text_area(key="music.prompt").value == "a slow waltz"
    assert output.path.name in [text.value for text in at.text]  # the starting clip, shown
    assert at.slider(key="music.duration").value == 12  # its 2 s and 10 s more
    at.slider(key="music.duration").set_value(4)
    at.button(key="music.generate").click().run()
    music_finished(at, first)
    assert submitted[-1]["audio_prompt"] == f"output:{output.id}"
    job = last_job(ui_env)
    assert job["status"] == "succeeded" and job["request"]["audio_prompt"].startswith("sha256:")
    longer = output_seconds(ui_env, job["id"])
    assert longer == pytest.approx(4, abs=0.05) and longer > output_seconds(ui_env, first)


def test_use_as_melody_switches_to_a_melody_model_and_follows_the_clip(ui_env, submitted):
    at = first_clip("a folk tune")
    first = at.session_state["music.job"]
    [output] = store(ui_env).list_outputs(job_id=first)
    at.button(key=f"as_melody.{output.id}").click().run()
    assert not at.exception, at.exception
    assert at.text_input(key="music.model").value == "tiny-musicgen-melody"
    assert "which can follow a melody (tiny-musicgen cannot)" in at.info[0].value.replace("\\", "")
    assert output.path.name in [text.value for text in at.text]
    at.button(key="music.generate").click().run()
    music_finished(at, first)
    assert submitted[-1]["melody"] == f"output:{output.id}"
    job = last_job(ui_env)
    assert job["status"] == "succeeded" and job["request"]["melody"].startswith("sha256:")
    assert job["request"]["model"] == "tiny-musicgen-melody"
    assert output_seconds(ui_env, job["id"]) == pytest.approx(2, abs=0.05)


def test_a_melody_for_a_model_that_cannot_follow_one_is_refused_and_nothing_is_lost(ui_env):
    at = open_page("music")
    at.text_area(key="music.prompt").input("a hymn")
    at.slider(key="music.duration").set_value(5)
    at.file_uploader(key="music.melody_upload").upload("hum.wav", tone_wav(2.0, 262.0), "audio/wav").run()
    at.text_input(key="music.model").input("tiny-musicgen").run()
    assert "tiny-musicgen cannot follow a melody" in at.warning[0].value.replace("\\", "")
    jobs = len(store(ui_env).list_jobs(limit=100))
    at.button(key="music.generate").click().run()
    shown = at.error[0].value.replace("\\", "")
    assert "melody: tiny-musicgen cannot follow a melody; use a melody model" in shown  # the service's words
    assert len(store(ui_env).list_jobs(limit=100)) == jobs
    assert at.text_area(key="music.prompt").value == "a hymn" and at.slider(key="music.duration").value == 5
    assert "hum.wav" in [text.value for text in at.text] and at.text_input(key="music.model").value == "tiny-musicgen"
    at.button(key="music.use_melody_model").click().run()  # the way out the warning offers
    assert at.text_input(key="music.model").value == "tiny-musicgen-melody" and not at.warning


def test_the_gallery_continues_a_clip_and_uses_one_as_melody(ui_env):
    [output] = store(ui_env).list_outputs(job_id=first_clip("a lullaby").session_state["music.job"])
    at = open_output(open_page("gallery"), output.id)
    labels = {button.label for button in at.button if (button.key or "").endswith(output.id)}
    assert {"Continue this", "Use as melody"} <= labels
    at.button(key=f"continue.{output.id}").click().run()
    assert not at.exception, at.exception
    assert at.text_area(key="music.prompt").value == "a lullaby" and at.slider(key="music.duration").value == 12
    assert at.session_state["music.clip"]["value"] == f"output:{output.id}"
    assert "gallery.open" not in at.session_state  # the dialog closed behind it
    at = open_output(open_page("gallery"), output.id)
    at.button(key=f"as_melody.{output.id}").click().run()
    assert not at.exception, at.exception
    assert at.session_state["music.melody_clip"]["value"] == f"output:{output.id}"
    assert at.text_input(key="music.model").value == "tiny-musicgen-melody"
