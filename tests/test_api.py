"""The HTTP API on the tiny models: every endpoint, the compatibility routes, and the safety rules."""

from __future__ import annotations

import base64
import io
import json
import time
from pathlib import Path

import pytest
import soundfile as sf
from fastapi.testclient import TestClient
from PIL import Image

from conftest import sse_events
from muselab.api import create_app
from muselab.config import Settings
from muselab.jobs import JobService
from muselab.media import parse_a1111_parameters

LOCAL = "http://127.0.0.1:7860"


def make_client(tiny_dir: Path, tmp_path: Path, **overrides) -> TestClient:
    settings = Settings(
        data_dir=tmp_path / "data",
        output_dir=tmp_path / "outputs",
        preset="tiny",
        offline=True,
        **overrides,
    )
    # The tiny models are built once per session; point this data dir at them.
    (tmp_path / "data").mkdir(exist_ok=True)
    link = tmp_path / "data" / "tiny-models"
    if not link.exists():
        link.symlink_to(tiny_dir / "tiny-models")
    return TestClient(create_app(settings), base_url=LOCAL)


@pytest.fixture
def client(tiny_dir, tmp_path):
    with make_client(tiny_dir, tmp_path) as test_client:
        yield test_client


def service_of(client: TestClient) -> JobService:
    return client.app.state.service


def wait_done(client: TestClient, job_id: str, timeout: float = 120) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = client.get(f"/api/jobs/{job_id}").json()
        if status["status"] not in ("queued", "running"):
            return status
        time.sleep(0.05)
    raise AssertionError(f"job {job_id} did not finish")


def wait_running(client: TestClient, job_id: str, timeout: float = 60) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = client.get(f"/api/jobs/{job_id}").json()
        if status["status"] == "running" and status["progress"]:
            return status
        time.sleep(0.02)
    raise AssertionError("job never started")


def image_job(client: TestClient, **body) -> dict:
    response = client.post("/api/jobs/image", json={"prompt": "a red fox", "steps": 3, "seed": 1, **body})
    assert response.status_code == 202, response.text
    return response.json()


def test_healthz_and_info(client):
    assert client.get("/healthz").json()["status"] == "ok"
    info = client.get("/api/info").json()
    assert info["preset"] == "tiny" and info["models"]["image"].endswith("tiny-stable-diffusion")
    runtime = info["runtime"]
    assert runtime["device"] == "cpu" and runtime["reason"]
    assert runtime["image_engine"] in ("torch", "openvino") and runtime["music_engine"] in ("torch", "openvino")
    # The API may be exposed: it names no folder of the machine (the OpenVINO cache, say).
    assert "cached in" not in json.dumps(runtime) and "/" not in runtime["music_backend"]


def test_music_job_end_to_end(client):
    accepted = client.post("/api/jobs/music", json={"prompt": "calm piano", "duration": 2, "seed": 4})
    assert accepted.status_code == 202
    body = accepted.json()
    assert body["status_url"] == f"/api/jobs/{body['id']}" and body["queue_position"] in (0, 1)
    status = wait_done(client, body["id"])
    assert status["status"] == "succeeded" and status["request"]["seed"] == 4
    [output] = status["outputs"]
    assert "path" not in output and output["filename"].endswith(".wav")
    response = client.get(f"/api/outputs/{output['id']}/file")
    assert response.status_code == 200 and response.headers["content-type"] == "audio/wav"
    audio, rate = sf.read(io.BytesIO(response.content))
    assert rate == 32000 and len(audio) == 64000


def test_image_job_synchronous(client):
    response = client.post(
        "/api/jobs/image?wait=true", json={"prompt": "a red fox", "steps": 3, "seed": 8, "num_images": 2}
    )
    assert response.status_code == 200
    status = response.json()
    assert status["status"] == "succeeded" and [o["seed"] for o in status["outputs"]] == [8, 9]
    png = client.get(f"/api/outputs/{status['outputs'][1]['id']}/file")
    assert png.headers["content-type"] == "image/png"
    parameters = parse_a1111_parameters(Image.open(io.BytesIO(png.content)).text["parameters"])
    assert parameters["seed"] == 9 and parameters["steps"] == 3


def test_progress_as_server_sent_events(client):
    job = image_job(client, steps=16)
    events = sse_events(client, f"/api/jobs/{job['id']}/events")
    progress = [data for name, data in events if name == "progress" and data["progress"]]
    stages = [data["progress"]["stage"] for data in progress]
    # A one-time conversion (OpenVINO) may come first, in a stage of its own; then the steps.
    assert stages == sorted(stages, key=lambda stage: stage != "converting")
    steps = [data["progress"]["step"] for data in progress if data["progress"]["stage"] != "converting"]
    assert steps == sorted(steps) and steps[-1] == 16
    assert any(data.get("preview", "").startswith("data:image/png;base64,") for data in progress)
    assert events[-1][0] == "done" and events[-1][1]["status"] == "succeeded"


def test_cancel_a_running_job_leaves_no_file(client, tmp_path):
    job = image_job(client, steps=150, num_images=8)
    wait_running(client, job["id"])
    response = client.post(f"/api/jobs/{job['id']}/cancel")
    assert response.status_code == 200 and response.json()["cancelled"] is True
    status = wait_done(client, job["id"])
    assert status["status"] == "cancelled" and status["outputs"] == []
    assert not any((tmp_path / "outputs").glob("*.png"))


def test_cancel_a_queued_job_and_queue_positions(client):
    first = image_job(client, steps=150, num_images=8)
    second = image_job(client)
    assert client.get(f"/api/jobs/{second['id']}").json()["queue_position"] == 1
    assert client.post(f"/api/jobs/{second['id']}/cancel").json()["status"] == "cancelled"
    client.post(f"/api/jobs/{first['id']}/cancel")
    assert wait_done(client, first["id"])["status"] == "cancelled"
    assert client.post("/api/jobs/" + "0" * 32 + "/cancel").status_code == 404


def test_full_queue_answers_busy(tiny_dir, tmp_path):
    with make_client(tiny_dir, tmp_path, max_queue=1) as busy_client:
        first = image_job(busy_client, steps=150, num_images=8)
        refused = busy_client.post("/api/jobs/image", json={"prompt": "x"})
        assert refused.status_code == 429 and refused.headers["retry-after"] == "5"
        assert "queue is full" in refused.json()["error"]["message"]
        busy_client.post(f"/api/jobs/{first['id']}/cancel")
        wait_done(busy_client, first["id"])
        assert busy_client.post("/api/jobs/image", json={"prompt": "x", "steps": 1}).status_code == 202


def test_time_limit_stops_a_job(tiny_dir, tmp_path):
    with make_client(tiny_dir, tmp_path, job_timeout=0.5) as limited:
        job = image_job(limited, steps=150, num_images=8)
        status = wait_done(limited, job["id"])
        assert status["status"] == "failed" and "time limit of 0.5 s" in status["error"]


def test_bad_requests_get_readable_json_errors(client):
    response = client.post("/api/jobs/music", json={"prompt": "x", "duration": 450})
    assert response.status_code == 422
    message = response.json()["error"]["message"]
    assert "duration: must be a number from 1 to 300 (got 450)" in message
    response = client.post("/api/jobs/image", json={"prompt": "x", "width": 100, "foo": 1})
    message = response.json()["error"]["message"]
    assert "width: must be a whole number from 64 to 2048 and a multiple of 8" in message
    assert "foo: unknown setting" in message
    assert (
        client.post("/api/jobs/image", content="{not json", headers={"content-type": "application/json"}).status_code
        == 422
    )
    refused = client.get("/api/jobs/nope")
    assert refused.status_code == 422 and "job_id: must be an id the API gave" in refused.json()["error"]["message"]
    assert client.get("/api/jobs/" + "0" * 32).status_code == 404


def test_history_feedback_paging_filters_delete_and_export(client, tmp_path):
    for prompt in ("a red fox", "a blue boat", "a red boat"):
        client.post("/api/jobs/image?wait=true", json={"prompt": prompt, "steps": 1, "seed": 1})
    client.post("/api/jobs/music?wait=true", json={"prompt": "calm piano", "duration": 1, "seed": 1})
    everything = client.get("/api/outputs").json()["outputs"]
    assert [o["prompt"] for o in everything] == ["calm piano", "a red boat", "a blue boat", "a red fox"]
    page = client.get("/api/outputs?limit=2&offset=1").json()["outputs"]
    assert [o["prompt"] for o in page] == ["a red boat", "a blue boat"]
    assert [o["prompt"] for o in client.get("/api/outputs?kind=music").json()["outputs"]] == ["calm piano"]
    assert len(client.get("/api/outputs?q=red").json()["outputs"]) == 2

    boat = everything[1]["id"]
    rated = client.post(f"/api/outputs/{boat}/feedback", json={"thumb": 1, "stars": 5, "comment": "lovely"})
    assert rated.status_code == 200 and rated.json()["feedback"]["stars"] == 5
    assert [o["id"] for o in client.get("/api/outputs?min_stars=4").json()["outputs"]] == [boat]
    assert client.post(f"/api/outputs/{boat}/feedback", json={"stars": 6}).status_code == 422
    assert client.post("/api/outputs/" + "a" * 32 + "/feedback", json={"stars": 3}).status_code == 404

    exported = client.get("/api/history/export?format=jsonl").text.splitlines()
    rows = [json.loads(line) for line in exported]
    assert len(rows) == 4 and next(r for r in rows if r["id"] == boat)["comment"] == "lovely"
    csv_text = client.get("/api/history/export?format=csv").text
    assert csv_text.startswith('"id","job_id","kind","filename","prompt"') and '"lovely"' in csv_text

    victim = everything[0]
    file_path = tmp_path / "outputs" / victim["filename"]
    assert file_path.exists()
    deleted = client.delete(f"/api/outputs/{victim['id']}").json()
    message = f"Deleted {victim['filename']}."
    assert deleted == {"id": victim["id"], "deleted": True, "file_deleted": True, "message": message}
    assert not file_path.exists()
    assert client.get(f"/api/outputs/{victim['id']}").status_code == 404
    assert client.delete(f"/api/outputs/{victim['id']}").status_code == 404
    assert len(client.get("/api/jobs").json()["recent"]) == 4


def test_a1111_txt2img_decoded_like_webuiapi(client):
    body = {
        "prompt": "a castle on a hill",
        "negative_prompt": "blurry",
        "seed": 5,
        "steps": 3,
        "cfg_scale": 6,
        "width": 64,
        "height": 64,
        "sampler_name": "Euler a",
        "batch_size": 2,
        "restore_faces": False,
        "styles": [],
        "override_settings": {},
        "alwayson_scripts": {},
    }
    response = client.post("/sdapi/v1/txt2img", json=body)
    assert response.status_code == 200, response.text
    result = response.json()
    images = [Image.open(io.BytesIO(base64.b64decode(item.split(",", 1)[0]))) for item in result["images"]]
    assert [image.size for image in images] == [(64, 64), (64, 64)]
    info = json.loads(result["info"])
    assert info["all_seeds"] == [5, 6] and info["seed"] == 5 and info["steps"] == 3
    assert info["infotexts"][1].startswith("a castle on a hill\nNegative prompt: blurry\nSteps: 3, Sampler: Euler a")
    assert parse_a1111_parameters(images[1].text["parameters"])["seed"] == 6
    assert result["parameters"]["prompt"] == "a castle on a hill"
    bad = client.post("/sdapi/v1/txt2img", json={"prompt": "x", "sampler_name": "Heun"})
    assert bad.status_code == 422 and "Heun" in bad.json()["error"]["message"]
    samplers = [s["name"] for s in client.get("/sdapi/v1/samplers").json()]
    assert "DPM++ 2M Karras" in samplers
    assert client.get("/sdapi/v1/sd-models").json()[0]["title"].endswith("tiny-stable-diffusion")


def test_a1111_progress_and_interrupt(client):
    job = image_job(client, steps=150, num_images=8)
    wait_running(client, job["id"])
    progress = client.get("/sdapi/v1/progress").json()
    assert 0 < progress["progress"] <= 1 and progress["state"]["sampling_steps"] == 1200
    assert client.post("/sdapi/v1/interrupt", json={}).json()["interrupted"] == [job["id"]]
    assert wait_done(client, job["id"])["status"] == "cancelled"


def test_openai_images_generations(client):
    response = client.post("/v1/images/generations", json={"prompt": "a lighthouse", "n": 2, "size": "64x64"})
    assert response.status_code == 200, response.text
    data = response.json()
    assert isinstance(data["created"], int) and len(data["data"]) == 2
    picture = Image.open(io.BytesIO(base64.b64decode(data["data"][0]["b64_json"])))
    assert picture.size == (64, 64) and data["data"][0]["revised_prompt"] == "a lighthouse"
    by_url = client.post(
        "/v1/images/generations", json={"prompt": "a lighthouse", "size": "64x64", "response_format": "url"}
    ).json()
    url = by_url["data"][0]["url"]
    assert url.startswith(LOCAL + "/api/outputs/")
    assert client.get(url.removeprefix(LOCAL)).headers["content-type"] == "image/png"
    error = client.post("/v1/images/generations", json={"prompt": "x", "size": "100x100"}).json()
    assert "width: must be a whole number" in error["error"]["message"] and error["error"]["type"]


# ---------------------------------------------------------------- safe by default


def test_foreign_host_is_refused_and_starts_no_job(client):
    response = client.post("/api/jobs/image", json={"prompt": "x"}, headers={"host": "evil.example:7860"})
    assert response.status_code == 421
    assert client.get("/healthz", headers={"host": "attacker.test"}).status_code == 421
    assert client.get("/api/jobs").json()["recent"] == []
    assert client.get("/healthz", headers={"host": "localhost:7860"}).status_code == 200
    assert client.get("/healthz", headers={"host": "[::1]:7860"}).status_code == 200


@pytest.mark.parametrize(
    ("content_type", "body"),
    [
        ("text/plain", '{"prompt": "x"}'),
        ("application/x-www-form-urlencoded", "prompt=x"),
        ("multipart/form-data; boundary=b", "--b--"),
    ],
)
def test_cross_site_posts_are_refused_and_start_no_job(client, content_type, body):
    foreign = {"origin": "https://evil.example", "content-type": content_type}
    assert client.post("/api/jobs/image", content=body, headers=foreign).status_code == 403
    no_origin = {"content-type": content_type}
    assert client.post("/api/jobs/image", content=body, headers=no_origin).status_code == 415
    json_foreign = {"origin": "https://evil.example", "content-type": "application/json"}
    assert client.post("/api/jobs/image", json={"prompt": "x"}, headers=json_foreign).status_code == 403
    assert client.get("/api/jobs").json()["recent"] == []


def test_the_file_routes_take_multipart_only_and_never_from_another_site(client):
    """Multipart is a form a web page can post anywhere without a preflight: the file routes take
    it, but not from another site's page (its Origin, or the browser's Sec-Fetch-Site)."""
    request = {"request": '{"prompt": "x", "duration": 1}'}
    files = {"audio_prompt": ("a.wav", b"RIFF", "audio/wav")}
    cross = client.post("/api/jobs/music/files", data=request, files=files, headers={"sec-fetch-site": "cross-site"})
    assert cross.status_code == 403
    foreign = client.post(
        "/api/jobs/music/files", data=request, files=files, headers={"origin": "https://evil.example"}
    )
    assert foreign.status_code == 403
    assert client.post("/api/jobs/music/files", json={"prompt": "x"}).status_code == 415
    assert client.get("/api/jobs").json()["recent"] == []
    same = client.post("/api/jobs/music/files", data=request, files=files, headers={"sec-fetch-site": "same-origin"})
    assert same.status_code == 422 and "audio_prompt:" in same.text  # past the guard, to the clip's check


def test_same_origin_page_may_post(client):
    response = client.post("/api/jobs/image", json={"prompt": "x", "steps": 1}, headers={"origin": LOCAL})
    assert response.status_code == 202


def test_token_is_required_when_configured(tiny_dir, tmp_path):
    with make_client(tiny_dir, tmp_path, api_token="s3cret") as guarded:
        assert guarded.get("/healthz").status_code == 200
        refused = guarded.get("/api/outputs")
        assert refused.status_code == 401 and "Authorization: Bearer" in refused.json()["error"]["message"]
        assert guarded.get("/api/outputs", headers={"authorization": "Bearer wrong"}).status_code == 401
        assert guarded.get("/api/outputs", headers={"authorization": "Bearer s3cret"}).status_code == 200


def test_oversized_bodies_are_refused(client, tiny_dir, tmp_path):
    response = client.post("/api/jobs/scene", content=b"x" * 70_000, headers={"content-type": "application/json"})
    assert response.status_code == 413
    response = client.post("/api/jobs/music", json={"prompt": "p" * 2001})
    assert response.status_code == 422 and "at most 2000 characters" in response.json()["error"]["message"]
    # The routes that take a picture or a clip have a limit of their own (MUSELAB_MAX_UPLOAD_BODY_BYTES).
    with make_client(tiny_dir, tmp_path, max_upload_body_bytes=100_000) as small:
        headers = {"content-type": "application/json"}
        assert small.post("/api/jobs/image", content=b"x" * 150_000, headers=headers).status_code == 413
        assert small.post("/sdapi/v1/img2img", content=b"x" * 150_000, headers=headers).status_code == 413
        assert small.post("/api/jobs/music", content=b"x" * 150_000, headers=headers).status_code == 413
        assert small.post("/api/jobs/image", content=b"x" * 70_000, headers=headers).status_code == 422


@pytest.mark.parametrize(
    "attempt",
    [
        "../../../etc/passwd",
        "..%2F..%2F..%2Fetc%2Fpasswd",
        "%2e%2e%2f%2e%2e%2fetc%2fpasswd",
        "/etc/passwd",
        "%2Fetc%2Fpasswd",
        "..",
        "....//....//etc/passwd",
        "0" * 31 + "/",
    ],
)
def test_path_traversal_on_file_routes_reads_nothing(client, attempt):
    for route in (f"/api/outputs/{attempt}/file", f"/api/outputs/{attempt}"):
        response = client.get(route)
        assert response.status_code in (404, 422), route
        assert "root:" not in response.text
    assert client.delete(f"/api/outputs/{attempt}").status_code in (404, 405, 422)


def test_a_symlinked_output_outside_the_folder_is_not_served(client, tmp_path):
    status = client.post("/api/jobs/image?wait=true", json={"prompt": "x", "steps": 1, "seed": 1}).json()
    output = status["outputs"][0]
    secret = tmp_path / "secret.txt"
    secret.write_text("do not serve")
    path = tmp_path / "outputs" / output["filename"]
    path.unlink()
    path.symlink_to(secret)
    response = client.get(f"/api/outputs/{output['id']}/file")
    assert response.status_code == 404 and "do not serve" not in response.text


def test_errors_never_leak_paths_or_tracebacks(client, tmp_path):
    texts = [
        client.get("/api/outputs/" + "f" * 32 + "/file").text,
        client.post("/api/jobs/music", json={"prompt": "x", "duration": "long"}).text,
        client.get("/api/jobs/" + "1" * 32).text,
    ]
    for text in texts:
        assert "Traceback" not in text and str(tmp_path) not in text and json.loads(text)["error"]["message"]


def test_a_missing_model_fails_the_job_clearly_and_the_service_goes_on(tiny_dir, tmp_path):
    with make_client(tiny_dir, tmp_path, allow_any_model=True) as open_client:
        job = image_job(open_client, model="someone/not-downloaded")
        status = wait_done(open_client, job["id"])
        assert status["status"] == "failed" and status["error_kind"] == "model_unavailable"
        assert "muselab models download someone/not-downloaded" in status["error"]
        assert wait_done(open_client, image_job(open_client)["id"])["status"] == "succeeded"


def test_scene_job_makes_png_wav_and_mp4(client):
    response = client.post(
        "/api/jobs/scene?wait=true", json={"prompt": "a quiet harbour", "music_prompt": "calm piano", "duration": 2}
    )
    assert response.status_code == 200, response.text
    status = response.json()
    assert [o["kind"] for o in status["outputs"]] == ["image", "music", "scene"]
    assert status["outputs"][1]["prompt"] == "calm piano" and status["outputs"][0]["prompt"] == "a quiet harbour"
    video = client.get(f"/api/outputs/{status['outputs'][2]['id']}/file")
    assert video.headers["content-type"] == "video/mp4" and video.content[4:8] == b"ftyp"
    assert [o["kind"] for o in client.get("/api/outputs?kind=scene").json()["outputs"]] == ["scene"]


def test_cluster_shows_the_in_process_workers_their_queues_and_recent_jobs(client):
    from muselab.cli.cluster import print_status
    from muselab.cli.common import out

    done = wait_done(client, image_job(client, steps=2)["id"])
    running = image_job(client, steps=150, num_images=4, prompt="runs")
    waiting = image_job(client, steps=150, num_images=4, prompt="waits")
    wait_running(client, running["id"])
    cluster = client.get("/api/cluster").json()
    for job in (running, waiting):
        client.post(f"/api/jobs/{job['id']}/cancel")

    assert cluster["workers"] == "local"
    assert cluster["loaded"][0]["model"] == "tiny-stable-diffusion"  # a label, never a folder
    assert cluster["queues"] == [{"kind": "image", "model": "tiny-stable-diffusion", "running": 1, "waiting": 1}]
    [recent] = cluster["recent"]
    assert (recent["kind"], recent["succeeded"], recent["failed"]) == ("image", 1, 0)
    assert recent["mean_seconds"] > 0 and done["status"] == "succeeded"
    assert str(service_of(client).settings.data_dir) not in json.dumps(cluster)
    with out.capture() as shown:
        print_status(cluster)
    text = shown.get()
    assert "in the server's own process" in text and "tiny-stable-diffusion" in text and "Last ten minutes" in text
