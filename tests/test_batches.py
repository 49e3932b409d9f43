"""Many jobs at once on the tiny models: prompt lists with per-line options, dynamic prompts,
comparison grids (their picture and `--from`), batches over HTTP, a batch that outlives its
service (a stop, and a kill -9 of a real server), and the CLI's `batch` and `grid`."""

from __future__ import annotations

import json
import re
import sqlite3
import time
from pathlib import Path

import httpx
import pytest
from PIL import Image

from conftest import run_cli, sse_events
from muselab.batches import batches_for
from muselab.config import Settings
from muselab.jobs import JobService
from muselab.prompt_list import parse
from muselab.schemas import RequestError

TWELVE = "\n".join(
    [
        "# twelve prompts, options after each as A1111's prompts-from-file takes them",
        *(f"a lighthouse number {n} --steps {1 + n % 3} --seed {100 + n}" for n in range(9)),
        '--prompt "a fox\'s den" --negative_prompt "blurry, dark" --cfg_scale 6 --seed 7 --steps 2',
        "lo-fi beat with warm piano --kind music -d 1 --seed 3",
        '{"kind": "music", "prompt": "calm ambient pad", "duration": 1, "seed": 4}',
    ]
)


def data_folder(tmp_path: Path, tiny_dir: Path) -> Path:
    data = tmp_path / "data"
    data.mkdir(exist_ok=True)
    if not (data / "tiny-models").exists():
        (data / "tiny-models").symlink_to(tiny_dir / "tiny-models")
    return data


@pytest.fixture
def service(tmp_path, tiny_dir):
    settings = Settings(data_dir=data_folder(tmp_path, tiny_dir), preset="tiny", offline=True)
    started = JobService(settings)
    yield started
    started.shutdown(10)


def test_a_prompt_list_reads_per_line_options_and_names_a_bad_line():
    lines = [*TWELVE.splitlines()[1:10], '--prompt "a fox\'s den" --negative_prompt "blurry, dark" --cfg_scale 6']
    requests = parse("\n".join(lines) + "\nlo-fi --kind music -d 1 --seed 3")
    assert [r.steps for r in requests[:3]] == [1, 2, 3]
    assert requests[0].seed == 100 and requests[0].prompt == "a lighthouse number 0"
    assert requests[9].prompt == "a fox's den" and requests[9].negative_prompt == "blurry, dark"
    assert requests[9].guidance == 6
    assert requests[10].kind == "music" and requests[10].duration == 1
    with pytest.raises(RequestError, match=r"(?s)line 3: .*steps: must be a whole number from 1 to 150"):
        parse("a fox\n# a comment\na cat --steps 0")
    with pytest.raises(RequestError, match=r"(?s)line 1: .*--stepz: not an option of image requests.*--steps"):
        parse("a fox --stepz 3")
    # A dynamic prompt's braces are not taken for JSON Lines.
    assert parse("{red|green} fox")[0].prompt == "{red|green} fox"


def test_a_prompt_search_and_replace_axis_swaps_its_first_value_in_the_prompt():
    from muselab.grid import Axis, cell_requests
    from muselab.schemas import ImageRequest

    x = Axis.parse("Prompt S/R=fox,cat,owl", ImageRequest)
    cells, seed = cell_requests({"kind": "image", "prompt": "a red fox in snow"}, ImageRequest, x, None)
    assert [cell.prompt for cell in cells] == ["a red fox in snow", "a red cat in snow", "a red owl in snow"]
    assert {cell.seed for cell in cells} == {seed}
    assert x.label("cat") == "cat"
    with pytest.raises(RequestError, match=r"prompt_sr: the first value, 'fox', must be in the prompt"):
        cell_requests({"kind": "image", "prompt": "a dog"}, ImageRequest, x, None)


def test_twelve_lines_give_twelve_outputs_whose_recipes_carry_each_lines_options(service):
    batches = batches_for(service)
    batch_id = batches.submit(parse(TWELVE), source="cli", name="twelve")
    status = batches.wait(batch_id, 300)
    assert status["status"] == "succeeded", status
    assert status["done"] == status["total"] == 12 and status["progress"]["fraction"] == 1.0
    outputs = service.store.list_outputs(batch_id=batch_id, limit=100)
    assert len(outputs) == 12
    by_seed = {record.seed: record for record in outputs}
    for n in range(9):
        recipe = by_seed[100 + n].recipe["request"]
        assert (recipe["prompt"], recipe["steps"]) == (f"a lighthouse number {n}", 1 + n % 3)
    assert by_seed[7].recipe["request"]["negative_prompt"] == "blurry, dark"
    assert by_seed[7].recipe["request"]["guidance"] == 6
    assert by_seed[3].kind == by_seed[4].kind == "music"
    # One folder, one history group.
    folders = {record.path.parent for record in outputs}
    assert folders == {service.settings.outputs / status["folder"]}
    assert [item["status"] for item in status["items"]] == ["succeeded"] * 12
    assert all(len(item["outputs"]) == 1 for item in status["items"])


def test_combinatorial_dynamic_prompts_make_a_job_each_and_random_records_its_pick(service, tmp_path):
    batches = batches_for(service)
    batch_id = batches.submit(parse("{a|b|c} fox --steps 1 --seed 2"), source="cli", dynamic="combinatorial")
    status = batches.wait(batch_id, 120)
    assert status["total"] == 3 and status["status"] == "succeeded"
    prompts = sorted(record.recipe["request"]["prompt"] for record in service.store.list_outputs(batch_id=batch_id))
    assert prompts == ["a fox", "b fox", "c fox"]

    wildcards = service.settings.wildcards
    wildcards.mkdir(parents=True, exist_ok=True)
    (wildcards / "animal.txt").write_text("owl\nheron\n")
    job = service.submit(parse("a __animal__ in {snow|rain} --steps 1 --seed 9")[0], source="cli")
    job.done.wait(60)
    recipe = job.outputs[0].recipe["request"]["prompt"]
    assert recipe.split()[1] in ("owl", "heron") and recipe.split()[-1] in ("snow", "rain")
    again = service.submit(parse("a __animal__ in {snow|rain} --steps 1 --seed 9")[0], source="cli")
    assert again.request.prompt == recipe, "the seed picks the same variant again"
    again.done.wait(60)
    with pytest.raises(RequestError, match=r"(?s)prompt: no wildcard file for __colour__.*__animal__"):
        service.submit(parse("a __colour__ fox")[0], source="cli")
    with pytest.raises(RequestError, match=r"prompt: the template makes more than 2 prompts"):
        from muselab.prompts import expand

        expand("{a|b|c}", "combinatorial", wildcards, limit=2)


def test_a_3x2_grid_makes_six_outputs_and_a_labelled_picture_sized_for_them(service, tmp_path):
    from muselab import grid

    batches = batches_for(service)
    batch_id = batches.submit_grid(
        {"kind": "image", "prompt": "a cat", "width": 64, "height": 64}, "steps=1,2,3", "guidance=1,7", source="cli"
    )
    status = batches.wait(batch_id, 300)
    assert status["status"] == "succeeded" and status["total"] == 6
    cells = [item["outputs"][0] for item in status["items"]]
    seeds = {cell["seed"] for cell in cells}
    assert len(seeds) == 1, "every cell has the grid's one seed"
    assert [(c["recipe"]["request"]["steps"], c["recipe"]["request"]["guidance"]) for c in cells] == [
        (1, 1), (2, 1), (3, 1), (1, 7), (2, 7), (3, 7)
    ]  # fmt: skip
    record = service.store.get_output(status["grid"]["output"]["id"])
    picture = Image.open(record.path).convert("RGB")
    plan = grid.layout((64, 64), grid.Axis("steps", (1, 2, 3)), grid.Axis("guidance", (1, 7)))
    assert plan.left > 0 and plan.top > 0, "room for the labels"
    assert picture.size == (plan.left + 3 * 64, plan.top + 2 * 64)
    # Each cell's own picture sits at its place (row 2, column 3: guidance 7, steps 3).
    cell = Image.open(service.store.get_output(cells[5]["id"]).path).convert("RGB")
    x, y = plan.origin(2, 1)
    assert list(picture.crop((x, y, x + 64, y + 64)).getdata()) == list(cell.getdata())
    # The labels are drawn: the label strip is not blank.
    assert picture.crop((0, 0, plan.size[0], plan.top)).getextrema() != ((255, 255),) * 3
    # Its recipe names the grid, so the grid can be made again from the file alone.
    recipe = json.loads(Image.open(record.path).text["muselab"])
    assert recipe["grid"]["x"] == {"field": "steps", "values": ["1", "2", "3"]}
    assert recipe["grid"]["request"]["seed"] == seeds.pop()
    assert len(service.store.list_outputs(batch_id=batch_id)) == 7, "six cells and the grid, one history group"
    with pytest.raises(RequestError, match=r"x: 'stepz' is not a field of image requests"):
        batches.submit_grid({"kind": "image", "prompt": "a cat"}, "stepz=1,2")
    with pytest.raises(RequestError, match=r"(?s)steps: must be a whole number.*column 2, row 1"):
        batches.submit_grid({"kind": "image", "prompt": "a cat"}, "steps=1,many")


def test_a_batch_stopped_with_its_service_goes_on_at_the_next_start_and_nothing_runs_twice(tmp_path, tiny_dir):
    settings = Settings(data_dir=data_folder(tmp_path, tiny_dir), preset="tiny", offline=True)
    first = JobService(settings)
    batches = batches_for(first)
    lines = "\n".join(f"a boat {n} --steps 3 --seed {n}" for n in range(6))
    batch_id = batches.submit(parse(lines), source="cli")
    deadline = time.monotonic() + 120
    while batches.status(batch_id)["done"] < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    first.shutdown(10)
    stopped = batches.status(batch_id)
    assert stopped["status"] == "running" and 2 <= stopped["done"] < 6, stopped["counts"]
    done_before = {item["item"]: item["job_id"] for item in stopped["items"] if item["status"] == "succeeded"}

    second = JobService(settings)
    try:
        resumed = batches_for(second)
        assert resumed.resume() == [batch_id]
        status = resumed.wait(batch_id, 300)
    finally:
        second.shutdown(10)
    assert status["status"] == "succeeded"
    assert sorted(record.seed for record in second.store.list_outputs(batch_id=batch_id)) == list(range(6))
    for item in status["items"]:
        if item["item"] in done_before:
            assert item["job_id"] == done_before[item["item"]], "a finished item did not run again"


def test_batches_and_grids_over_http(tmp_path, tiny_dir):
    from fastapi.testclient import TestClient

    from muselab.api import create_app

    settings = Settings(data_dir=data_folder(tmp_path, tiny_dir), preset="tiny", offline=True)
    with TestClient(create_app(settings), base_url="http://127.0.0.1:7860") as client:
        bad = client.post("/api/batches", json={"text": "a fox\na cat --steps 999"})
        assert bad.status_code == 422 and "line 2" in bad.json()["error"]["message"]
        assert "steps" in bad.json()["error"]["message"]
        accepted = client.post(
            "/api/batches", json={"text": "{red|green} fox --steps 1", "dynamic": "combinatorial", "name": "foxes"}
        )
        assert accepted.status_code == 202, accepted.text
        batch_id = accepted.json()["id"]
        assert accepted.json()["total"] == 2
        events = sse_events(client, f"/api/batches/{batch_id}/events")
        done_counts = [data["done"] for name, data in events if name == "progress"]
        assert done_counts == sorted(done_counts) and events[-1][0] == "done"
        status = _wait_batch(client, batch_id)
        assert status["status"] == "succeeded" and status["name"] == "foxes"
        assert events[-1][1]["counts"] == status["counts"]
        assert sorted(item["prompt"] for item in status["items"]) == ["green fox", "red fox"]
        listed = client.get("/api/outputs", params={"batch": batch_id}).json()["outputs"]
        assert len(listed) == 2 and "path" not in listed[0]
        job = client.get(f"/api/jobs/{status['items'][0]['job_id']}").json()
        assert job["batch_id"] == batch_id

        # A long batch is cancelled as a whole: the running item stops, the rest never start.
        long = client.post("/api/batches", json={"items": [{"prompt": f"a ship {n}", "steps": 30} for n in range(5)]})
        long_id = long.json()["id"]
        deadline = time.monotonic() + 60
        while client.get(f"/api/batches/{long_id}").json()["current"] is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert client.post(f"/api/batches/{long_id}/cancel").json()["cancelled"] is True
        cancelled = _wait_batch(client, long_id)
        assert cancelled["status"] == "cancelled"
        assert cancelled["counts"]["succeeded"] < 5 and cancelled["counts"]["pending"] >= 3

        grid = client.post(
            "/api/grids",
            json={
                "request": {"kind": "music", "prompt": "a bell", "seed": 5},
                "x": {"field": "duration", "values": [1, 2]},
            },
        )
        assert grid.status_code == 202, grid.text
        made = _wait_batch(client, grid.json()["id"])
        assert made["grid"]["output"] is None, "a music grid is its clips, not a picture"
        durations = [item["outputs"][0]["recipe"]["request"]["duration"] for item in made["items"]]
        assert durations == [1.0, 2.0]
        assert client.post("/api/grids", json={"request": {"prompt": "x"}, "x": "nope=1"}).status_code == 422
        assert client.get("/api/batches").json()["batches"][0]["id"] == grid.json()["id"]
        assert client.get(f"/api/batches/{'0' * 32}").status_code == 404


def _wait_batch(client, batch_id: str, timeout: float = 180) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = client.get(f"/api/batches/{batch_id}").json()
        if status["status"] != "running":
            return status
        time.sleep(0.1)
    raise AssertionError(f"batch {batch_id} did not end")


def test_kill_9_of_a_server_halfway_through_a_batch_and_a_restart_give_exactly_twelve_outputs(tmp_path, tiny_dir):
    from test_server import Server

    data = tmp_path / "data"
    server = Server(data, tiny_dir).start()
    try:
        lines = "\n".join(f"a harbour {n} --steps 3 --seed {n}" for n in range(12))
        batch_id = httpx.post(f"{server.url}/api/batches", json={"text": lines}, timeout=30).json()["id"]
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            status = httpx.get(f"{server.url}/api/batches/{batch_id}", timeout=10).json()
            if status["done"] >= 4 and status["current"] is not None:
                break
            time.sleep(0.05)
        server.kill9()
        assert status["done"] < 12
        server.start()  # the same data folder: the batch goes on by itself
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline:
            status = httpx.get(f"{server.url}/api/batches/{batch_id}", timeout=10).json()
            if status["status"] != "running":
                break
            time.sleep(0.2)
    finally:
        server.stop()
    assert status["status"] == "succeeded", status["counts"]
    db = sqlite3.connect(data / "history.sqlite3")
    seeds = [
        row[0]
        for row in db.execute(
            "SELECT seed FROM outputs WHERE job_id IN (SELECT id FROM jobs WHERE batch_id=?)", (batch_id,)
        )
    ]
    assert sorted(seeds) == list(range(12)), "exactly twelve outputs, none twice"
    succeeded = db.execute("SELECT COUNT(*) FROM jobs WHERE batch_id=? AND status='succeeded'", (batch_id,)).fetchone()
    assert succeeded[0] == 12
    files = sorted((data / "outputs" / status["folder"]).glob("*.png"))
    assert len(files) == 12 and not list((data / "outputs").rglob(".*.part"))


@pytest.mark.slow
def test_cli_batch_and_grid_from_its_own_picture(tmp_path, cli_env):
    listing = tmp_path / "list.txt"
    listing.write_text("a red fox --steps 1 --seed 5\na blue owl --steps 1 --seed 6\n")
    result = run_cli(["batch", str(listing), "--preset", "tiny", "-o", str(tmp_path / "out") + "/"], cli_env)
    assert result.returncode == 0, result.stderr
    assert "done 1/2 'a red fox': a-red-fox-5.png" in result.stderr
    assert "2 of 2 succeeded" in result.stdout
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["a-blue-owl-6.png", "a-red-fox-5.png"]

    bad = run_cli(["batch", str(listing), "--kind", "poem"], cli_env)
    assert bad.returncode == 2 and "kind: must be one of" in bad.stderr

    made = run_cli(
        ["grid", "a cat", "--x", "steps=1,2", "--set", "width=64", "--set", "height=64", "--seed", "11",
         "--preset", "tiny", "--json"],
        cli_env,
    )  # fmt: skip
    assert made.returncode == 0, made.stderr
    first = json.loads(made.stdout)
    picture = Path(first["local_folder"]) / first["grid"]["output"]["filename"]
    again = run_cli(["grid", "--from", str(picture), "--preset", "tiny", "--json"], cli_env)
    assert again.returncode == 0, again.stderr
    second = json.loads(again.stdout)
    assert second["grid"]["x"] == first["grid"]["x"] and second["grid"]["request"]["seed"] == 11
    remade = Path(second["local_folder"]) / second["grid"]["output"]["filename"]
    assert list(Image.open(remade).getdata()) == list(Image.open(picture).getdata()), "the same grid again"


@pytest.mark.slow
def test_ctrl_c_stops_a_cli_batch_and_resume_runs_the_rest(tmp_path, cli_env):
    import signal
    import subprocess
    import sys

    listing = tmp_path / "list.txt"
    listing.write_text("".join(f"a kite {n} --steps 4 --seed {n}\n" for n in range(4)))
    process = subprocess.Popen(
        [sys.executable, "-m", "muselab", "batch", str(listing), "--preset", "tiny"],
        env=cli_env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    seen = ""
    deadline = time.monotonic() + 120
    while "done 1/4" not in seen and time.monotonic() < deadline:
        seen += process.stderr.readline()
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 130, stderr
    found = re.search(r"muselab batch --resume ([0-9a-f]{32})` runs the other (\d)", seen + stderr)
    assert found and 1 <= int(found.group(2)) <= 3, seen + stderr
    resumed = run_cli(["batch", "--resume", found.group(1), "--preset", "tiny", "--json"], cli_env)
    assert resumed.returncode == 0, resumed.stderr
    status = json.loads(resumed.stdout)
    assert status["status"] == "succeeded" and status["counts"]["succeeded"] == 4
    files = sorted(path.name for path in Path(status["local_folder"]).glob("*.png"))
    assert files == [f"a-kite-{n}-{n}.png" for n in range(4)], "each item once"


def test_a1111s_prompts_from_file_script_runs_its_lines_as_one_batch(tmp_path, tiny_dir):
    from fastapi.testclient import TestClient

    from muselab.api import create_app

    settings = Settings(data_dir=data_folder(tmp_path, tiny_dir), preset="tiny", offline=True)
    body = {
        "prompt": "watercolor",
        "steps": 1,
        "width": 64,
        "height": 64,
        "script_name": "prompts from file or textbox",
        "script_args": [False, False, "start", "a red fox --seed 11\na lighthouse --steps 2 --seed 12"],
    }
    with TestClient(create_app(settings), base_url="http://127.0.0.1:7860") as client:
        answer = client.post("/sdapi/v1/txt2img", json=body)
        assert answer.status_code == 200, answer.text
        info = json.loads(answer.json()["info"])
        assert len(answer.json()["images"]) == 2
        assert info["all_prompts"] == ["a red fox watercolor", "a lighthouse watercolor"]
        assert info["all_seeds"] == [11, 12] and "Steps: 2" in info["infotexts"][1]
        bad = client.post("/sdapi/v1/txt2img", json={**body, "script_args": ["a fox --steps 0"]})
        assert bad.status_code == 422 and "line 1" in bad.json()["error"]["message"]
        assert client.post("/sdapi/v1/txt2img", json={**body, "script_name": "x/y/z plot"}).status_code == 422
