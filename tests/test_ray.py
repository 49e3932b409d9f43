"""The Ray Serve workers (`muselab.workers.ray_serve`) on a real Ray cluster that this module
starts on 127.0.0.1 and stops, with a real `muselab serve --backend ray` in front of it."""

from __future__ import annotations

import base64
import importlib.util
import io
import os
import signal
import subprocess
import time

import httpx
import pytest
from PIL import Image

from conftest import run_cli, sse_events
from muselab.testing.ray_cluster import LOOPBACK_ONLY, LocalRayCluster
from test_server import Server, wait_status

if importlib.util.find_spec("ray") is None:
    if os.environ.get("CI"):
        raise RuntimeError("CI runs the Ray tests: `make test` installs Ray (the ray extra)")
    pytest.skip("Ray is not installed: `make test` installs it (pip install -e '.[ray]')", allow_module_level=True)


@pytest.fixture(scope="module")
def ray_cluster():
    """A Ray head on 127.0.0.1 only, stopped with all its processes at the end of the module."""
    with LocalRayCluster(cpus=8) as address:
        yield address


@pytest.fixture(scope="module")
def server(ray_cluster, tmp_path_factory, tiny_dir):
    """`muselab serve --backend ray`: one replica per model, one job at a time each, one waiting."""
    data = tmp_path_factory.mktemp("ray-server")
    started = Server(
        data,
        tiny_dir,
        ("--backend", "ray", "--ray-address", ray_cluster, "--replicas", "1", "--replica-cpus", "1"),
        MUSELAB_RAY_MAX_QUEUED="1",
        **LOOPBACK_ONLY,
    ).start(timeout=120)
    yield started
    started.stop()


def replica_pids(kind: str) -> list[int]:
    found = subprocess.run(["pgrep", "-f", f"ServeReplica:muselab-{kind}-"], capture_output=True, text=True)
    return [int(pid) for pid in found.stdout.split()]


def test_music_image_and_scene_run_on_replicas_with_progress(server):
    with httpx.Client(base_url=server.url, timeout=120) as client:
        image = client.post("/api/jobs/image", json={"prompt": "a red cat", "steps": 6, "seed": 3}).json()
        events = sse_events(client, image["events_url"])
        music = client.post("/api/jobs/music?wait=true", json={"prompt": "calm piano", "duration": 1}).json()
        scene = client.post("/api/jobs/scene?wait=true", json={"prompt": "a harbour at dawn", "duration": 1}).json()
        image = client.get(f"/api/jobs/{image['id']}").json()
        cluster = client.get("/api/cluster").json()
        history = client.get("/api/jobs?limit=50").json()["recent"]

    progress = [data["progress"] for name, data in events if name == "progress" and data.get("progress")]
    steps = [event["step"] for event in progress if event["stage"] == "generating"]
    assert steps and steps == sorted(steps) and max(steps) >= 5  # the replica's steps reach the client as they happen
    assert events[-1][1]["status"] == "succeeded"
    for job in (image, music, scene):
        assert job["status"] == "succeeded", job
        assert job["runs_on"]["node"] == "127.0.0.1" and job["runs_on"]["replica"], job  # ran on a replica
        for output in job["outputs"]:
            assert (server.outputs / output["filename"]).stat().st_size > 0  # saved by the service, here
    assert {job["id"] for job in history} >= {image["id"], music["id"], scene["id"]}
    assert sorted(o["kind"] for o in scene["outputs"]) == ["image", "music", "scene"]

    assert cluster["workers"] == "ray"
    assert cluster["nodes"][0]["node"] == "127.0.0.1" and cluster["nodes"][0]["alive"]
    deployed = {d["kind"]: d for d in cluster["deployments"]}
    assert set(deployed) == {"image", "music", "scene"}
    assert all(d["replicas"] == {"RUNNING": 1} and d["replicas_seen"] for d in deployed.values())
    assert {row["kind"] for row in cluster["recent"]} == {"image", "music", "scene"}

    shown = run_cli(["cluster", "status", "--url", server.url], server.env)
    assert shown.returncode == 0, shown.stderr
    assert "Ray Serve" in shown.stdout and "muselab-image-" in shown.stdout and "127.0.0.1" in shown.stdout


def test_a1111_txt2img_runs_on_the_cluster(server):
    body = {"prompt": "a lighthouse", "steps": 2, "width": 64, "height": 64, "batch_size": 2, "seed": 5}
    answer = httpx.post(f"{server.url}/sdapi/v1/txt2img", json=body, timeout=120)
    assert answer.status_code == 200, answer.text
    images = [Image.open(io.BytesIO(base64.b64decode(item))) for item in answer.json()["images"]]
    assert [image.size for image in images] == [(64, 64), (64, 64)]


def long_job(client: httpx.Client, prompt: str) -> httpx.Response:
    return client.post("/api/jobs/image", json={"prompt": prompt, "steps": 150, "num_images": 4, "seed": 1})


def test_cancel_reaches_the_replica_and_a_full_queue_is_busy(server):
    with httpx.Client(base_url=server.url, timeout=60) as client:
        running = long_job(client, "runs").json()
        waiting = long_job(client, "waits").json()
        refused = long_job(client, "one too many")
        assert refused.status_code == 429 and refused.headers["retry-after"]
        assert "replicas" in refused.json()["error"]["message"]
        other_kind = client.post("/api/jobs/music", json={"prompt": "not held up", "duration": 1})
        assert other_kind.status_code == 202  # each model has its own replicas and its own bound

        wait_status(client, running["id"], {"running"})
        assert client.post(f"/api/jobs/{waiting['id']}/cancel").status_code == 200
        assert client.post(f"/api/jobs/{running['id']}/cancel").status_code == 200
        cancelled = wait_status(client, running["id"], {"cancelled"}, timeout=30)
        assert wait_status(client, waiting["id"], {"cancelled"})["status"] == "cancelled"
        assert cancelled["progress"]["step"] < 600  # stopped within a step, long before its end
        # The replica is free again: the next job runs at once.
        after = client.post("/api/jobs/image?wait=true", json={"prompt": "after", "steps": 2}).json()
        assert after["status"] == "succeeded"


def test_a_replica_killed_mid_job_retries_once_then_fails_clearly(server):
    with httpx.Client(base_url=server.url, timeout=60) as client:
        before = {job["id"] for job in client.get("/api/jobs?limit=200").json()["recent"]}

        retried = long_job(client, "survives one loss").json()
        wait_status(client, retried["id"], {"running"})
        for pid in replica_pids("image"):
            os.kill(pid, signal.SIGKILL)
        done = wait_status(client, retried["id"], {"succeeded", "failed"}, timeout=180)
        assert done["status"] == "succeeded", done
        assert "stopped while running it" in done["runs_on"]["retried_after"]
        assert len(done["outputs"]) == 4

        lost = long_job(client, "loses twice").json()
        wait_status(client, lost["id"], {"running"})
        for pid in replica_pids("image"):
            os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 120
        while "retried_after" not in client.get(f"/api/jobs/{lost['id']}").json().get("runs_on", {}):
            assert time.monotonic() < deadline, "the job was not run again"
            time.sleep(0.1)
        for pid in replica_pids("image"):  # and the replica running it again
            os.kill(pid, signal.SIGKILL)
        failed = wait_status(client, lost["id"], {"failed"}, timeout=60)
        assert failed["error_kind"] == "worker_lost"
        assert "lost both times" in failed["error"] and "service keeps running" in failed["error"]

        # The service keeps serving; nothing in its history went missing; no file half-written.
        after = client.post("/api/jobs/image?wait=true", json={"prompt": "still here", "steps": 2}).json()
        assert after["status"] == "succeeded"
        now = {job["id"] for job in client.get("/api/jobs?limit=200").json()["recent"]}
        assert before | {retried["id"], lost["id"], after["id"]} <= now
    assert not [path for path in server.outputs.rglob("*") if path.name.endswith(".part")]


def test_the_studio_generates_on_the_cluster(ray_cluster, tiny_dir, tmp_path_factory, monkeypatch):
    """`muselab ui --backend ray`: the studio's own service (as `muselab ui` starts it, from an
    empty data folder) sends its jobs to the cluster and keeps their history and files."""
    from apptest import open_page, run_until, store, studio_data
    from muselab.ui.common import backend

    monkeypatch.setenv("MUSELAB_WORKERS", "ray")
    monkeypatch.setenv("MUSELAB_RAY_ADDRESS", ray_cluster)
    studio = studio_data(tiny_dir, tmp_path_factory, "ray-studio")
    data = next(studio)
    try:
        home = open_page("home")
        assert "Running on a Ray cluster: 1 replica(s) per model" in " ".join(c.value for c in home.caption)
        at = open_page("music")
        at.text_area(key="music.prompt").input("calm piano on the cluster")
        at.slider(key="music.duration").set_value(1)
        at.button(key="music.generate").click().run()
        run_until(at, lambda page: page.get("audio"))
        job_id = at.session_state["music.job"]
        status = backend().service.status(job_id)
        assert status["runs_on"]["node"] == "127.0.0.1" and status["runs_on"]["replica"]
        [record] = store(data).list_outputs(job_id=job_id)
        assert record.path.is_file() and record.path.parent == data / "outputs"
        assert backend().service.cluster()["workers"] == "ray"
    finally:
        next(studio, None)
