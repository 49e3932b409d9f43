"""Job-done webhooks against a receiver on 127.0.0.1 inside the test: signed deliveries, one per
job (and one per batch), bounded retries, and the allow-list that keeps a server from reaching
other machines (no redirects followed, no allow-list no webhooks)."""

from __future__ import annotations

import hashlib
import hmac
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from fastapi.testclient import TestClient

from muselab.api import create_app
from muselab.config import Settings

SECRET = "correct horse battery staple"


class Receiver:
    """An HTTP server on 127.0.0.1 that records each POST and answers with `answers` in turn."""

    def __init__(self, *answers: int, location: str | None = None):
        self.answers, self.location = list(answers) or [200], location
        self.deliveries: list[dict] = []
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers["Content-Length"]))
                receiver.deliveries.append({"headers": dict(self.headers), "body": body})
                code = receiver.answers[min(len(receiver.deliveries), len(receiver.answers)) - 1]
                self.send_response(code)
                if receiver.location:
                    self.send_header("Location", receiver.location)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.host = f"127.0.0.1:{self.server.server_address[1]}"
        self.url = f"http://{self.host}/hook"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def wait_for(self, count: int, timeout: float = 60) -> list[dict]:
        deadline = time.monotonic() + timeout
        while len(self.deliveries) < count and time.monotonic() < deadline:
            time.sleep(0.02)
        return self.deliveries

    def close(self):
        self.server.shutdown()


@pytest.fixture
def receiver():
    started = Receiver()
    yield started
    started.close()


def client_for(tmp_path, tiny_dir, **settings) -> TestClient:
    data = tmp_path / "data"
    data.mkdir(exist_ok=True)
    if not (data / "tiny-models").exists():
        (data / "tiny-models").symlink_to(tiny_dir / "tiny-models")
    options = {"webhook_secret": SECRET, "webhook_backoff": 0.05, "webhook_retries": 2, **settings}
    return TestClient(
        create_app(Settings(data_dir=data, preset="tiny", offline=True, **options)), base_url="http://127.0.0.1:7860"
    )


def signed_by_secret(delivery: dict) -> bool:
    expected = "sha256=" + hmac.new(SECRET.encode(), delivery["body"], hashlib.sha256).hexdigest()
    return delivery["headers"].get("X-Muselab-Signature") == expected


def test_one_signed_delivery_per_job_and_one_for_the_batch(tmp_path, tiny_dir, receiver):
    with client_for(tmp_path, tiny_dir, webhook_hosts=[receiver.host]) as client:
        job = client.post(f"/api/jobs/image?callback_url={receiver.url}", json={"prompt": "a fox", "steps": 1})
        assert job.status_code == 202, job.text
        batch = client.post(
            "/api/batches",
            json={"text": "a cat --steps 1\na dog --steps 1", "callback_url": receiver.url},
        )
        assert batch.status_code == 202, batch.text
        deliveries = receiver.wait_for(4)
        time.sleep(0.3)  # nothing more comes
        assert len(receiver.deliveries) == 4
        assert all(signed_by_secret(delivery) for delivery in deliveries)
        bodies = [json.loads(delivery["body"]) for delivery in deliveries]
        events = [delivery["headers"]["X-Muselab-Event"] for delivery in deliveries]
        assert sorted(events) == ["batch", "job", "job", "job"]
        job_ids = [body["id"] for body, event in zip(bodies, events, strict=True) if event == "job"]
        assert len(set(job_ids)) == 3, "one delivery per job"
        assert all(body["status"] == "succeeded" for body in bodies)
        batch_body = next(body for body, event in zip(bodies, events, strict=True) if event == "batch")
        assert batch_body["id"] == batch.json()["id"] and batch_body["done"] == 2
        # The delivery is in the history, with the job.
        recorded = client.get(f"/api/jobs/{job.json()['id']}").json()["deliveries"]
        assert [(d["status"], d["attempts"], d["response_code"]) for d in recorded] == [("delivered", 1, 200)]
        # A body changed on the way would not pass the receiver's check.
        tampered = {**deliveries[0], "body": deliveries[0]["body"].replace(b"succeeded", b"failed")}
        assert not signed_by_secret(tampered)


def test_retries_stop_at_the_bound_when_the_receiver_answers_500(tmp_path, tiny_dir):
    failing = Receiver(500)
    try:
        with client_for(tmp_path, tiny_dir, webhook_hosts=[failing.host], webhook_retries=2) as client:
            job = client.post(f"/api/jobs/image?callback_url={failing.url}", json={"prompt": "a fox", "steps": 1})
            failing.wait_for(3)
            time.sleep(1.0)  # backoff 0.05, 0.1: a fourth try would have come by now
            assert len(failing.deliveries) == 3, "the first try and two retries"
            assert [d["headers"]["X-Muselab-Attempt"] for d in failing.deliveries] == ["1", "2", "3"]
            assert len({d["headers"]["X-Muselab-Delivery"] for d in failing.deliveries}) == 1
            recorded = client.get(f"/api/jobs/{job.json()['id']}").json()["deliveries"]
            assert [(d["status"], d["attempts"], d["response_code"]) for d in recorded] == [("failed", 3, 500)]
    finally:
        failing.close()


def test_a_callback_off_the_allow_list_is_refused_at_submission(tmp_path, tiny_dir, receiver):
    with client_for(tmp_path, tiny_dir, webhook_hosts=["hooks.example.org"]) as client:
        refused = client.post(f"/api/jobs/image?callback_url={receiver.url}", json={"prompt": "a fox", "steps": 1})
        assert refused.status_code == 422
        message = refused.json()["error"]["message"]
        assert "callback_url" in message and "allow-list" in message and receiver.host in message
        batch = client.post("/api/batches", json={"text": "a cat", "callback_url": "http://169.254.169.254/latest"})
        assert batch.status_code == 422 and "callback_url" in batch.json()["error"]["message"]
        userinfo = client.post(
            "/api/jobs/image?callback_url=http://user:pw@hooks.example.org/x", json={"prompt": "a fox", "steps": 1}
        )
        assert userinfo.status_code == 422
        assert client.get("/api/jobs").json()["recent"] == [], "nothing was queued or recorded"
    assert receiver.deliveries == []
    with client_for(tmp_path, tiny_dir) as client:  # no allow-list: no webhooks at all
        refused = client.post(f"/api/jobs/image?callback_url={receiver.url}", json={"prompt": "a fox", "steps": 1})
        assert refused.status_code == 422 and "MUSELAB_WEBHOOK_HOSTS" in refused.json()["error"]["message"]


def test_a_redirect_to_another_host_is_not_followed(tmp_path, tiny_dir):
    inside = Receiver()  # stands for a machine the server can reach and the client cannot
    redirecting = Receiver(302, location=inside.url)
    try:
        with client_for(tmp_path, tiny_dir, webhook_hosts=[redirecting.host], webhook_retries=0) as client:
            job = client.post(f"/api/jobs/image?callback_url={redirecting.url}", json={"prompt": "a fox", "steps": 1})
            redirecting.wait_for(1)
            time.sleep(0.5)
            recorded = client.get(f"/api/jobs/{job.json()['id']}").json()["deliveries"]
            assert [(d["status"], d["response_code"]) for d in recorded] == [("failed", 302)]
        assert inside.deliveries == []
    finally:
        inside.close()
        redirecting.close()
