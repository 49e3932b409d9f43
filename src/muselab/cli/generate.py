"""The generating commands (`muselab music`, `image`, `scene`, and one per plugin family), made
from each family's request schema: a field's flags, help and bounds are the schema's, so a field
added there is an option here without further edits."""

from __future__ import annotations

import inspect
import json
import os
import signal
import sys
import typing
from pathlib import Path
from typing import Annotated, Any, Literal

import typer

from muselab.cli.common import (
    EXIT_BAD_INPUT,
    EXIT_CANCELLED,
    EXIT_MODEL,
    BackendOpt,
    CliError,
    DeviceOpt,
    DtypeOpt,
    FromOpt,
    JsonOpt,
    LowMemoryOpt,
    OfflineOpt,
    OutputOpt,
    PresetOpt,
    QuantizeOpt,
    err,
    out,
    settings_from,
)
from muselab.config import Settings, hf_cache_dir
from muselab.families import Family, families, family
from muselab.schemas import field_option

#: Settings a family's command may offer (`Family.settings`), as options: (type, default).
SETTING_OPTIONS: dict[str, tuple[Any, Any]] = {
    "quantize": (QuantizeOpt, None),
    "backend": (BackendOpt, None),
    "low_memory": (LowMemoryOpt, None),
    "safety_checker": (
        Annotated[bool, typer.Option("--no-safety-checker", help="Turn off the model's safety checker.")],
        False,
    ),
}
#: Options that say where and how files are written, by what a family's files hold.
SAVE_OPTIONS: dict[str, dict[str, tuple[Any, Any]]] = {
    "audio": {
        "output": (OutputOpt, None),
        "audio_format": (Annotated[str | None, typer.Option("--format", help="wav (default), flac or ogg.")], None),
        "normalize": (Annotated[bool, typer.Option("--normalize", help="Normalise loudness (-16 dBFS RMS).")], False),
    },
    "image": {"output": (OutputOpt, None)},
    "video": {
        "output": (
            Annotated[Path | None, typer.Option("--output", "-o", help="Folder for the PNG, WAV and MP4.")],
            None,
        )
    },
}
_COMMON = {
    "from_file": (FromOpt, None),
    "preset": (PresetOpt, None),
    "device": (DeviceOpt, None),
    "dtype": (DtypeOpt, None),
    "offline": (OfflineOpt, False),
}


def add_commands(app: typer.Typer) -> None:
    """One command per kind of request, in the registry's order."""
    seen: set[str] = set()
    for candidate in families():
        if candidate.kind not in seen:
            seen.add(candidate.kind)
            app.command(name=candidate.kind, help=candidate.summary)(command_for(candidate))


def command_for(kind_family: Family) -> Any:
    """A typer command whose options are the family's request fields, its save and setting options,
    and the shared ones (--from, --preset, --device, ...)."""
    request = kind_family.request
    parameters: list[inspect.Parameter] = []
    fields: dict[str, str] = {}  # parameter -> request field

    def add(name: str, annotation: Any, default: Any) -> None:
        parameter = inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=default, annotation=annotation)
        parameters.append(parameter)

    prompt_help = request.model_fields["prompt"].description or "The prompt."
    add("prompt", Annotated[str | None, typer.Argument(help=prompt_help)], None)
    later = ("seed", "model")
    for name, info in request.model_fields.items():
        if name in ("kind", "prompt", *later) or not field_option(info).cli:
            continue
        add(name, _field_option(name, info), None)
        fields[name] = name
    seed_info = request.model_fields["seed"]
    add("seed", _field_option("seed", seed_info), None)
    fields["seed"] = "seed"
    for name, (annotation, default) in SAVE_OPTIONS[kind_family.output].items():
        add(name, annotation, default)
    if field_option(request.model_fields["model"]).cli:
        add("model", _field_option("model", request.model_fields["model"]), None)
        fields["model"] = "model"
    for name, (annotation, default) in _COMMON.items():
        add(name, annotation, default)
    for name in kind_family.settings:
        add(name, *SETTING_OPTIONS[name])
    add("as_json", JsonOpt, False)

    def run(**values: Any) -> None:
        save = {name: values[name] for name in SAVE_OPTIONS[kind_family.output] if name != "output"}
        output = output_path(values["output"])
        if kind_family.output == "video" and output is not None and output.suffix:
            raise CliError(f"A scene writes three files: give -o a folder, not '{output}'.", EXIT_BAD_INPUT)
        options = {field: _to_field(request, field, values[parameter]) for parameter, field in fields.items()}
        options["prompt"] = values["prompt"]
        parsed = parse(kind_family.kind, values["from_file"], options)
        chosen = {name: values[name] for name in kind_family.settings}
        if chosen.pop("safety_checker", False):  # --no-safety-checker
            chosen["safety_checker"] = False
        settings = settings_from(values["preset"], values["device"], values["dtype"], values["offline"], **chosen)
        generate(kind_family, parsed, settings, output, values["as_json"], **save)

    run.__signature__ = inspect.Signature(parameters)  # type: ignore[attr-defined]
    run.__annotations__ = {parameter.name: parameter.annotation for parameter in parameters}
    run.__doc__ = kind_family.summary
    run.__name__ = kind_family.kind
    return run


def output_path(given: str | Path | None) -> Path | None:
    """`-o` as a path; one ending in a slash is a folder, made if it is not there yet."""
    if given is None or given == "":
        return None
    path = Path(given).expanduser()
    if str(given).endswith(("/", os.sep)):
        path.mkdir(parents=True, exist_ok=True)
    return path


def _field_option(name: str, info: Any) -> Any:
    """The command-line option of a request field: its flags, its help, its type (a two-choice
    field with `Option.switch` becomes an on/off switch)."""
    option = field_option(info)
    flags = option.flags or (f"--{name.replace('_', '-')}",)
    if option.switch is not None:
        return Annotated[bool | None, typer.Option(*flags, help=info.description)]
    return Annotated[
        _optional(info.annotation), typer.Option(*flags, help=info.description, metavar=option.metavar or None)
    ]


def _optional(annotation: Any) -> Any:
    """`annotation`, also taking None: an option not given leaves the field to the recipe or default.
    A list of choices is a list of strings to typer (it takes no other); the request checks each."""
    if typing.get_origin(annotation) is list and typing.get_origin(typing.get_args(annotation)[0]) is Literal:
        annotation = list[str]
    if type(None) in typing.get_args(annotation):
        return annotation
    return annotation | None


def _to_field(request: Any, field: str, value: Any) -> Any:
    if isinstance(value, list | tuple) and not value:
        return None  # a repeatable option not given: the recipe's (--from) or the default
    option = field_option(request.model_fields[field])
    if option.switch is not None and value is not None:
        return option.switch[0] if value else option.switch[1]
    if option.upload and value is not None:
        return read_upload(value, option.flags[0] if option.flags else f"--{field.replace('_', '-')}")
    return value


def read_upload(value: str, flag: str) -> str:
    """A file named on the command line, as the base64 the request carries (a stored input's
    'sha256:...' reference as it is). The job service checks the picture itself."""
    import base64

    from muselab.uploads import MAX_UPLOAD_BYTES, is_reference

    if is_reference(value):
        return value
    path = Path(value).expanduser()
    if not path.is_file():
        raise CliError(f"{flag} {value}: no such file.", EXIT_BAD_INPUT)
    if path.stat().st_size > MAX_UPLOAD_BYTES:
        raise CliError(f"{flag} {value}: over {MAX_UPLOAD_BYTES // 2**20} MB.", EXIT_BAD_INPUT)
    return base64.b64encode(path.read_bytes()).decode("ascii")


def parse(kind: str, from_file: Path | None, options: dict[str, Any]) -> Any:
    """The request: a recipe read from `from_file`, with the options given overriding it."""
    from muselab.media import MetadataError, request_from_file
    from muselab.schemas import RequestError, parse_request

    data: dict[str, Any] = {}
    if from_file is not None:
        try:
            data = request_from_file(from_file)
        except MetadataError as exc:
            raise CliError(str(exc), EXIT_BAD_INPUT) from None
        if data.get("kind", kind) != kind:
            raise CliError(f"{from_file} holds a {data['kind']} recipe; use `muselab {data['kind']} --from`.")
    data.update({key: value for key, value in options.items() if value is not None})
    if not data.get("prompt"):
        raise CliError("Give a prompt, e.g. muselab " + kind + ' "a red fox in snow", or --from FILE.', 2)
    try:
        return parse_request(family(kind).request, data)
    except RequestError as exc:
        raise CliError(str(exc), EXIT_BAD_INPUT) from None


def generate(
    kind_family: Family, request: Any, settings: Settings, output: Path | None, as_json: bool, **save_options: Any
) -> None:
    """Run one request through the same job service the API uses, so it lands in history too."""
    from muselab import media
    from muselab.jobs import JobService, SaveOptions
    from muselab.quiet import quiet_libraries
    from muselab.schemas import RequestError

    try:
        if kind_family.output != "video":
            media.output_extension(kind_family.output, output, save_options.get("audio_format"))
    except ValueError as exc:
        raise CliError(str(exc), EXIT_BAD_INPUT) from None
    quiet_libraries()
    service = JobService(settings)
    try:
        if not as_json:
            show_expected_time(service, request)
        job = service.submit(request, source="cli", save=SaveOptions(output=output, **save_options))
    except RequestError as exc:  # what the request names on this machine (a LoRA file) will not do
        service.shutdown()
        raise CliError(str(exc), EXIT_BAD_INPUT) from None
    try:
        show_progress(kind_family, service, job, as_json)
    finally:
        service.shutdown()
    paths = [record.path for record in job.outputs]
    kept = f" Kept {len(paths)} finished file(s): " + ", ".join(map(str, paths)) if paths else ""
    if job.status == "cancelled":
        raise CliError("Cancelled; nothing partial was written." + kept, EXIT_CANCELLED)
    if job.status != "succeeded":
        code = {"model_unavailable": EXIT_MODEL, "bad_request": EXIT_BAD_INPUT}.get(job.error_kind or "", 1)
        message = job.error or "the job failed"
        if "local Hugging Face cache" in message:  # the folder, for this machine's user only
            message += f"\n(The Hugging Face cache is {hf_cache_dir()}; `muselab doctor` lists what it holds.)"
        raise CliError(f"{message}\n{kept.strip()}" if kept else message, code)
    status = service.store.get_job(job.id)
    assert status is not None
    report(kind_family, status, paths, as_json)


def show_expected_time(service: Any, request: Any) -> None:
    """ "Expected: about 25 s (fast; from 3 earlier runs here)", for a kind with speed tiers."""
    from muselab import expected

    estimate = service.estimate(request, trusted=True)
    if not estimate:
        return
    speed = getattr(request, "speed", None) if getattr(request, "speed", None) not in (None, "auto") else None
    tier = speed or estimate.get("chosen")
    figure = estimate["tiers"].get(tier or "") or {}
    if figure.get("seconds") is not None:
        err.print(f"Expected: about {expected.duration(figure['seconds'])} ({tier}; {figure['source']})")


def show_progress(kind_family: Family, service: Any, job: Any, as_json: bool) -> None:
    """Show progress until the job ends; Ctrl-C cancels it (a second Ctrl-C quits at once)."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    def on_interrupt(signum: int, frame: Any) -> None:
        if job.cancel.cancelled:
            raise KeyboardInterrupt
        service.cancel(job.id)

    previous = signal.signal(signal.SIGINT, on_interrupt)
    columns = [
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[unit]}"),
        TimeElapsedColumn(),
        TextColumn("ETA {task.fields[eta]}"),
    ]
    title = kind_family.title
    version, last_event = -1, None
    try:
        with Progress(*columns, console=err, transient=False, disable=as_json) as progress:
            task = progress.add_task(f"Loading {job.model}", total=None, unit=kind_family.unit, eta="-")
            while not job.done.is_set():
                version = service.wait_for_change(job, version, 0.2)
                event = job.progress
                if job.cancel.cancelled:
                    progress.update(task, description="Cancelling")
                if event is None or event is last_event:
                    continue
                last_event = event
                if as_json:
                    print_progress_json(event)
                    continue
                label = f"{title} {event.item + 1}/{event.items}" if event.items > 1 else title
                if event.stage == "decoding":
                    label += " (decoding)"
                elif event.stage == "converting":
                    label = event.note or "Converting the model (one time)"
                eta = "-" if event.eta is None else f"{event.eta:0.0f}s"
                progress.update(task, total=event.total, completed=event.step, description=label, eta=eta)
    finally:
        signal.signal(signal.SIGINT, previous)


def print_progress_json(event: Any) -> None:
    line = {
        "event": "progress",
        "stage": event.stage,
        "step": event.step,
        "total": event.total,
        "item": event.item,
        "items": event.items,
        "elapsed": round(event.elapsed, 3),
        "eta": None if event.eta is None else round(event.eta, 3),
    }
    if event.note:
        line["note"] = event.note
    print(json.dumps(line), file=sys.stderr, flush=True)


def report(kind_family: Family, status: dict[str, Any], paths: list[Path], as_json: bool) -> None:
    files = []
    for path, output in zip(paths, status["outputs"], strict=True):
        entry: dict[str, Any] = {"path": str(path), "seed": output["seed"], "id": output["id"]}
        if kind_family.output == "image":
            entry["flagged"] = output["flagged"]
        files.append(entry)
    seconds = status.get("seconds") or 0.0
    if as_json:
        payload = {
            "kind": status["kind"],
            "job": status["id"],
            "files": files,
            "request": status["request"],
            "model": status["model"],
            "device": status["device"],
            "dtype": status["dtype"],
            "seconds": round(seconds, 3),
        }
        print(json.dumps(payload, indent=2))
        return
    for entry in files:
        out.print(f"Saved [bold]{entry['path']}[/] (seed {entry['seed']})", highlight=False)
        if entry.get("flagged"):
            err.print(
                "[yellow]The safety checker flagged this image, so it was blanked. "
                "Change the prompt or seed, or pass --no-safety-checker to turn the checker off.[/]"
            )
    out.print(
        f"{len(files)} {status['kind']} file(s) in {seconds:0.1f} s on {status['device']} ({status['dtype']})",
        style="dim",
    )
