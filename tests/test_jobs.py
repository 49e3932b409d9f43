"""The job service's own rules: one generation per engine, LRU unloading, out-of-memory recovery."""

from __future__ import annotations

import gc
import threading
import time
import weakref

import pytest
import torch

from muselab.config import Settings
from muselab.devices import Placement
from muselab.engines import Cancelled, load_engine
from muselab.engines.base import engine_result
from muselab.families import family
from muselab.jobs import JobService
from muselab.schemas import ImageRequest, MusicRequest, SceneRequest


class FakeEngine:
    """Stands in for a real engine where the test is about the service, not the model."""

    def __init__(self, kind: str, model: str, behaviour=None):
        self.kind, self.model, self.model_name = kind, model, model
        self.placement = Placement("cpu", torch.float32, "test")
        self.behaviour = behaviour
        self.running = 0
        self.most_at_once = 0
        self.lock = threading.Lock()

    def resolve(self, request):
        return request.model_copy(update={"seed": request.seed or 1})

    def steps(self, request):
        return 1

    def generate(self, request, on_progress=None, cancel=None, **options):
        with self.lock:
            self.running += 1
            self.most_at_once = max(self.most_at_once, self.running)
        try:
            if self.behaviour is not None:
                self.behaviour(request)
            time.sleep(0.05)
            if cancel is not None and cancel.cancelled:
                raise Cancelled()
            return engine_result(self, request, [])
        finally:
            with self.lock:
                self.running -= 1


@pytest.fixture
def settings(tmp_path):
    return Settings(data_dir=tmp_path, preset="tiny", offline=True, max_models=1)


def test_out_of_memory_is_a_clear_error_and_the_service_goes_on(settings):
    def exhaust(request):
        if request.prompt == "huge":
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    engines = {}

    def loader(kind, settings, model, on_progress=None):
        return engines.setdefault((kind, model), FakeEngine(kind, model, exhaust))

    service = JobService(settings, loader=loader)
    try:
        failed = service.wait(service.submit(ImageRequest(prompt="huge")).id, 10)
        assert failed["status"] == "failed" and failed["error_kind"] == "out_of_memory"
        assert "Out of memory" in failed["error"] and "smaller size" in failed["error"]
        assert service.models.loaded() == []  # memory was freed
        assert service.wait(service.submit(ImageRequest(prompt="small")).id, 10)["status"] == "succeeded"
    finally:
        service.shutdown()


def test_least_recently_used_model_is_unloaded(settings):
    service = JobService(settings, loader=lambda kind, s, model, on_progress=None: FakeEngine(kind, model))
    try:
        service.wait(service.submit(ImageRequest(prompt="a")).id, 10)
        assert [m["kind"] for m in service.models.loaded()] == ["image"]
        service.wait(service.submit(MusicRequest(prompt="b")).id, 10)
        assert [m["kind"] for m in service.models.loaded()] == ["music"]  # max_models=1
    finally:
        service.shutdown()


def test_one_model_never_runs_two_generations_at_once(settings):
    engine = FakeEngine("image", "m")
    service = JobService(settings, loader=lambda kind, s, model, on_progress=None: engine)
    try:
        jobs = [service.submit(ImageRequest(prompt=f"p{i}", model="m"), source="cli") for i in range(6)]
        assert [service.wait(job.id, 20)["status"] for job in jobs] == ["succeeded"] * 6
        assert engine.most_at_once == 1
    finally:
        service.shutdown()


def test_job_workers_treat_denormal_numbers_as_zero(settings):
    """Arithmetic on floats below 1.2e-38 takes a CPU slow path (a matmul fed them ran 200x slower);
    trained weights produce them. Every worker flushes them to zero, whatever thread it came from."""
    tiny = 1e-39
    seen = []

    def measure(request):  # in the worker: DAZ reads `tiny` as zero
        seen.append((torch.tensor([tiny]) * 1.0).item())

    service = JobService(settings, loader=lambda kind, s, model, on_progress=None: FakeEngine(kind, model, measure))
    submitted = []

    def submit_from_a_thread_that_keeps_denormals():
        torch.set_flush_denormal(False)
        assert (torch.tensor([tiny]) * 1.0).item() != 0  # so the worker it starts would too
        submitted.append(service.submit(ImageRequest(prompt="a")))

    try:
        submitter = threading.Thread(target=submit_from_a_thread_that_keeps_denormals)
        submitter.start()
        submitter.join()
        assert service.wait(submitted[0].id, 10)["status"] == "succeeded"
        assert seen == [0.0]
    finally:
        service.shutdown()


def test_real_engines_share_the_manager(tiny_dir):
    settings = Settings(data_dir=tiny_dir, preset="tiny", offline=True)
    service = JobService(settings, loader=load_engine)
    try:
        music = service.submit(MusicRequest(prompt="calm", duration=1, seed=1))
        image = service.submit(ImageRequest(prompt="fox", steps=2, seed=1))
        assert service.wait(music.id, 120)["status"] == "succeeded"
        assert service.wait(image.id, 120)["status"] == "succeeded"
        assert sorted(m["kind"] for m in service.models.loaded()) == ["image", "music"]
    finally:
        service.shutdown()


def test_a_job_whose_model_is_loading_is_first_in_line_not_lost(settings):
    """While a worker loads (or converts) the model, the job is still "queued" but out of the
    queue: its position must read 0 (being worked on), and the job behind it 1."""
    loading, release = threading.Event(), threading.Event()

    def slow_loader(kind, settings, model=None, on_progress=None):
        loading.set()
        release.wait(10)
        return FakeEngine(kind, model or "m")

    service = JobService(settings, loader=slow_loader)
    try:
        first = service.submit(MusicRequest(prompt="first", duration=1))
        assert loading.wait(10)
        second = service.submit(MusicRequest(prompt="second", duration=1))
        assert service.status(first.id)["status"] == "queued"
        assert service.status(first.id)["queue_position"] == 0
        assert service.status(second.id)["queue_position"] == 1
        release.set()
        assert service.wait(first.id, 10)["status"] == "succeeded"
        assert service.wait(second.id, 10)["status"] == "succeeded"
    finally:
        release.set()
        service.shutdown()


class WatchedLoader:
    """A loader that counts, as each load starts, how many engines it made before are still in
    memory (loaded or not, referenced from anywhere): an unloaded model must really be gone."""

    def __init__(self, make):
        self.make = make
        self.engines: list[weakref.ref] = []

    def alive(self) -> int:
        gc.collect()
        return sum(engine() is not None for engine in self.engines)

    def __call__(self, kind, settings, model=None, on_progress=None):
        engine = self.make(kind, settings, model, on_progress)
        self.engines.append(weakref.ref(engine))
        return engine


def scene_service(tiny_dir, tmp_path, wrap_music=None, **settings):
    """A job service on the tiny models that notes which models were loaded when each one loads."""
    config = Settings(data_dir=tiny_dir, preset="tiny", offline=True, output_dir=tmp_path / "out", **settings)
    loads: list[tuple[str, list[str]]] = []
    service: JobService

    def make(kind, s, model, on_progress):
        alive = watched.alive()
        loads.append((kind, [m["kind"] for m in service.models.loaded()] + ["(still in memory)"] * alive))
        engine = load_engine(kind, s, model, on_progress)
        return wrap_music(engine) if wrap_music and kind == "music" else engine

    watched = WatchedLoader(make)
    service = JobService(config, loader=watched)
    return service, loads


SCENE = SceneRequest(prompt="a quiet harbour", music_prompt="calm piano", duration=1, steps=2, seed=3)


def test_low_memory_scene_loads_its_models_one_after_the_other(tiny_dir, tmp_path):
    service, loads = scene_service(tiny_dir, tmp_path, low_memory=True)
    progress = []
    original_update = service._update

    def recording_update(job, **changes):
        if changes.get("progress") is not None:
            progress.append((changes["progress"].step, changes["progress"].total, changes["progress"].stage))
        original_update(job, **changes)

    service._update = recording_update
    try:
        status = service.wait(service.submit(SCENE).id, 180)
        assert status["status"] == "succeeded", status.get("error")
        assert [o["kind"] for o in status["outputs"]] == ["image", "music", "scene"]
        # The image model was unloaded before the music model loaded: never both in memory.
        assert loads == [("image", []), ("music", [])]
        assert [m["kind"] for m in service.models.loaded()] == ["music"]
        steps = [step for step, _, stage in progress if stage in ("image", "music")]
        assert steps == sorted(steps) and progress[-1][0] == progress[-1][1]  # the bar ends full
        # The total is guessed until the music model loads; the bar itself never moves back.
        shown = [step / total for step, total, stage in progress if stage in ("image", "music")]
        assert shown == sorted(shown)
    finally:
        service.shutdown()
    service, loads = scene_service(tiny_dir, tmp_path)
    try:
        assert service.wait(service.submit(SCENE).id, 180)["status"] == "succeeded"
        # Without --low-memory both stay loaded.
        assert loads == [("image", []), ("music", ["image", "(still in memory)"])]
    finally:
        service.shutdown()


def test_a_scene_guesses_at_least_the_decoder_steps_of_any_musicgen_before_it_loads():
    """With --low-memory the music model loads after the picture, so the scene's progress total is
    a guess until then; a guess below the real count would move the bar back (stereo's delay
    pattern takes 8 extra steps, mono's 4)."""
    from muselab.devices import choose_placement
    from muselab.engines.music.engine import MusicEngine
    from muselab.engines.music.tiny import build_musicgen_processor, tiny_musicgen_network

    for stereo in (False, True):
        network, processor = tiny_musicgen_network(stereo=stereo), build_musicgen_processor()
        engine = MusicEngine(network, processor, "tiny", choose_placement("cpu", "float32"), backend="torch")
        assert engine.num_codebooks == (8 if stereo else 4)
        for duration in (1.0, 5.0, 30.0):
            request = MusicRequest(prompt="calm", duration=duration)
            assert family("music").max_steps(request) >= engine.steps(request) >= duration * engine.frame_rate


class SoundtrackStops:
    """A music engine whose clip stops partway, as when the user cancels it."""

    def __init__(self, engine):
        self.engine = engine

    def __getattr__(self, name):
        return getattr(self.engine, name)

    def generate(self, request, on_progress=None, cancel=None, **options):
        raise Cancelled()


def test_a_scene_keeps_its_picture_when_the_soundtrack_stops(tiny_dir, tmp_path):
    service, _ = scene_service(tiny_dir, tmp_path, wrap_music=SoundtrackStops)
    try:
        status = service.wait(service.submit(SCENE).id, 180)
        assert status["status"] == "cancelled"
        assert [o["kind"] for o in status["outputs"]] == ["image"]
        assert len(list((tmp_path / "out").glob("*.png"))) == 1 and not list((tmp_path / "out").glob("*.mp4"))
    finally:
        service.shutdown()


def test_a_low_memory_scene_whose_music_model_is_missing_keeps_its_picture(tiny_dir, tmp_path):
    service, _ = scene_service(tiny_dir, tmp_path, low_memory=True)
    try:
        scene = SCENE.model_copy(update={"music_model": "someone/not-here"})
        status = service.wait(service.submit(scene, source="cli").id, 180)
        assert status["status"] == "failed" and status["error_kind"] == "model_unavailable"
        assert "someone/not-here" in status["error"]
        assert [o["kind"] for o in status["outputs"]] == ["image"]
    finally:
        service.shutdown()


def test_low_memory_runs_one_model_at_a_time_across_workers(tmp_path):
    """Image and music jobs have workers of their own; with --low-memory they take turns, and each
    model is unloaded before the other loads."""
    settings = Settings(data_dir=tmp_path, preset="tiny", offline=True, low_memory=True, max_models=2)
    running, most_running, lock = [0], [0], threading.Lock()
    alive_at_load: list[int] = []

    def busy(request):
        with lock:
            running[0] += 1
            most_running[0] = max(most_running[0], running[0])
        time.sleep(0.05)
        with lock:
            running[0] -= 1

    def make(kind, s, model, on_progress):
        alive_at_load.append(watched.alive())
        return FakeEngine(kind, model, busy)

    watched = WatchedLoader(make)
    service = JobService(settings, loader=watched)
    try:
        jobs = [
            service.submit(ImageRequest(prompt=f"p{i}") if i % 2 else MusicRequest(prompt=f"p{i}", duration=1))
            for i in range(6)
        ]
        assert [service.wait(job.id, 30)["status"] for job in jobs] == ["succeeded"] * 6
        assert most_running[0] == 1
        assert len(alive_at_load) >= 2 and set(alive_at_load) == {0}
        assert len(service.models.loaded()) == 1
    finally:
        service.shutdown()


def test_a_picture_that_cannot_be_kept_does_not_hide_why_the_scene_stopped(tiny_dir, tmp_path, monkeypatch):
    from muselab import jobs

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(jobs.media, "save_result", disk_full)
    service, _ = scene_service(tiny_dir, tmp_path, wrap_music=SoundtrackStops)
    try:
        status = service.wait(service.submit(SCENE).id, 180)
        assert status["status"] == "cancelled" and status["outputs"] == []
    finally:
        service.shutdown()


def test_a_one_time_conversion_shows_seconds_that_move_and_no_folder(settings):
    """A conversion reports a stage every minute or so: between its events the status's elapsed
    time still moves, and its text names no folder and says "one time" once."""
    from muselab.engines import ProgressEvent

    release = threading.Event()

    def loader(kind, s, model, on_progress=None):
        on_progress(ProgressEvent("converting", 0, 4, 0.0, None, note="Converting the unet to OpenVINO (one time)"))
        release.wait(10)
        return FakeEngine(kind, model)

    service = JobService(settings, loader=loader)
    try:
        job = service.submit(ImageRequest(prompt="x"))
        deadline = time.monotonic() + 10
        while service.status(job.id)["progress"] is None and time.monotonic() < deadline:
            time.sleep(0.02)
        first = service.status(job.id)["progress"]
        time.sleep(1.2)
        later = service.status(job.id)["progress"]
        assert later["elapsed"] - first["elapsed"] >= 1.0 and later["step"] == first["step"]
        assert later["note"].count("one time") == 1 and str(settings.data_dir) not in later["note"]
    finally:
        release.set()
        service.shutdown()


def test_prepare_makes_the_configured_models_ready_before_the_first_job(tmp_path):
    """The studio and the server load (and convert, once) the configured models when they start:
    their progress moves, and the first job then finds its model loaded."""
    from muselab.engines import ProgressEvent

    loads: list[str] = []
    release = threading.Event()

    def loader(kind, s, model, on_progress=None):
        loads.append(kind)
        on_progress(ProgressEvent("converting", 1, 4, 0.0, None, note=f"Converting the {kind} model (one time)"))
        release.wait(10)
        return FakeEngine(kind, model)

    service = JobService(Settings(data_dir=tmp_path, preset="tiny", offline=True, max_models=2), loader=loader)
    try:
        service.prepare()
        deadline = time.monotonic() + 10
        while service.preparation()["image"]["fraction"] == 0 and time.monotonic() < deadline:
            time.sleep(0.02)
        first = service.preparation()["image"]
        time.sleep(1.1)
        later = service.preparation()["image"]
        assert first["fraction"] == 0.25 and "Converting the image model" in first["note"]
        assert later["elapsed"] - first["elapsed"] >= 1.0  # seconds that move between stages
        release.set()
        while service.preparation()["music"]["state"] != "ready" and time.monotonic() < deadline:
            time.sleep(0.02)
        assert {state["state"] for state in service.preparation().values()} == {"ready"}
        assert service.wait(service.submit(ImageRequest(prompt="x")).id, 10)["status"] == "succeeded"
        assert loads == ["image", "music"]  # the job loaded nothing more
    finally:
        release.set()
        service.shutdown()


def test_prepare_skips_models_whose_weights_are_not_here_and_stops_with_the_service(tmp_path):
    service = JobService(Settings(data_dir=tmp_path, offline=True, image_model="someone/absent", music_model="x/y"))
    try:
        service.prepare()
        deadline = time.monotonic() + 10
        while {s["state"] for s in service.preparation().values()} != {"skipped"} and time.monotonic() < deadline:
            time.sleep(0.02)
        assert all(state["note"] == "weights not downloaded" for state in service.preparation().values())
        assert service.models.loaded() == []
    finally:
        service.shutdown()
