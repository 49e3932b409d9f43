"""The `muselab` command end to end, in real subprocesses, on the tiny models, offline."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import soundfile as sf
from PIL import Image

from conftest import run_cli
from muselab.media import parse_a1111_parameters


def test_image_twice_gives_byte_identical_pngs_with_parameters(cli_env, tmp_path):
    first = run_cli(["image", "a red fox", "--preset", "tiny", "--seed", "1", "-o", "a.png"], cli_env, tmp_path)
    assert first.returncode == 0, first.stderr
    second = run_cli(["image", "a red fox", "--preset", "tiny", "--seed", "1", "-o", "b.png"], cli_env, tmp_path)
    assert second.returncode == 0, second.stderr
    assert (tmp_path / "a.png").read_bytes() == (tmp_path / "b.png").read_bytes()
    assert "Saved" in first.stdout and "a.png" in first.stdout
    parameters = parse_a1111_parameters(Image.open(tmp_path / "a.png").text["parameters"])
    assert parameters["prompt"] == "a red fox"
    # A new user on a CPU gets the fast tier: the LCM-LoRA's 4 LCM steps without guidance.
    assert parameters["steps"] == 4 and parameters["scheduler"] == "LCM"
    assert parameters["guidance"] == 1.0 and parameters["seed"] == 1
    assert "Expected: about" in first.stderr and "(fast;" in first.stderr
    assert (parameters["width"], parameters["height"]) == (64, 64)


def test_same_name_again_does_not_overwrite(cli_env, tmp_path):
    for _ in range(2):
        done = run_cli(
            ["image", "fox", "--preset", "tiny", "--seed", "2", "--steps", "2", "-o", "a.png"],
            cli_env,
            tmp_path,
        )
        assert done.returncode == 0, done.stderr
    assert sorted(p.name for p in tmp_path.glob("*.png")) == ["a-2.png", "a.png"]


def test_music_writes_two_seconds_at_the_model_rate_and_info_reads_it(cli_env, tmp_path):
    made = run_cli(["music", "calm piano", "--preset", "tiny", "--duration", "2", "-o", "a.wav"], cli_env, tmp_path)
    assert made.returncode == 0, made.stderr
    info = sf.info(str(tmp_path / "a.wav"))
    assert info.samplerate == 32000
    assert abs(info.frames - 2 * 32000) <= 640  # within one audio frame (640 samples at 50 Hz)
    shown = run_cli(["info", "a.wav"], cli_env, tmp_path)
    assert shown.returncode == 0, shown.stderr
    assert "calm piano" in shown.stdout and "duration" in shown.stdout and "muselab music --from a.wav" in shown.stdout
    as_json = json.loads(run_cli(["info", "a.wav", "--json"], cli_env, tmp_path).stdout)
    assert as_json["recipe"]["request"]["duration"] == 2.0
    assert as_json["sample_rate"] == 32000


def test_from_file_re_runs_the_recipe_exactly(cli_env, tmp_path):
    made = run_cli(["music", "drums", "--preset", "tiny", "-d", "1", "-o", "one.flac", "--json"], cli_env, tmp_path)
    assert made.returncode == 0, made.stderr
    result = json.loads(made.stdout)
    assert result["files"][0]["path"].endswith("one.flac") and result["request"]["seed"] is not None
    again = run_cli(["music", "--from", "one.flac", "-o", "two.flac"], cli_env, tmp_path)
    assert again.returncode == 0, again.stderr
    first, _ = sf.read(tmp_path / "one.flac")
    second, _ = sf.read(tmp_path / "two.flac")
    assert (first == second).all()
    changed = run_cli(["music", "--from", "one.flac", "--seed", "5", "-o", "three.flac", "--json"], cli_env, tmp_path)
    assert json.loads(changed.stdout)["request"]["seed"] == 5


def test_output_ending_in_a_slash_is_a_folder_made_for_it(cli_env, tmp_path):
    made = run_cli(["image", "a fox", "--preset", "tiny", "--speed", "turbo", "-o", "renders/"], cli_env, tmp_path)
    assert made.returncode == 0, made.stderr
    assert [path.suffix for path in (tmp_path / "renders").iterdir()] == [".png"]
    assert not (tmp_path / "renders.png").exists()


def test_image_from_file_and_override(cli_env, tmp_path):
    run_cli(
        ["image", "a boat", "--preset", "tiny", "--seed", "3", "--steps", "3", "-o", "boat.png"],
        cli_env,
        tmp_path,
    )
    again = run_cli(["image", "--from", "boat.png", "-o", "again.png"], cli_env, tmp_path)
    assert again.returncode == 0, again.stderr
    assert (tmp_path / "boat.png").read_bytes() == (tmp_path / "again.png").read_bytes()
    wrong_kind = run_cli(["music", "--from", "boat.png"], cli_env, tmp_path)
    assert wrong_kind.returncode != 0 and "muselab image --from" in wrong_kind.stderr


def test_json_result_and_several_images(cli_env, tmp_path):
    done = run_cli(
        [
            "image",
            "fox",
            "--preset",
            "tiny",
            "--seed",
            "9",
            "--steps",
            "2",
            "-n",
            "2",
            "-o",
            str(tmp_path) + "/",
            "--json",
        ],
        cli_env,
    )
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert [f["seed"] for f in result["files"]] == [9, 10]
    assert [f["flagged"] for f in result["files"]] == [False, False]
    assert sorted(p.name for p in tmp_path.glob("*.png")) == ["fox-10.png", "fox-9.png"]
    progress = [json.loads(line) for line in done.stderr.splitlines() if line.startswith("{")]
    # A one-time OpenVINO conversion may come first, in a stage of its own, with its notes.
    converting = [p for p in progress if p["stage"] == "converting"]
    assert all(p["note"] for p in converting) and progress[: len(converting)] == converting
    steps = [p["step"] for p in progress[len(converting) :]]
    assert steps == sorted(set(steps)) and steps[-1] == 4 and progress[-1]["total"] == 4


def test_bad_input_names_the_field_and_writes_nothing(cli_env, tmp_path):
    done = run_cli(["music", "x", "--preset", "tiny", "--duration", "450"], cli_env, tmp_path)
    assert done.returncode == 2
    assert "duration: must be a number from 1 to 300 (got 450.0)" in done.stderr
    assert "Traceback" not in done.stderr
    bad_ext = run_cli(["image", "x", "--preset", "tiny", "-o", "x.jpg"], cli_env, tmp_path)
    assert bad_ext.returncode == 2 and "end in .png" in bad_ext.stderr
    no_prompt = run_cli(["image"], cli_env, tmp_path)
    assert no_prompt.returncode == 2 and "Give a prompt" in no_prompt.stderr
    assert list(tmp_path.iterdir()) == []


def test_missing_weights_offline_is_one_clear_message(cli_env, tmp_path):
    done = run_cli(["music", "calm piano"], cli_env, tmp_path)
    assert done.returncode == 3
    message = done.stderr
    assert "facebook/musicgen-small" in message
    assert str(tmp_path / "hf-home" / "hub") in message  # the cache folder, for this machine's user
    assert "muselab models download facebook/musicgen-small" in message
    assert "--model PATH" in message and "--preset tiny" in message
    assert "Traceback" not in message and "offline" in message


def test_missing_local_folder_is_explained(cli_env, tmp_path):
    done = run_cli(["image", "x", "--model", "./no-such-model"], cli_env, tmp_path)
    assert done.returncode == 3
    assert "'./no-such-model' does not exist" in done.stderr and "Traceback" not in done.stderr


def test_a_folder_that_is_not_a_model_is_explained(cli_env, tmp_path):
    (tmp_path / "empty").mkdir()
    done = run_cli(["music", "x", "--model", str(tmp_path / "empty")], cli_env, tmp_path)
    assert done.returncode == 3
    assert "could not be loaded as a music model" in done.stderr and "Traceback" not in done.stderr


def test_ctrl_c_cancels_cleanly_and_leaves_no_file(cli_env, tmp_path):
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "muselab",
            "image",
            "fox",
            "--preset",
            "tiny",
            "--steps",
            "150",
            "-n",
            "8",
            "-o",
            "never.png",
            "--json",
        ],
        env=cli_env,
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert process.stderr is not None
    started = time.monotonic()
    for line in process.stderr:  # wait until denoising has really started
        if line.startswith('{"event": "progress"'):
            break
        assert time.monotonic() - started < 120
    process.send_signal(signal.SIGINT)
    _, rest = process.communicate(timeout=60)
    assert process.returncode == 130
    assert "Cancelled; nothing partial was written." in rest
    assert [p for p in tmp_path.rglob("*") if p.is_file() and p.suffix in (".png", ".part")] == []
    jobs = json.loads(run_cli(["jobs", "--json"], cli_env, tmp_path).stdout)
    assert jobs[0]["status"] == "cancelled" and jobs[0]["source"] == "cli"


def test_models_list_doctor_and_make_tiny(cli_env, tmp_path):
    listed = json.loads(run_cli(["models", "list", "--json"], cli_env).stdout)
    ids = {row["id"]: row for row in listed}
    assert ids["facebook/musicgen-small"]["default"] and ids["CompVis/stable-diffusion-v1-4"]["default"]
    assert "stabilityai/sd-turbo" in ids and not any(row["cached"] for row in listed)
    table = run_cli(["models", "list"], cli_env).stdout
    assert "facebook/musicgen-stereo-large" in table
    doctor = json.loads(run_cli(["doctor", "--json"], cli_env).stdout)
    assert doctor["device"] == "cpu" and doctor["dtype"] in ("float32", "bfloat16")
    assert doctor["quantize_music"] in ("int8", "int8-dynamic") and doctor["quantize_image"] == "none"
    assert doctor["reason"] and doctor["offline"] is True
    assert doctor["music_engine"] in ("torch", "openvino")
    assert doctor["music_backend"].startswith(doctor["music_engine"])
    made = run_cli(["models", "make-tiny", str(tmp_path / "tiny")], cli_env)
    assert made.returncode == 0, made.stderr
    assert (tmp_path / "tiny" / "tiny-musicgen" / "model.safetensors").exists()
    assert (tmp_path / "tiny" / "tiny-stable-diffusion" / "unet" / "diffusion_pytorch_model.safetensors").exists()
    used = run_cli(
        [
            "image",
            "x",
            "--model",
            str(tmp_path / "tiny" / "tiny-stable-diffusion"),
            "--steps",
            "2",
            "-o",
            "t.png",
        ],
        cli_env,
        tmp_path,
    )
    assert used.returncode == 0, used.stderr


def test_info_on_a_file_without_recipe(cli_env, tmp_path):
    Image.new("RGB", (4, 4)).save(tmp_path / "plain.png")
    done = run_cli(["info", "plain.png"], cli_env, tmp_path)
    assert done.returncode == 2 and "carries no generation recipe" in done.stderr


def test_history_lists_rates_and_exports_cli_generations(cli_env, tmp_path):
    env = {**cli_env, "MUSELAB_DATA_DIR": str(tmp_path / "data")}
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "tiny-models").symlink_to(Path(cli_env["MUSELAB_DATA_DIR"]) / "tiny-models")
    made = run_cli(["image", "a lighthouse", "--preset", "tiny", "--steps", "2", "--json"], env, tmp_path)
    assert made.returncode == 0, made.stderr
    output_id = json.loads(made.stdout)["files"][0]["id"]
    listed = json.loads(run_cli(["history", "--json"], env).stdout)
    assert [row["id"] for row in listed] == [output_id] and listed[0]["prompt"] == "a lighthouse"
    rated = run_cli(["history", "rate", output_id[:8], "--up", "--stars", "4", "--comment", "bright"], env)
    assert rated.returncode == 0, rated.stderr
    exported = run_cli(["history", "export", "--format", "csv"], env).stdout.splitlines()
    assert exported[0].startswith('"id","job_id","kind","filename","prompt"')
    assert '"1","4","bright",' in exported[1]
    scene = run_cli(
        ["scene", "a harbour", "--preset", "tiny", "-d", "1", "--steps", "2", "-o", "scene/"], env, tmp_path
    )
    assert scene.returncode == 0, scene.stderr
    assert sorted(p.suffix for p in (tmp_path / "scene").iterdir()) == [".mp4", ".png", ".wav"]


def test_a_low_memory_scene_without_its_music_model_keeps_the_picture_and_says_where(cli_env, tmp_path):
    env = {**cli_env, "MUSELAB_MUSIC_MODEL": "someone/not-downloaded"}
    args = ["scene", "a harbour", "--preset", "tiny", "--low-memory", "-d", "1", "--steps", "2", "-o", "scene/"]
    scene = run_cli(args, env, tmp_path)
    assert scene.returncode == 3, scene.stderr  # the model is missing
    assert "someone/not-downloaded" in scene.stderr and "Kept 1 finished file(s)" in scene.stderr
    assert [p.suffix for p in (tmp_path / "scene").iterdir()] == [".png"]
    assert "Traceback" not in scene.stderr


def test_fast_decoder_from_the_command_line(cli_env, tmp_path):
    made = run_cli(
        ["image", "fox", "--preset", "tiny", "--steps", "2", "--seed", "3", "--fast-decoder", "-o", "f.png"],
        cli_env,
        tmp_path,
    )
    assert made.returncode == 0, made.stderr
    assert "VAE: TAESD" in Image.open(tmp_path / "f.png").text["parameters"]
    again = run_cli(["image", "--from", "f.png", "-o", "g.png"], cli_env, tmp_path)
    assert again.returncode == 0, again.stderr
    assert (tmp_path / "f.png").read_bytes() == (tmp_path / "g.png").read_bytes()


def test_quantize_flag_reaches_the_engines_and_the_recipe(cli_env, tmp_path):
    image = run_cli(
        ["image", "fox", "--preset", "tiny", "--steps", "2", "--quantize", "int8", "-o", "a.png", "--json"],
        cli_env,
        tmp_path,
    )
    assert image.returncode == 0, image.stderr
    assert "+int8" in json.loads(image.stdout)["dtype"]  # e.g. "float32+int8 (openvino)"
    music = run_cli(
        ["music", "drums", "--preset", "tiny", "-d", "1", "--quantize", "none", "-o", "a.wav", "--json"],
        cli_env,
        tmp_path,
    )
    assert music.returncode == 0, music.stderr
    assert "+int8" not in json.loads(music.stdout)["dtype"]
    wrong = run_cli(["image", "fox", "--preset", "tiny", "--quantize", "int4"], cli_env, tmp_path)
    assert wrong.returncode == 2 and "int8" in wrong.stderr


def test_bench_refuses_unknown_parts_before_building_anything(cli_env, tmp_path):
    done = run_cli(["bench", "--only", "image,video"], cli_env, tmp_path, timeout=60)
    assert done.returncode == 2
    assert "unknown part(s) video" in done.stderr and "image, fast, music" in done.stderr
