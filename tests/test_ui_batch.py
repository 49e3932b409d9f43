"""The studio's Batch and Compare pages, headless (AppTest), on the tiny models: a prompt list runs
to its outputs, variants make a job each, a bad line is explained and nothing typed is lost, Cancel
stops a batch, and comparison grids show their picture, cells and labelled players."""

from __future__ import annotations

import pytest
from streamlit.testing.v1 import AppTest

from apptest import open_page, run_until, store, studio_data

#: Small and quick on the tiny models.
FAST = "--steps 1 --width 64 --height 64"


@pytest.fixture(scope="module")
def ui_env(tiny_dir, tmp_path_factory):
    yield from studio_data(tiny_dir, tmp_path_factory, "ui-batch-data")


def pictures(at: AppTest) -> list:
    return list(at.get("imgs") or at.get("image"))


def ended(at: AppTest) -> bool:
    """The batch is over: its outcome is shown and its Cancel is gone."""
    return bool(at.success or at.warning) and not any(button.key.endswith(".cancel") for button in at.button)


def captions(at: AppTest) -> str:
    return " ".join(caption.value for caption in at.caption)


def run_list(text: str, dynamic: str | None = None) -> AppTest:
    at = open_page("batch")
    at.text_area(key="batch.text").input(text)
    if dynamic is not None:
        at.segmented_control(key="batch.dynamic").set_value(dynamic)
    at.button(key="batch.run").click().run()
    assert not at.exception, at.exception
    return at


def test_a_prompt_list_runs_to_its_outputs_with_each_lines_options(ui_env):
    seeded = "a blue whale --seed 5 --steps 2 --width 64 --height 64"
    at = run_list(f"a red fox {FAST}\n{seeded}\n# a comment\na barn {FAST}")
    assert not at.error
    run_until(at, ended)
    assert "All 3 done" in at.success[0].value
    texts = [text.value for text in at.text]
    assert {"a red fox", "a blue whale", "a barn"} <= set(texts)
    assert len(pictures(at)) == 3  # a thumbnail on each item
    assert [button.label for button in at.get("download_button")] == ["PNG"] * 3
    assert captions(at).count("· done") == 3
    batch_id = at.session_state["batch.current"]
    records = store(ui_env).list_outputs(batch_id=batch_id, limit=10)
    assert len(records) == 3
    [whale] = [record for record in records if record.prompt == "a blue whale"]
    assert (whale.recipe["request"]["seed"], whale.recipe["request"]["steps"]) == (5, 2)
    # The batch is listed among the recent ones, and opens again from there.
    at = open_page("batch")
    at.button(key=f"batch.show.{batch_id}").click().run()
    assert not at.exception, at.exception
    assert len(pictures(at)) == 3 and "All 3 done" in at.success[0].value


def test_every_combination_makes_a_job_of_each_variant(ui_env):
    at = run_list(f"a {{red|green}} fox {FAST}", dynamic="combinatorial")
    run_until(at, ended)
    from muselab.ui.common import backend

    status = backend().batch(at.session_state["batch.current"])
    assert status["status"] == "succeeded" and status["total"] == 2
    assert sorted(item["prompt"] for item in status["items"]) == ["a green fox", "a red fox"]
    assert {"a red fox", "a green fox"} <= {text.value for text in at.text}


def test_a_bad_line_is_explained_by_its_number_and_the_list_is_kept(ui_env):
    typed = f"a red fox {FAST}\na blue whale --stepz 2\na barn"
    jobs = len(store(ui_env).list_jobs(limit=1000))
    at = run_list(typed)
    message = at.error[0].value.replace("\\", "")
    assert message.startswith("Line 2:") and "--stepz: not an option of image requests" in message
    assert at.text_area(key="batch.text").value == typed
    assert "batch.current" not in at.session_state
    assert len(store(ui_env).list_jobs(limit=1000)) == jobs


def test_an_uploaded_list_fills_the_box_and_a_bad_file_is_refused(ui_env):
    at = open_page("batch")
    at.text_area(key="batch.text").input("kept as typed").run()
    at.file_uploader(key="batch.upload").upload("list.txt", "\xff\xfe not text".encode("latin-1"), "text/plain").run()
    assert "list.txt is not UTF-8 text" in at.error[0].value
    assert at.text_area(key="batch.text").value == "kept as typed"
    at.file_uploader(key="batch.upload").upload("big.txt", b"a fox\n" * (400 * 1024), "text/plain").run()
    assert "at most 2 MB" in at.error[0].value and at.text_area(key="batch.text").value == "kept as typed"
    lines = '{"prompt": "a lantern", "steps": 1}\n{"kind": "music", "prompt": "a hum", "duration": 1}\n'
    at.file_uploader(key="batch.upload").upload("list.jsonl", lines.encode(), "application/jsonl").run()
    assert not at.error and at.text_area(key="batch.text").value == lines


def test_cancel_stops_the_batch(ui_env):
    at = run_list("\n".join(f"long {number} --steps 150 --images 8 --width 64 --height 64" for number in range(3)))
    run_until(at, lambda page: "Item 1: " in " ".join(bar.proto.text for bar in page.get("progress")))
    bars = [bar.proto.text for bar in at.get("progress")]
    assert bars[0].startswith("0 of 3 done")
    at.button(key="batch.cancel").click().run()
    run_until(at, ended)
    assert at.warning[0].value.startswith("Cancelled: 0 of 3 done")
    from muselab.ui.common import backend

    status = backend().batch(at.session_state["batch.current"])
    assert status["status"] == "cancelled" and status["counts"]["succeeded"] == 0
    assert status["counts"]["cancelled"] == 1 and status["counts"]["pending"] == 2  # the rest never started


def make_grid(kind: str, prompt: str, x: str, y: str | None = None) -> AppTest:
    at = open_page("compare")
    at.segmented_control(key="compare.kind").set_value(kind).run()
    at.text_area(key="compare.prompt").input(prompt)
    if kind == "image":
        at.selectbox(key="compare.image.size").set_value("Tiny 64 (test models)")
    at.text_input(key=f"compare.{kind}.x").input(x)
    if y is not None:
        at.text_input(key=f"compare.{kind}.y").input(y)
    at.button(key="compare.make").click().run()
    assert not at.exception, at.exception
    return at


def test_an_image_grid_shows_its_labelled_picture_and_every_cell(ui_env):
    at = make_grid("image", "a lighthouse", "steps=1,2,3", "guidance=1,7")
    assert not at.error
    run_until(at, ended, timeout=180)
    assert "All 6 done" in at.success[0].value
    assert len(pictures(at)) == 1 + 6  # the grid, then each cell
    assert [button.label for button in at.get("download_button")] == ["Grid PNG"] + ["PNG"] * 6
    headers = [markdown.value for markdown in at.markdown]
    for label in ("steps: 1", "steps: 2", "steps: 3", "guidance: 1", "guidance: 7"):
        assert f"**{label}**" in headers
    assert "steps: 3 · guidance: 7" in captions(at)  # the last cell: row 2, column 3
    batch_id = at.session_state["compare.current"]
    from muselab.ui.common import backend

    status = backend().batch(batch_id)
    last = status["items"][5]["outputs"][0]["recipe"]["request"]
    assert (last["steps"], last["guidance"], last["width"]) == (3, 7, 64)
    from PIL import Image

    grid = store(ui_env).get_output(status["grid"]["output"]["id"])
    assert Image.open(grid.path).size[0] > 3 * 64  # three cells wide, and the row labels


def test_a_music_grid_is_a_row_of_labelled_players(ui_env):
    at = make_grid("music", "a slow waltz", "duration=1,2")
    run_until(at, ended)
    assert "All 2 done" in at.success[0].value
    assert len(at.get("audio")) == 2
    assert {"**duration: 1**", "**duration: 2**"} <= {markdown.value for markdown in at.markdown}
    assert "duration: 1" in captions(at) and "duration: 2" in captions(at)
    assert [button.label for button in at.get("download_button")] == ["WAV", "WAV"]


def test_a_bad_axis_is_explained_naming_it_and_the_input_is_kept(ui_env):
    at = make_grid("image", "a lighthouse", "stepz=1,2")
    assert "x: 'stepz' is not a field of image requests" in at.error[0].value.replace("\\", "")
    assert at.text_input(key="compare.image.x").value == "stepz=1,2"
    assert at.text_area(key="compare.prompt").value == "a lighthouse"
    at.text_input(key="compare.image.x").input("steps=1,2")
    at.text_input(key="compare.image.y").input("guidance=high")
    at.button(key="compare.make").click().run()
    message = at.error[0].value.replace("\\", "")
    assert "guidance:" in message and "y='high'" in message
    assert "compare.current" not in at.session_state
