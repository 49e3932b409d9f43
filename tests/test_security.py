"""Safe by default: each test here fails if the protection it names is removed (README lists them).

The holes an outside probe found (delete outside the outputs folder, local paths in answers and
files, CSV injection, Markdown in the Gallery) and the promises that had no test of their own.
"""

from __future__ import annotations

import csv
import io
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from PIL import Image

from conftest import run_cli
from muselab.config import Settings
from muselab.jobs import JobService, SaveOptions
from muselab.schemas import MAX_SEED, ImageRequest, MusicRequest
from muselab.store import HistoryStore
from test_api import make_client, wait_done


@pytest.fixture
def client(tiny_dir, tmp_path):
    with make_client(tiny_dir, tmp_path) as test_client:
        yield test_client


def generate_image(client, **body) -> dict:
    response = client.post("/api/jobs/image?wait=true", json={"prompt": "a red fox", "steps": 1, "seed": 3, **body})
    assert response.status_code == 200, response.text
    return response.json()


# ---------------------------------------------------------------- hole 1: delete outside the outputs folder


def test_deleting_a_cli_output_written_elsewhere_keeps_its_file(tiny_dir, tmp_path):
    """The class of InvokeAI's CVE-2024-11042: the history may delete only inside its own folder."""
    with make_client(tiny_dir, tmp_path) as client:
        service: JobService = client.app.state.service
        elsewhere = tmp_path / "elsewhere"
        request = ImageRequest(prompt="a fox", steps=1, seed=1)
        job = service.submit(request, source="cli", save=SaveOptions(output=elsewhere / "fox.png"))
        assert wait_done(client, job.id)["status"] == "succeeded"
        outside = client.get("/api/outputs").json()["outputs"][0]
        assert (elsewhere / "fox.png").is_file()
        assert client.get(f"/api/outputs/{outside['id']}/file").status_code == 404

        answer = client.delete(f"/api/outputs/{outside['id']}")
        assert answer.status_code == 200
        assert answer.json()["file_deleted"] is False and "kept" in answer.json()["message"]
        assert (elsewhere / "fox.png").is_file(), "a file outside the outputs folder was deleted"
        assert client.get(f"/api/outputs/{outside['id']}").status_code == 404  # forgotten all the same

        inside = generate_image(client)["outputs"][0]
        answer = client.delete(f"/api/outputs/{inside['id']}").json()
        assert answer["file_deleted"] is True
        assert not (tmp_path / "outputs" / inside["filename"]).exists()


def test_the_studio_and_the_cli_delete_by_the_same_rule(tiny_dir, tmp_path, cli_env):
    data = tmp_path / "data"
    store = HistoryStore(data / "history.sqlite3", tmp_path / "outputs")
    outside = tmp_path / "elsewhere" / "keep.png"
    outside.parent.mkdir()
    Image.new("RGB", (8, 8)).save(outside)
    store.add_job("a" * 32, "image", {"prompt": "x"}, "cli")
    record = store.finish_job(
        "a" * 32, "succeeded", outputs=[{"path": outside, "kind": "image", "prompt": "x", "seed": 1, "recipe": {}}]
    )[0]
    env = {**cli_env, "MUSELAB_DATA_DIR": str(data), "MUSELAB_OUTPUT_DIR": str(tmp_path / "outputs")}
    result = run_cli(["history", "delete", record.id[:8]], env)
    assert result.returncode == 0, result.stderr
    assert "outside the outputs folder, so it was kept" in result.stdout
    assert outside.is_file() and store.get_output(record.id) is None

    from muselab.ui.backend import LocalBackend

    store.add_job("b" * 32, "image", {"prompt": "x"}, "cli")
    record = store.finish_job(
        "b" * 32, "succeeded", outputs=[{"path": outside, "kind": "image", "prompt": "x", "seed": 1, "recipe": {}}]
    )[0]
    studio = LocalBackend(Settings(data_dir=data, output_dir=tmp_path / "outputs", preset="tiny"))
    try:
        with pytest.raises(Exception, match="gone"):
            studio.output_bytes(record.id)  # nor does the studio read it out
        assert "kept" in studio.delete(record.id)
    finally:
        studio.service.shutdown(5)
    assert outside.is_file()


# ---------------------------------------------------------------- hole 2: local paths and versions


def private_strings(*folders: Path) -> list[str]:
    home = str(Path.home())
    return [str(folder) for folder in folders] + [str(folder.resolve()) for folder in folders] + [home]


def test_no_answer_names_a_folder_of_the_machine_or_a_library_version(tiny_dir, tmp_path):
    with make_client(tiny_dir, tmp_path) as client:
        image = generate_image(client)
        music = client.post("/api/jobs/music?wait=true", json={"prompt": "calm piano", "duration": 1, "seed": 1})
        scene = client.post("/api/jobs/scene?wait=true", json={"prompt": "harbour", "duration": 1, "seed": 1})
        assert music.status_code == scene.status_code == 200
        png = client.get(f"/api/outputs/{image['outputs'][0]['id']}/file").content
        answers = {
            "info": client.get("/api/info").text,
            "jobs": client.get("/api/jobs").text,
            "job": client.get(f"/api/jobs/{image['id']}").text,
            "events": client.get(f"/api/jobs/{scene.json()['id']}/events").text,
            "outputs": client.get("/api/outputs").text,
            "jsonl": client.get("/api/history/export").text,
            "csv": client.get("/api/history/export?format=csv").text,
            "sd-models": client.get("/sdapi/v1/sd-models").text,
            "png chunks": json.dumps(Image.open(io.BytesIO(png)).text),
            "music": music.text,
            "scene": scene.text,
        }
        for name, text in answers.items():
            for private in private_strings(tmp_path, tiny_dir, Path(os.environ["MUSELAB_CACHE_DIR"])):
                assert private not in text, f"{name} names {private}"
        info = client.get("/api/info").json()
        assert info["models"] == {"music": "tiny-musicgen", "image": "tiny-stable-diffusion"}
        assert not any(char.isdigit() for char in info["runtime"]["image_backend"] + info["runtime"]["music_backend"])
        recipe = json.loads(Image.open(io.BytesIO(png)).text["muselab"])
        assert recipe["request"]["model"] == "tiny-stable-diffusion"  # named, and re-runnable here by that name
        rerun = client.post("/api/jobs/image?wait=true", json={**recipe["request"], "kind": "image"})
        assert rerun.status_code == 200 and rerun.json()["status"] == "succeeded"
        assert client.get(f"/api/outputs/{rerun.json()['outputs'][0]['id']}/file").content == png
    from muselab.engines import describe_runtime

    on_openvino = describe_runtime(Settings(data_dir=tmp_path, backend="openvino"), public=True)
    assert on_openvino["image_backend"].startswith("openvino") and not any(
        char.isdigit() for char in on_openvino["image_backend"] + on_openvino["music_backend"]
    ), on_openvino  # no library version, whatever backend this machine's settings pick


def test_errors_of_a_configured_model_name_no_folder(tiny_dir, tmp_path):
    missing = tmp_path / "models" / "my-sd"
    with make_client(tiny_dir, tmp_path, image_model=str(missing)) as client:
        status = client.post("/api/jobs/image?wait=true", json={"prompt": "x"}).json()
        assert status["status"] == "failed" and "my-sd" in status["error"]
        assert str(tmp_path) not in json.dumps(status) and str(tmp_path) not in client.get("/api/jobs").text
        failed = client.post("/sdapi/v1/txt2img", json={"prompt": "x"})
        assert failed.status_code == 503 and str(tmp_path) not in failed.text


def test_the_missing_model_message_names_no_cache_folder(tiny_dir, tmp_path):
    from muselab.config import hf_cache_dir

    with make_client(tiny_dir, tmp_path, allow_any_model=True) as client:
        status = client.post("/api/jobs/image?wait=true", json={"prompt": "x", "model": "someone/absent"}).json()
        assert "not in the local Hugging Face cache" in status["error"]
        assert str(hf_cache_dir()) not in status["error"]


@pytest.mark.parametrize("field", ["model", "decoder_model"])
def test_a_client_cannot_probe_which_folders_exist(client, tmp_path, field):
    """A folder named by a client is refused before the file system is touched: the same answer
    for a folder that exists and one that does not, and no job."""
    answers = []
    for folder in ("/root", str(tmp_path), "/no/such/folder", "../../etc", "~"):
        response = client.post("/api/jobs/image", json={"prompt": "x", field: folder, "decoder": "fast"})
        assert response.status_code == 422, response.text
        message = response.json()["error"]["message"]
        assert f"{field}: must be one of the models this server offers" in message
        answers.append(message.replace(repr(folder), "FOLDER"))
    assert len(set(answers)) == 1
    assert client.get("/api/jobs").json()["recent"] == []
    assert (
        client.post("/api/jobs/image", json={"prompt": "x", "model": "CompVis/stable-diffusion-v1-4"}).status_code
        == 202
    )


def test_the_operator_can_let_clients_name_folders(tiny_dir, tmp_path):
    folder = tiny_dir / "tiny-models" / "tiny-stable-diffusion"
    with make_client(tiny_dir, tmp_path, allow_any_model=True) as client:
        status = generate_image(client, model=str(folder))
        assert status["status"] == "succeeded" and status["outputs"][0]["recipe"]["request"]["model"] == folder.name


# ---------------------------------------------------------------- hole 3: CSV injection

PROMPTS = ['=HYPERLINK("http://127.0.0.1:9/","x")', "+1+1", "-2+3", "@SUM(A1)"]
COMMENTS = ["=cmd|' /C calc'!A0", "\tcmd", "\rcmd", "-x"]


def test_csv_export_cannot_carry_a_formula(tiny_dir, tmp_path, cli_env):
    with make_client(tiny_dir, tmp_path) as client:
        for prompt, comment in zip(PROMPTS, COMMENTS, strict=True):
            output = generate_image(client, prompt=prompt)["outputs"][0]
            client.post(f"/api/outputs/{output['id']}/feedback", json={"comment": comment})
        exported = client.get("/api/history/export?format=csv").text
        jsonl = client.get("/api/history/export").text
    rows = list(csv.DictReader(io.StringIO(exported, newline="")))
    assert len(rows) == len(PROMPTS)
    for row, prompt, comment in zip(rows, PROMPTS, COMMENTS, strict=True):
        for cell in row.values():
            assert not cell.startswith(("=", "+", "-", "@", "\t", "\r")), cell
        assert row["prompt"] == "'" + prompt and row["comment"] == "'" + comment
    # JSON Lines carries the text as it was written.
    assert [json.loads(line)["comment"] for line in jsonl.splitlines()] == COMMENTS
    env = {**cli_env, "MUSELAB_DATA_DIR": str(tmp_path / "data"), "MUSELAB_OUTPUT_DIR": str(tmp_path / "outputs")}
    result = run_cli(["history", "export", "-f", "csv"], env)
    assert result.returncode == 0, result.stderr
    cli_rows = list(csv.DictReader(io.StringIO(result.stdout)))
    assert [row["prompt"] for row in cli_rows] == ["'" + prompt for prompt in PROMPTS]
    assert all(row["comment"].startswith("'") for row in cli_rows)


# ---------------------------------------------------------------- hole 4 is in test_ui (Markdown in the Gallery)

# ---------------------------------------------------------------- promises


def test_cors_allow_list_lets_a_listed_origin_in_and_keeps_others_out(tiny_dir, tmp_path):
    allowed = "http://studio.example:3000"
    with make_client(tiny_dir, tmp_path, cors_origins=[allowed]) as client:
        body = {"prompt": "x", "steps": 1}
        response = client.post("/api/jobs/image", json=body, headers={"origin": allowed})
        assert response.status_code == 202 and response.headers["access-control-allow-origin"] == allowed
        refused = client.post("/api/jobs/image", json=body, headers={"origin": "http://other.example:3000"})
        assert refused.status_code == 403 and "access-control-allow-origin" not in refused.headers
        preflight = client.options(
            "/api/jobs/image", headers={"origin": allowed, "access-control-request-method": "POST"}
        )
        assert preflight.headers.get("access-control-allow-origin") == allowed


@pytest.mark.parametrize("trick", ["{id}.png", "{id}%00", "{id}%20", "{ID}", "{id}..", "..%5C{id}", "{id};x"])
def test_tricks_around_a_real_output_id_are_refused_before_any_lookup(client, trick):
    real = generate_image(client)["outputs"][0]["id"]
    attempt = trick.format(id=real, ID=real.upper())
    for method, route in (
        ("GET", f"/api/outputs/{attempt}/file"),
        ("GET", f"/api/outputs/{attempt}"),
        ("DELETE", f"/api/outputs/{attempt}"),
    ):
        response = client.request(method, route)
        assert response.status_code == 422, (method, route, response.status_code)
        assert "output_id: must be an id the API gave" in response.json()["error"]["message"]
    assert client.get(f"/api/outputs/{real}/file").status_code == 200  # the real one is still there


def test_a_symlinked_outputs_folder_still_serves_its_own_files(tiny_dir, tmp_path):
    real = tmp_path / "real-outputs"
    real.mkdir()
    (tmp_path / "outputs").symlink_to(real)
    with make_client(tiny_dir, tmp_path) as client:
        output = generate_image(client)["outputs"][0]
        assert (real / output["filename"]).is_file()
        served = client.get(f"/api/outputs/{output['id']}/file")
        assert served.status_code == 200 and served.content[:4] == b"\x89PNG"


def test_a_time_limit_is_answered_as_what_it_is(tiny_dir, tmp_path):
    with make_client(tiny_dir, tmp_path, job_timeout=0.3) as client:
        response = client.post("/sdapi/v1/txt2img", json={"prompt": "x", "steps": 150, "batch_size": 8})
        assert response.status_code == 422 and response.json()["error"]["type"] == "time_limit"
        assert "MUSELAB_JOB_TIMEOUT" in response.json()["error"]["message"]


def chunked_body(kilobytes: int):
    yield b'{"prompt": "'
    for _ in range(kilobytes):
        yield b"x" * 1000
    yield b'"}'


def test_an_oversized_chunked_body_is_refused_like_one_with_a_length(client, tiny_dir, tmp_path):
    headers = {"content-type": "application/json"}
    response = client.post("/api/jobs/scene", content=chunked_body(100), headers=headers)
    assert response.status_code == 413 and "too large" in response.json()["error"]["message"]
    assert client.get("/api/jobs").json()["recent"] == []
    # The picture routes' larger limit holds for chunked bodies too.
    with make_client(tiny_dir, tmp_path, max_upload_body_bytes=200_000) as small:
        response = small.post("/api/jobs/image", content=chunked_body(300), headers=headers)
        assert response.status_code == 413 and "limit 200000 bytes" in response.json()["error"]["message"]


def test_docs_load_no_script_from_another_site(client):
    page = client.get("/docs")
    assert page.status_code == 200 and "SwaggerUIBundle" in page.text
    assert "cdn." not in page.text and "https://" not in page.text
    for asset in ("/static-offline-docs/swagger-ui-bundle.js", "/static-offline-docs/swagger-ui.css"):
        assert client.get(asset).status_code == 200 and len(client.get(asset).content) > 10_000
    redoc = client.get("/redoc")
    assert redoc.status_code == 200 and "cdn." not in redoc.text and "fonts.googleapis" not in redoc.text


# ---------------------------------------------------------------- seeds and samplers


def test_seed_zero_stays_zero_and_a_batch_wraps_at_two_to_the_32(image_engine, music_engine):
    request = ImageRequest(prompt="x", steps=1, width=64, height=64, seed=MAX_SEED, num_images=2)
    assert [output.seed for output in image_engine.generate(request).outputs] == [MAX_SEED, 0]
    zero = image_engine.generate(request.model_copy(update={"seed": 0, "num_images": 1}))
    assert zero.request.seed == 0 and zero.outputs[0].seed == 0
    clips = music_engine.generate(MusicRequest(prompt="x", duration=1, seed=MAX_SEED, num_clips=2))
    assert [clip.seed for clip in clips.outputs] == [MAX_SEED, 0]


def test_the_last_image_of_a_wrapped_batch_re_runs_from_its_file(cli_env, tmp_path):
    made = run_cli(
        ["image", "x", "--preset", "tiny", "--steps", "1", "--seed", str(MAX_SEED), "-n", "2", "-o", f"{tmp_path}/"],
        cli_env,
    )
    assert made.returncode == 0, made.stderr
    last = sorted(tmp_path.glob("x-0.png"))[0]
    again = run_cli(["image", "--from", str(last), "--preset", "tiny", "-o", str(tmp_path / "again.png")], cli_env)
    assert again.returncode == 0, again.stderr
    assert (tmp_path / "again.png").read_bytes() == last.read_bytes()


def test_sampler_names_map_as_a1111_means_them(client):
    import diffusers

    from muselab.engines.image.engine import make_scheduler
    from muselab.media import a1111_parameters, parse_a1111_parameters

    config = diffusers.DDIMScheduler().config
    assert type(make_scheduler("Euler", config)) is diffusers.EulerDiscreteScheduler
    assert type(make_scheduler("Euler a", config)) is diffusers.EulerAncestralDiscreteScheduler
    assert type(make_scheduler("PNDM", config)) is diffusers.PNDMScheduler
    request = {"prompt": "x", "steps": 2, "scheduler": "PNDM", "guidance": 7, "seed": 1, "width": 64, "height": 64}
    text = a1111_parameters(request, "m")
    assert "Sampler: PLMS" in text and parse_a1111_parameters(text)["scheduler"] == "PNDM"
    for a1111, ours in (("PLMS", "PNDM"), ("Euler", "Euler"), ("Euler a", "Euler a")):
        body = {"prompt": "x", "steps": 2, "sampler_name": a1111}
        info = json.loads(client.post("/sdapi/v1/txt2img", json=body).json()["info"])
        assert info["sampler_name"] == ours
        assert f"Sampler: {a1111}" in info["infotexts"][0]


# ---------------------------------------------------------------- weights: safetensors only


def pickle_bomb(marker: Path) -> bytes:
    """A pickle that, if unpickled, creates `marker` (what a malicious .bin would run)."""
    import pickle

    class Payload:
        def __reduce__(self):
            return (Path.touch, (marker,))

    return pickle.dumps(Payload())


@pytest.mark.parametrize("kind", ["music", "image"])
def test_a_pickled_bin_in_a_model_folder_is_refused_and_never_unpickled(tiny_dir, tmp_path, kind):
    import shutil

    from muselab.devices import choose_placement
    from muselab.engines import ModelUnavailable

    name = {"music": "tiny-musicgen", "image": "tiny-stable-diffusion"}[kind]
    folder = tmp_path / name
    shutil.copytree(tiny_dir / "tiny-models" / name, folder)
    marker = tmp_path / "unpickled"
    for weights in list(folder.rglob("*.safetensors")):
        weights.unlink()
        pickled = "pytorch_model.bin" if weights.name == "model.safetensors" else weights.stem + ".bin"
        weights.with_name(pickled).write_bytes(pickle_bomb(marker))
    if kind == "music":
        from muselab.engines.music.engine import MusicEngine

        load = lambda: MusicEngine.load(str(folder), choose_placement(), offline=True)  # noqa: E731
    else:
        from muselab.engines.image.engine import ImageEngine

        load = lambda: ImageEngine.load(str(folder), choose_placement(), offline=True)  # noqa: E731
    with pytest.raises(ModelUnavailable, match="safetensors weights are required"):
        load()
    assert not marker.exists(), "a pickled weights file was unpickled"


# ---------------------------------------------------------------- the safety checker


def flagging_copy(tiny_dir: Path, target: Path) -> Path:
    """The tiny image model with a safety checker that flags every picture (its concept thresholds
    below any cosine similarity), built for this test."""
    import shutil

    from safetensors.torch import load_file, save_file

    shutil.copytree(tiny_dir / "tiny-models" / "tiny-stable-diffusion", target)
    weights_file = next((target / "safety_checker").glob("*.safetensors"))
    weights = load_file(weights_file)
    for name in ("concept_embeds_weights", "special_care_embeds_weights"):
        weights[name] = weights[name].new_full(weights[name].shape, -2.0)
    save_file(weights, weights_file, metadata={"format": "pt"})
    return target


def test_a_flagged_image_is_blanked_and_said_so_and_the_checker_can_be_turned_off(tiny_dir, tmp_path, cli_env):
    model = flagging_copy(tiny_dir, tmp_path / "flagging-sd")
    common = ["--model", str(model), "--steps", "1", "--seed", "2", "--backend", "torch"]
    flagged = run_cli(["image", "x", *common, "-o", str(tmp_path / "flagged.png")], cli_env)
    assert flagged.returncode == 0, flagged.stderr
    assert "safety checker flagged this image" in flagged.stderr and "--no-safety-checker" in flagged.stderr
    picture = Image.open(tmp_path / "flagged.png")
    assert picture.convert("RGB").getextrema() == ((0, 0), (0, 0), (0, 0))  # blanked
    assert json.loads(picture.text["muselab"])["flagged"] is True
    free = run_cli(["image", "x", *common, "--no-safety-checker", "--json", "-o", str(tmp_path / "free.png")], cli_env)
    assert free.returncode == 0, free.stderr
    assert json.loads(free.stdout)["files"][0]["flagged"] is False
    assert Image.open(tmp_path / "free.png").convert("RGB").getextrema() != ((0, 0), (0, 0), (0, 0))


# ---------------------------------------------------------------- crash recovery

WRITER = """
import sys, time
from pathlib import Path
from muselab.media import write_new_file
from muselab.store import HistoryStore

store = HistoryStore(Path(sys.argv[1]) / "history.sqlite3", Path(sys.argv[1]) / "outputs")
store.add_job("c" * 32, "image", {"prompt": "x"}, "cli")
store.mark_running("c" * 32, "m", "cpu", "float32")

def slow(handle):
    handle.write(b"half a picture")
    handle.flush()
    print("writing", flush=True)
    time.sleep(600)

write_new_file(Path(sys.argv[1]) / "outputs" / "x.png", slow)
"""


def test_after_kill_9_mid_write_the_part_file_goes_but_a_live_process_keeps_its_own(tmp_path):
    writer = subprocess.Popen(
        [sys.executable, "-c", WRITER, str(tmp_path)], stdout=subprocess.PIPE, text=True, env=dict(os.environ)
    )
    try:
        assert writer.stdout is not None and writer.stdout.readline().strip() == "writing"
        parts = list((tmp_path / "outputs").glob(".*.part"))
        assert len(parts) == 1
        store = HistoryStore(tmp_path / "history.sqlite3", tmp_path / "outputs")
        assert store.recover_interrupted() == []  # its owner is alive: its job and file are left alone
        assert parts[0].exists() and store.get_job("c" * 32)["status"] == "running"
        writer.send_signal(signal.SIGKILL)
        writer.wait(10)
        assert store.recover_interrupted() == ["c" * 32]
        assert not parts[0].exists() and not (tmp_path / "outputs" / "x.png").exists()
        assert store.get_job("c" * 32)["status"] == "interrupted"
    finally:
        writer.kill()


# ---------------------------------------------------------------- the studio's own rules


def test_the_studio_refuses_a_non_loopback_address_without_its_setting(cli_env):
    env = {k: v for k, v in cli_env.items() if k != "MUSELAB_ALLOW_REMOTE_UI"}
    result = run_cli(["ui", "--host", "0.0.0.0", "--port", "9"], env, timeout=60)
    assert result.returncode == 2 and "Refusing to serve the studio on 0.0.0.0" in result.stderr


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_the_studio_runs_with_xsrf_protection(cli_env, tmp_path):
    """An upload without Streamlit's XSRF cookie and token is refused (403): a page on another
    site cannot post files into a studio on this machine."""
    import httpx

    port = free_port()
    studio = subprocess.Popen(
        [sys.executable, "-m", "muselab", "ui", "--preset", "tiny", "--port", str(port)],
        env=cli_env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            try:
                if httpx.get(url + "/_stcore/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.3)
        else:
            raise AssertionError("the studio did not start")
        upload = httpx.put(
            url + "/_stcore/upload_file/session/file",
            files={"file": ("x.png", b"\x89PNG", "image/png")},
            headers={"origin": "http://evil.example"},
            timeout=10,
        )
        assert upload.status_code == 403, upload.status_code
    finally:
        studio.terminate()
        studio.wait(20)
