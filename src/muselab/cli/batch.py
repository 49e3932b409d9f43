"""`muselab batch FILE` (a prompt list) and `muselab grid PROMPT --x ... --y ...` (a comparison
grid): many jobs through the same job service as one batch, with one progress bar (done / total,
ETA), each item's result as it ends, and Ctrl-C to stop it (`--resume ID` runs the rest)."""

from __future__ import annotations

import json
import signal
import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from muselab.cli.common import (
    EXIT_BAD_INPUT,
    EXIT_CANCELLED,
    CliError,
    DeviceOpt,
    DtypeOpt,
    JsonOpt,
    OfflineOpt,
    OutputOpt,
    PresetOpt,
    app,
    err,
    out,
    settings_from,
)
from muselab.cli.generate import output_path

CallbackOpt = Annotated[
    str | None,
    typer.Option(
        "--callback",
        help="POST each job's and then the batch's status JSON to this URL when they end, signed with "
        "MUSELAB_WEBHOOK_SECRET (its host must be in MUSELAB_WEBHOOK_HOSTS).",
    ),
]
NameOpt = Annotated[str | None, typer.Option(help="A name for the batch (its folder and history group).")]


@app.command()
def batch(
    file: Annotated[
        str | None,
        typer.Argument(
            help="The prompt list: a prompt a line, with options after it (`a red fox --steps 20 --seed 5`, "
            "A1111's prompts-from-file style), or JSON Lines of requests; - reads standard input."
        ),
    ] = None,
    kind: Annotated[str, typer.Option(help="The kind of a line that names none (--kind music on a line).")] = "image",
    dynamic: Annotated[
        str,
        typer.Option(help="{a|b|c} and __wildcard__: random picks one a job; combinatorial makes every combination."),
    ] = "random",
    name: NameOpt = None,
    resume: Annotated[
        str | None, typer.Option(help="Run what is left of a stopped batch (its id), instead of a new one.")
    ] = None,
    callback: CallbackOpt = None,
    output: OutputOpt = None,
    preset: PresetOpt = None,
    device: DeviceOpt = None,
    dtype: DtypeOpt = None,
    offline: OfflineOpt = False,
    as_json: JsonOpt = False,
) -> None:
    """Run a prompt list as one batch: every line a job, recorded in the history as one group, files
    in one folder."""
    from muselab.prompt_list import parse
    from muselab.schemas import RequestError

    if dynamic not in ("random", "combinatorial"):
        raise CliError(f"--dynamic must be random or combinatorial (got {dynamic!r}).", EXIT_BAD_INPUT)
    if (file is None) == (resume is None):
        raise CliError("Give a prompt list (FILE, or - for standard input) or --resume BATCH_ID.", EXIT_BAD_INPUT)
    requests: list[Any] = []
    if file is not None:
        text = _read_list(file)
        try:
            requests = parse(text, kind)
        except RequestError as exc:
            raise CliError(f"{file}, {exc}", EXIT_BAD_INPUT) from None
    settings = settings_from(preset, device, dtype, offline)

    def start(batches: Any) -> str:
        if resume is not None:
            if batches.status(resume) is None:
                raise CliError(f"No batch {resume} in this history (`muselab history` lists jobs).", EXIT_BAD_INPUT)
            if not batches.resume(resume):
                raise CliError(f"Batch {resume} is being run by another muselab process.", EXIT_BAD_INPUT)
            return resume
        return batches.submit(requests, source="cli", name=name, callback=callback, dynamic=dynamic, save=_save(output))

    run_batch(settings, start, as_json, resuming=resume)


@app.command()
def grid(
    prompt: Annotated[str | None, typer.Argument(help="The prompt of every cell (or a prompt axis).")] = None,
    x: Annotated[
        str | None,
        typer.Option(
            "--x",
            help='The columns: a request field and its values, "steps=10,20,30" (quote a value with a comma: '
            'prompt="a, b",c); "prompt_sr=fox,cat" puts each value in place of fox in the prompt (Prompt S/R).',
        ),
    ] = None,
    y: Annotated[
        str | None, typer.Option("--y", help='The rows, as --x ("speed=fast,quality"); none: one row.')
    ] = None,
    kind: Annotated[str, typer.Option(help="image or music (or a plugin's kind).")] = "image",
    fields: Annotated[
        list[str] | None,
        typer.Option("--set", help="Any other field of every cell, FIELD=VALUE (repeat it): --set width=512."),
    ] = None,
    seed: Annotated[int | None, typer.Option(help="The seed of every cell; default one picked for all.")] = None,
    model: Annotated[str | None, typer.Option("--model", "-m", help="Hub id or local folder.")] = None,
    from_file: Annotated[
        Path | None, typer.Option("--from", help="Make the grid a grid picture's recipe holds again.")
    ] = None,
    name: NameOpt = None,
    callback: CallbackOpt = None,
    output: OutputOpt = None,
    preset: PresetOpt = None,
    device: DeviceOpt = None,
    dtype: DtypeOpt = None,
    offline: OfflineOpt = False,
    as_json: JsonOpt = False,
) -> None:
    """A comparison grid: the same request (and seed) with one field, or two, varied; each cell a
    normal output, and for pictures one labelled grid PNG with its own recipe."""
    base: dict[str, Any] = {"kind": kind}
    if from_file is not None:
        spec = _grid_recipe(from_file)
        base = dict(spec["request"])
        x = x or _axis_text(spec["x"])
        y = y or (_axis_text(spec["y"]) if spec.get("y") else None)
    for item in fields or []:
        field, separator, value = item.partition("=")
        if not separator:
            raise CliError(f"--set {item}: give FIELD=VALUE.", EXIT_BAD_INPUT)
        base[field.strip().replace("-", "_")] = value
    base.update({key: value for key, value in {"prompt": prompt, "seed": seed, "model": model}.items() if value})
    if not x:
        raise CliError('Give the columns: --x FIELD=V1,V2,... (for example --x "steps=10,20,30").', EXIT_BAD_INPUT)
    settings = settings_from(preset, device, dtype, offline)

    def start(batches: Any) -> str:
        return batches.submit_grid(base, x, y, source="cli", name=name, callback=callback, save=_save(output))

    status = run_batch(settings, start, as_json, finish=False)
    if not as_json:
        _print_grid(status)
    _exit_for(status)


def _read_list(file: str) -> str:
    if file == "-":
        return sys.stdin.read()
    path = Path(file).expanduser()
    if not path.is_file():
        raise CliError(f"{file}: no such file.", EXIT_BAD_INPUT)
    try:
        return path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError:
        raise CliError(f"{file}: not UTF-8 text (a prompt list is a text file).", EXIT_BAD_INPUT) from None


def _save(output: str | None) -> Any:
    from muselab.job import SaveOptions

    return SaveOptions(output=output_path(output if output is None or output.endswith("/") else output + "/"))


def _grid_recipe(path: Path) -> dict[str, Any]:
    from muselab.media import MetadataError, read_metadata

    try:
        recipe = read_metadata(path).get("recipe") or {}
    except MetadataError as exc:
        raise CliError(str(exc), EXIT_BAD_INPUT) from None
    if "grid" not in recipe:
        raise CliError(f"{path} is not a grid picture (its recipe names no grid); try `muselab image --from`.", 2)
    return recipe["grid"]


def _axis_text(axis: dict[str, Any]) -> Any:
    return {"field": axis["field"], "values": axis["values"]}


def run_batch(
    settings: Any, start: Any, as_json: bool, finish: bool = True, resuming: str | None = None
) -> dict[str, Any]:
    """Start a batch (`start(batches)` returns its id) on an in-process service and follow it to its
    end: an overall bar, the running item's own, each item's files as it ends. Ctrl-C stops it."""
    from muselab.batches import batches_for
    from muselab.jobs import JobService
    from muselab.quiet import quiet_libraries
    from muselab.schemas import RequestError

    quiet_libraries()
    service = JobService(settings)
    batches = batches_for(service)
    for left in batches.unfinished():
        err.print(
            f"Batch {left} was left unfinished by a run that stopped: `muselab batch --resume {left}` runs the rest."
        )
    try:
        try:
            batch_id = start(batches)
        except RequestError as exc:
            raise CliError(str(exc), EXIT_BAD_INPUT) from None
        status = _follow(batches, batch_id, as_json)
    finally:
        service.shutdown()
    status = batches.status(batch_id) or status
    status["local_folder"] = str(batches.folder(batch_id))  # this machine's user may see its paths
    if as_json:
        print(json.dumps({key: value for key, value in status.items() if key != "current"}, indent=2))
    elif finish:
        _summary(status, batches.folder(batch_id))
    if finish:
        _exit_for(status)
    return status


def _follow(batches: Any, batch_id: str, as_json: bool) -> dict[str, Any]:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from muselab import expected

    stopping = []

    def on_interrupt(signum: int, frame: Any) -> None:
        if stopping:
            raise KeyboardInterrupt
        stopping.append(True)
        batches.cancel(batch_id)

    previous = signal.signal(signal.SIGINT, on_interrupt)
    reported: set[int] = set()
    columns = [
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("ETA {task.fields[eta]}"),
    ]
    try:
        with Progress(*columns, console=err, disable=as_json) as progress:
            overall = progress.add_task("Batch", total=None, eta="-")
            current = progress.add_task("", total=None, eta="-", visible=False)
            while True:
                status = batches.status(batch_id)
                for item in status["items"]:
                    if item["item"] not in reported and item["status"] in ("succeeded", "failed", "cancelled"):
                        reported.add(item["item"])
                        _report_item(progress.console, item, status["total"], as_json)
                eta = status["progress"]["eta"]
                words = "-" if eta is None or status["status"] != "running" else expected.duration(eta)
                label = "Stopping" if stopping else "Batch"
                progress.update(overall, total=status["total"], completed=status["done"], eta=words, description=label)
                running = (status.get("current") or {}).get("progress")
                if running:
                    item_eta = "-" if running["eta"] is None else expected.duration(running["eta"])
                    title = f"  {str(status['current']['request'].get('prompt', ''))[:40]}"
                    progress.update(
                        current,
                        visible=True,
                        total=running["total"],
                        completed=running["step"],
                        eta=item_eta,
                        description=title,
                    )
                if status["status"] != "running":
                    progress.update(current, visible=False)
                    return status
                batches.wait(batch_id, 0.5)
    finally:
        signal.signal(signal.SIGINT, previous)


def _report_item(console: Any, item: dict[str, Any], total: int, as_json: bool) -> None:
    position = f"{item['item'] + 1}/{total}"
    if as_json:
        line = {"event": "item", "item": item["item"], "status": item["status"], "job": item["job_id"]}
        print(json.dumps({**line, "files": [o["filename"] for o in item["outputs"]]}), file=sys.stderr, flush=True)
        return
    if item["status"] == "succeeded":
        files = ", ".join(output["filename"] for output in item["outputs"])
        console.print(f"[green]done[/] {position} {item['prompt']!r}: {files}", highlight=False)
    else:
        console.print(f"[red]{item['status']}[/] {position} {item['prompt']!r}: {item['error'] or ''}", highlight=False)


def _summary(status: dict[str, Any], folder: Path) -> None:
    counts = status["counts"]
    seconds = status["progress"]["elapsed"]
    out.print(
        f"Batch {status['id']}: {counts['succeeded']} of {status['total']} succeeded"
        + (f", {counts['failed']} failed" if counts["failed"] else "")
        + f" in {seconds:0.1f} s; files in {folder}",
        highlight=False,
    )


def _print_grid(status: dict[str, Any]) -> None:
    grid_spec = status["grid"] or {}
    x, y = grid_spec.get("x") or {}, grid_spec.get("y")
    columns = len(x.get("values", [])) or 1
    for item in status["items"]:
        row, column = divmod(item["item"], columns)
        label = f"{x['field']}={x['values'][column]}"
        if y:
            label = f"{y['field']}={y['values'][row]}, {label}"
        files = ", ".join(output["filename"] for output in item["outputs"]) or item["error"] or item["status"]
        out.print(f"{label}: {files}", highlight=False)
    if grid_spec.get("output"):
        out.print(f"Grid picture: [bold]{Path(status['local_folder']) / grid_spec['output']['filename']}[/]")
    _summary(status, Path(status["local_folder"]))


def _exit_for(status: dict[str, Any]) -> None:
    if status["status"] == "cancelled":
        left = status["total"] - status["counts"]["succeeded"] - status["counts"]["failed"]
        raise CliError(f"Stopped; `muselab batch --resume {status['id']}` runs the other {left}.", EXIT_CANCELLED)
    if status["status"] == "failed":
        raise CliError(f"{status['counts']['failed']} of {status['total']} jobs failed (see above).", 1)
