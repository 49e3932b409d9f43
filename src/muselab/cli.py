"""The `muselab` command line."""

from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path
from typing import Annotated, Any, Literal

import typer
from rich.console import Console
from rich.table import Table

from muselab import __version__
from muselab.config import (
    CATALOGUE,
    BackendChoice,
    DeviceChoice,
    DtypeChoice,
    Preset,
    QuantizeChoice,
    Settings,
    hf_cache_dir,
)

app = typer.Typer(
    help="Text to music and text to image on your own machine.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
models_app = typer.Typer(help="The model catalogue: list, download, build tiny test models.", no_args_is_help=True)
app.add_typer(models_app, name="models")

# Piped output is not cut at 80 columns: ids and paths must stay greppable.
out = Console(width=None if sys.stdout.isatty() else 200)
err = Console(stderr=True, width=None if sys.stderr.isatty() else 200)

EXIT_BAD_INPUT, EXIT_MODEL, EXIT_CANCELLED = 2, 3, 130

# Options shared by the generating commands.
PresetOpt = Annotated[
    Preset | None,
    typer.Option("--preset", help="'tiny' uses tiny random-weight models built locally (noise, but fast)."),
]
DeviceOpt = Annotated[DeviceChoice | None, typer.Option(help="Where to run; auto picks CUDA, MPS, then CPU.")]
DtypeOpt = Annotated[DtypeChoice | None, typer.Option(help="Number format; auto picks per device and CPU.")]
OfflineOpt = Annotated[bool, typer.Option("--offline", help="Never reach the hub; use the local cache only.")]
QuantizeOpt = Annotated[
    QuantizeChoice | None,
    typer.Option(
        help="int8 weights: a quarter of the memory; auto = only where faster (MusicGen on a CPU); "
        "int8-full = int8 activations too for images (OpenVINO on a CPU; faster, pictures change a little)."
    ),
]
BackendOpt = Annotated[
    BackendChoice | None,
    typer.Option(
        help="What runs the image UNet and decoder and the music decoder: openvino (converted once, "
        "cached) or torch; auto = openvino on a CPU where installed (images: unless memory matters more)."
    ),
]
LowMemoryOpt = Annotated[
    bool | None,
    typer.Option(
        "--low-memory",
        help="Attention slicing, VAE tiling, CPU offload on CUDA, one model loaded at a time: less memory, slower.",
    ),
]
ModelOpt = Annotated[str | None, typer.Option("--model", "-m", help="Hub id or local folder.")]
SeedOpt = Annotated[int | None, typer.Option(help="Seed; the same seed gives the same output. Random if unset.")]
FromOpt = Annotated[
    Path | None, typer.Option("--from", help="Re-run the recipe stored in a file; other options override it.")
]
JsonOpt = Annotated[
    bool,
    typer.Option("--json", help="Print the result as JSON on stdout (progress as JSON lines on stderr)."),
]
OutputOpt = Annotated[
    Path | None, typer.Option("--output", "-o", help="Output file or folder; default <data dir>/outputs.")
]


class CliError(Exception):
    def __init__(self, message: str, code: int = 1):
        super().__init__(message)
        self.code = code


def main() -> None:
    try:
        app()
    except CliError as exc:
        err.print(f"[bold red]Error:[/] {exc}", highlight=False, soft_wrap=True)
        sys.exit(exc.code)


def _settings(preset: str | None, device: str | None, dtype: str | None, offline: bool, **more: Any) -> Settings:
    overrides = {
        "preset": preset,
        "device": device,
        "dtype": dtype,
        "offline": True if offline else None,
        **more,
    }
    return Settings(**{key: value for key, value in overrides.items() if value is not None})


def _request(kind: str, from_file: Path | None, options: dict[str, Any]) -> Any:
    from muselab.media import MetadataError, request_from_file
    from muselab.schemas import REQUEST_TYPES, RequestError, parse_request

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
        return parse_request(REQUEST_TYPES[kind], data)
    except RequestError as exc:
        raise CliError(str(exc), EXIT_BAD_INPUT) from None


@app.command()
def music(
    prompt: Annotated[str | None, typer.Argument(help="What the music should sound like.")] = None,
    duration: Annotated[float | None, typer.Option("--duration", "-d", help="Seconds, 1-30.")] = None,
    temperature: Annotated[float | None, typer.Option(help="Sampling temperature.")] = None,
    top_k: Annotated[int | None, typer.Option(help="Top-k sampling; 0 turns it off.")] = None,
    top_p: Annotated[float | None, typer.Option(help="Nucleus sampling; 0 turns it off.")] = None,
    guidance: Annotated[float | None, typer.Option(help="Classifier-free guidance; 1 or less turns it off.")] = None,
    seed: SeedOpt = None,
    clips: Annotated[int | None, typer.Option("--clips", "-n", help="How many clips; clip i uses seed + i.")] = None,
    output: OutputOpt = None,
    audio_format: Annotated[str | None, typer.Option("--format", help="wav (default), flac or ogg.")] = None,
    normalize: Annotated[bool, typer.Option("--normalize", help="Normalise loudness (-16 dBFS RMS).")] = False,
    model: ModelOpt = None,
    from_file: FromOpt = None,
    preset: PresetOpt = None,
    device: DeviceOpt = None,
    dtype: DtypeOpt = None,
    offline: OfflineOpt = False,
    quantize: QuantizeOpt = None,
    backend: BackendOpt = None,
    low_memory: LowMemoryOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Make music from a text prompt, e.g. muselab music "lo-fi beat with warm piano" -d 8."""
    request = _request(
        "music",
        from_file,
        {
            "prompt": prompt,
            "duration": duration,
            "temperature": temperature,
            "top_k": top_k,
            "top_p": top_p,
            "guidance": guidance,
            "seed": seed,
            "num_clips": clips,
            "model": model,
        },
    )
    settings = _settings(preset, device, dtype, offline, quantize=quantize, backend=backend, low_memory=low_memory)
    _generate("music", request, settings, output, as_json, audio_format=audio_format, normalize=normalize)


@app.command()
def image(
    prompt: Annotated[str | None, typer.Argument(help="What the picture should show.")] = None,
    negative: Annotated[str | None, typer.Option("--negative", help="What to keep out of the picture.")] = None,
    width: Annotated[int | None, typer.Option(help="Pixels, a multiple of 8; default the model's size.")] = None,
    height: Annotated[int | None, typer.Option(help="Pixels, a multiple of 8; default the model's size.")] = None,
    steps: Annotated[int | None, typer.Option(help="Denoising steps; default per model (25, 1 for sd-turbo).")] = None,
    guidance: Annotated[float | None, typer.Option(help="CFG scale; default per model (7.5, 0 for sd-turbo).")] = None,
    scheduler: Annotated[
        str | None, typer.Option(help="DPM++ 2M Karras (default), DPM++ 2M, Euler a, Euler, DDIM, PNDM, LCM.")
    ] = None,
    seed: SeedOpt = None,
    images: Annotated[
        int | None, typer.Option("--images", "-n", help="How many images; image i uses seed + i.")
    ] = None,
    output: OutputOpt = None,
    no_safety_checker: Annotated[
        bool, typer.Option("--no-safety-checker", help="Turn off the model's safety checker.")
    ] = False,
    fast_decoder: Annotated[
        bool | None,
        typer.Option("--fast-decoder/--full-decoder", help="Decode with the tiny autoencoder (TAESD): much faster."),
    ] = None,
    model: ModelOpt = None,
    from_file: FromOpt = None,
    preset: PresetOpt = None,
    device: DeviceOpt = None,
    dtype: DtypeOpt = None,
    offline: OfflineOpt = False,
    quantize: QuantizeOpt = None,
    backend: BackendOpt = None,
    low_memory: LowMemoryOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Make an image from a text prompt, e.g. muselab image "a red fox in snow, watercolor"."""
    request = _request(
        "image",
        from_file,
        {
            "prompt": prompt,
            "negative_prompt": negative,
            "width": width,
            "height": height,
            "steps": steps,
            "guidance": guidance,
            "scheduler": scheduler,
            "seed": seed,
            "num_images": images,
            "model": model,
            "decoder": None if fast_decoder is None else ("fast" if fast_decoder else "full"),
        },
    )
    settings = _settings(
        preset,
        device,
        dtype,
        offline,
        quantize=quantize,
        backend=backend,
        low_memory=low_memory,
        **({"safety_checker": False} if no_safety_checker else {}),
    )
    _generate("image", request, settings, output, as_json)


@app.command()
def scene(
    prompt: Annotated[str | None, typer.Argument(help="One prompt for the picture and its soundtrack.")] = None,
    image_prompt: Annotated[str | None, typer.Option(help="A separate prompt for the picture.")] = None,
    music_prompt: Annotated[str | None, typer.Option(help="A separate prompt for the soundtrack.")] = None,
    negative: Annotated[str | None, typer.Option("--negative", help="What to keep out of the picture.")] = None,
    duration: Annotated[float | None, typer.Option("--duration", "-d", help="Seconds of soundtrack, 1-30.")] = None,
    width: Annotated[int | None, typer.Option(help="Picture width, a multiple of 8.")] = None,
    height: Annotated[int | None, typer.Option(help="Picture height, a multiple of 8.")] = None,
    steps: Annotated[int | None, typer.Option(help="Denoising steps for the picture.")] = None,
    seed: SeedOpt = None,
    output: Annotated[Path | None, typer.Option("--output", "-o", help="Folder for the PNG, WAV and MP4.")] = None,
    from_file: FromOpt = None,
    preset: PresetOpt = None,
    device: DeviceOpt = None,
    dtype: DtypeOpt = None,
    offline: OfflineOpt = False,
    quantize: QuantizeOpt = None,
    backend: BackendOpt = None,
    low_memory: LowMemoryOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """A picture and its soundtrack from one prompt, saved as PNG, WAV and an MP4 of both."""
    if output is not None and output.suffix:
        raise CliError(f"A scene writes three files: give -o a folder, not '{output}'.", EXIT_BAD_INPUT)
    request = _request(
        "scene",
        from_file,
        {
            "prompt": prompt,
            "image_prompt": image_prompt,
            "music_prompt": music_prompt,
            "negative_prompt": negative,
            "duration": duration,
            "width": width,
            "height": height,
            "steps": steps,
            "seed": seed,
        },
    )
    settings = _settings(preset, device, dtype, offline, quantize=quantize, backend=backend, low_memory=low_memory)
    _generate("scene", request, settings, output, as_json)


def _generate(
    kind: str, request: Any, settings: Settings, output: Path | None, as_json: bool, **save_options: Any
) -> None:
    """Run one request through the same job service the API uses, so it lands in history too."""
    from muselab import media
    from muselab.jobs import JobService, SaveOptions
    from muselab.quiet import quiet_libraries

    try:
        if kind != "scene":
            media.output_extension(kind, output, save_options.get("audio_format"))
    except ValueError as exc:
        raise CliError(str(exc), EXIT_BAD_INPUT) from None
    quiet_libraries()
    service = JobService(settings)
    job = service.submit(request, source="cli", save=SaveOptions(output=output, **save_options))
    try:
        _show_progress(kind, service, job, as_json)
    finally:
        service.shutdown()
    paths = [record.path for record in job.outputs]
    kept = f" Kept {len(paths)} finished file(s): " + ", ".join(map(str, paths)) if paths else ""
    if job.status == "cancelled":
        raise CliError("Cancelled; nothing partial was written." + kept, EXIT_CANCELLED)
    if job.status != "succeeded":
        code = EXIT_MODEL if job.error_kind == "model_unavailable" else 1
        message = job.error or "the job failed"
        if "local Hugging Face cache" in message:  # the folder, for this machine's user only
            message += f"\n(The Hugging Face cache is {hf_cache_dir()}; `muselab doctor` lists what it holds.)"
        raise CliError(f"{message}\n{kept.strip()}" if kept else message, code)
    status = service.store.get_job(job.id)
    assert status is not None
    _report(status, paths, as_json)


def _show_progress(kind: str, service: Any, job: Any, as_json: bool) -> None:
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
    unit = {"music": "tokens", "image": "steps", "scene": "steps + tokens"}[kind]
    version, last_event = -1, None
    try:
        with Progress(*columns, console=err, transient=False, disable=as_json) as progress:
            task = progress.add_task(f"Loading {job.model}", total=None, unit=unit, eta="-")
            while not job.done.is_set():
                version = service.wait_for_change(job, version, 0.2)
                event = job.progress
                if job.cancel.cancelled:
                    progress.update(task, description="Cancelling")
                if event is None or event is last_event:
                    continue
                last_event = event
                if as_json:
                    _print_progress_json(event)
                    continue
                label = f"{kind.capitalize()} {event.item + 1}/{event.items}" if event.items > 1 else kind.capitalize()
                if event.stage == "decoding":
                    label += " (decoding)"
                elif event.stage == "converting":
                    label = event.note or "Converting the model (one time)"
                eta = "-" if event.eta is None else f"{event.eta:0.0f}s"
                progress.update(task, total=event.total, completed=event.step, description=label, eta=eta)
    finally:
        signal.signal(signal.SIGINT, previous)


def _print_progress_json(event: Any) -> None:
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


def _report(status: dict[str, Any], paths: list[Path], as_json: bool) -> None:
    request = status["request"]
    files = []
    for path, output in zip(paths, status["outputs"], strict=True):
        entry: dict[str, Any] = {"path": str(path), "seed": output["seed"], "id": output["id"]}
        if status["kind"] == "image":
            entry["flagged"] = output["flagged"]
        files.append(entry)
    seconds = status.get("seconds") or 0.0
    if as_json:
        payload = {
            "kind": status["kind"],
            "job": status["id"],
            "files": files,
            "request": request,
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


def _stopping_server(config: Any, service: Any) -> Any:
    """uvicorn's server, whose SIGTERM or Ctrl-C first stops every job (recorded as interrupted):
    otherwise the graceful shutdown would wait for requests that wait for jobs of many minutes."""
    import uvicorn

    class Server(uvicorn.Server):
        def handle_exit(self, sig: int, frame: Any) -> None:
            service.stop_accepting()
            super().handle_exit(sig, frame)

    return Server(config)


@app.command()
def serve(
    host: Annotated[
        str | None, typer.Option(help="Address to listen on; default 127.0.0.1 (this machine only).")
    ] = None,
    port: Annotated[int | None, typer.Option(help="Port; default 7860.")] = None,
    token: Annotated[
        str | None, typer.Option(help="Require 'Authorization: Bearer TOKEN' (or set MUSELAB_API_TOKEN).")
    ] = None,
    preset: PresetOpt = None,
    device: DeviceOpt = None,
    dtype: DtypeOpt = None,
    offline: OfflineOpt = False,
    quantize: QuantizeOpt = None,
    backend: BackendOpt = None,
    low_memory: LowMemoryOpt = None,
    job_timeout: Annotated[
        float | None, typer.Option(help="Seconds a job may run before it is stopped (default 1800).", min=0.1)
    ] = None,
    allow_any_model: Annotated[
        bool | None,
        typer.Option(
            "--allow-any-model",
            help="Let clients name any hub id or a folder on this machine as a model (default: the catalogue's "
            "and the configured ones only).",
        ),
    ] = None,
) -> None:
    """Serve the HTTP API (OpenAPI docs at /docs), plus A1111 and OpenAI compatible image routes."""
    import uvicorn

    from muselab.api import create_app
    from muselab.security import is_loopback, protocol_with_timeout

    settings = _settings(
        preset,
        device,
        dtype,
        offline,
        host=host,
        port=port,
        api_token=token,
        quantize=quantize,
        backend=backend,
        low_memory=low_memory,
        job_timeout=job_timeout,
        allow_any_model=allow_any_model,
    )
    if not is_loopback(settings.host) and not settings.api_token:
        raise CliError(
            f"Refusing to listen on {settings.host} without a token: anyone who can reach this machine could "
            "use it.\nSet one with --token SECRET or MUSELAB_API_TOKEN=SECRET (clients then send "
            "'Authorization: Bearer SECRET'), or keep the default --host 127.0.0.1.",
            EXIT_BAD_INPUT,
        )
    from muselab.quiet import quiet_libraries

    quiet_libraries()
    app_ = create_app(settings)
    if settings.prepare_models:
        app_.state.service.prepare()  # the first request then finds its model loaded and converted
    interrupted = app_.state.service.interrupted
    if interrupted:
        err.print(f"{len(interrupted)} job(s) left unfinished by the last run were marked interrupted.")
    err.print(f"muselab API on http://{settings.host}:{settings.port} (docs at /docs)", highlight=False)
    config = uvicorn.Config(
        app_,
        host=settings.host,
        port=settings.port,
        http=protocol_with_timeout(settings.client_timeout),
        log_level="warning",
        timeout_graceful_shutdown=5,
    )
    _stopping_server(config, app_.state.service).run()


@app.command()
def ui(
    port: Annotated[int, typer.Option(help="Port for the studio.")] = 8501,
    host: Annotated[str, typer.Option(help="Address; default this machine only.")] = "127.0.0.1",
    api_url: Annotated[
        str | None, typer.Option(help="Use a running `muselab serve` at this URL instead of an in-process service.")
    ] = None,
    token: Annotated[str | None, typer.Option(help="The server's token, with --api-url.")] = None,
    preset: PresetOpt = None,
    device: DeviceOpt = None,
    dtype: DtypeOpt = None,
    offline: OfflineOpt = False,
    quantize: QuantizeOpt = None,
    backend: BackendOpt = None,
    low_memory: LowMemoryOpt = None,
) -> None:
    """Start the Streamlit studio (Home, Music, Image, Scene, Gallery) in your browser."""
    from muselab.security import is_loopback

    if not is_loopback(host) and api_url is None and not os.environ.get("MUSELAB_ALLOW_REMOTE_UI"):
        raise CliError(
            f"Refusing to serve the studio on {host}: anyone who can reach it could generate on this machine. "
            "Put it behind an authenticating proxy and set MUSELAB_ALLOW_REMOTE_UI=1, or keep 127.0.0.1.",
            EXIT_BAD_INPUT,
        )
    env = {**os.environ, "MUSELAB_UI_PROCESS": "1"}  # see ui.backend.LocalBackend._stop
    if is_loopback(host):
        # This machine's own user, as with the CLI: the model field takes folders and any hub id.
        env.setdefault("MUSELAB_ALLOW_ANY_MODEL", "1")
    for name, value in {
        "MUSELAB_PRESET": preset,
        "MUSELAB_DEVICE": device,
        "MUSELAB_DTYPE": dtype,
        "MUSELAB_QUANTIZE": quantize,
        "MUSELAB_BACKEND": backend,
        "MUSELAB_LOW_MEMORY": "1" if low_memory else None,
        "MUSELAB_OFFLINE": "1" if offline else None,
        "MUSELAB_UI_API_URL": api_url,
        "MUSELAB_API_TOKEN": token,
    }.items():
        if value is not None:
            env[name] = value
    for name in ("MUSELAB_DATA_DIR", "MUSELAB_OUTPUT_DIR"):
        if env.get(name):
            env[name] = str(Path(env[name]).expanduser().resolve())  # the studio runs from its own folder
    folder = Path(__file__).parent / "ui"
    command = [
        sys.executable, "-m", "streamlit", "run", str(folder / "app.py"),
        "--server.address", host, "--server.port", str(port), "--server.headless", "true",
        "--server.enableXsrfProtection", "true", "--server.fileWatcherType", "none",
        "--runner.postScriptGC", "false",
        "--browser.gatherUsageStats", "false",
    ]  # fmt: skip
    # runner.postScriptGC off: Streamlit's full garbage collection after every run, twice a second
    # while progress shows, holds the GIL for most of the time once the models' libraries are
    # loaded, and starved the first model's one-time conversion.
    err.print(f"muselab studio on http://{host}:{port}", highlight=False)
    # Become Streamlit (no child process left behind when this one is stopped), started from the
    # ui folder so it finds its .streamlit/config.toml (theme, server defaults).
    os.chdir(folder)
    os.execve(sys.executable, command, env)


history_app = typer.Typer(help="Past outputs, with their ratings: list and export.", invoke_without_command=True)
app.add_typer(history_app, name="history")


@history_app.callback()
def history(
    ctx: typer.Context,
    kind: Annotated[str | None, typer.Option(help="music or image")] = None,
    search: Annotated[str | None, typer.Option("--search", "-s", help="Text the prompt contains.")] = None,
    limit: Annotated[int, typer.Option(min=1, max=1000)] = 20,
    as_json: JsonOpt = False,
) -> None:
    """List recent outputs, newest first."""
    if ctx.invoked_subcommand:
        return
    store = _store()
    records = store.list_outputs(kind=kind, text=search, limit=limit)
    if as_json:
        print(json.dumps([{**r.public(), "path": str(r.path)} for r in records], indent=2))
        return
    table = Table(title=f"History ({store.count_outputs()} outputs)")
    for column in ("id", "kind", "created", "prompt", "seed", "rating", "file"):
        table.add_column(column)
    for record in records:
        rating = ("+" if record.thumb == 1 else "-" if record.thumb == -1 else "") + (
            f"{record.stars}*" if record.stars else ""
        )
        table.add_row(
            record.id[:8],
            record.kind,
            record.created_at[:19],
            record.prompt[:40],
            str(record.seed),
            rating,
            str(record.path),
        )
    out.print(table)


@history_app.command("export")
def history_export(
    fmt: Annotated[str, typer.Option("--format", "-f", help="jsonl or csv")] = "jsonl",
    output: Annotated[Path | None, typer.Option("--output", "-o", help="File to write; default stdout.")] = None,
) -> None:
    """Write history and feedback as JSON Lines or CSV, to study what worked."""
    try:
        text = _store().export(fmt)
    except ValueError as exc:
        raise CliError(str(exc), EXIT_BAD_INPUT) from None
    if output is None:
        sys.stdout.write(text)
        return
    from muselab.media import write_new_file

    path = write_new_file(output, lambda handle: handle.write(text.encode()))
    err.print(f"Wrote {path}")


@history_app.command("rate")
def history_rate(
    output_id: Annotated[str, typer.Argument(help="Output id (or its first 8 characters, as listed).")],
    up: Annotated[bool, typer.Option("--up", help="Thumbs up.")] = False,
    down: Annotated[bool, typer.Option("--down", help="Thumbs down.")] = False,
    stars: Annotated[int | None, typer.Option(min=1, max=5, help="1-5 stars.")] = None,
    comment: Annotated[str | None, typer.Option(help="A note about this output.")] = None,
) -> None:
    """Rate an output (thumbs and/or stars) and leave a comment."""
    from muselab.store import FeedbackError

    store = _store()
    record = _one_output(store, output_id)
    thumb = 1 if up else -1 if down else None
    try:
        store.set_feedback(record.id, thumb, stars, comment)
    except FeedbackError as exc:
        raise CliError(str(exc), EXIT_BAD_INPUT) from None
    out.print(f"Rated {record.id[:8]} ({record.path.name})")


@history_app.command("delete")
def history_delete(
    output_id: Annotated[str, typer.Argument(help="Output id (or its first 8 characters, as listed).")],
) -> None:
    """Forget an output; its file is deleted only if it lies inside the outputs folder (a file written
    elsewhere with -o is kept)."""
    store = _store()
    deletion = store.delete_output(_one_output(store, output_id).id)
    out.print(deletion.message if deletion else "Already deleted.", highlight=False)


@app.command()
def jobs(
    limit: Annotated[int, typer.Option(min=1, max=1000)] = 20,
    as_json: JsonOpt = False,
) -> None:
    """Recent jobs of every front end (CLI, API, UI) with their status."""
    rows = _store().list_jobs(limit=limit)
    if as_json:
        print(json.dumps(rows, indent=2, default=str))
        return
    table = Table(title="Jobs")
    for column in ("id", "kind", "status", "source", "created", "seconds", "prompt", "error"):
        table.add_column(column)
    for row in rows:
        seconds = f"{row['seconds']:.1f}" if row["seconds"] else ""
        error = (row["error"] or "").splitlines()[0][:50] if row["error"] else ""
        table.add_row(
            row["id"][:8],
            row["kind"],
            row["status"],
            row["source"],
            row["created_at"][:19],
            seconds,
            row["request"]["prompt"][:30],
            error,
        )
    out.print(table)


def _one_output(store: Any, output_id: str) -> Any:
    """The output whose id is or starts with `output_id`."""
    matches = [r for r in store.list_outputs(limit=100_000) if r.id.startswith(output_id)] if output_id else []
    if len(matches) != 1:
        raise CliError(f"No single output matches '{output_id}'; see `muselab history`.", EXIT_BAD_INPUT)
    return matches[0]


def _store() -> Any:
    from muselab.store import HistoryStore

    return HistoryStore.for_settings(Settings())


@app.command()
def info(
    file: Annotated[Path, typer.Argument(help="A PNG, WAV, FLAC or OGG file.")],
    as_json: JsonOpt = False,
) -> None:
    """Print the recipe a file carries (its prompt and every setting), and how to re-run it."""
    from muselab.media import MetadataError, read_metadata

    try:
        meta = read_metadata(file)
    except MetadataError as exc:
        raise CliError(str(exc), EXIT_BAD_INPUT) from None
    if as_json:
        print(json.dumps(meta, indent=2, default=str))
        return
    recipe = meta.get("recipe")
    table = Table(show_header=False, box=None)
    table.add_column(style="bold")
    table.add_column()
    if recipe:
        for key, value in recipe["request"].items():
            if value not in (None, "") and key != "kind":
                table.add_row(key, str(value))
        for key in ("model_name", "device", "dtype", "software", "flagged", "sample_rate"):
            if key in recipe:
                table.add_row(key, str(recipe[key]))
    if meta.get("duration") is not None:
        channels = f", {meta['channels']} channel(s)" if "channels" in meta else ""
        table.add_row("length", f"{meta['duration']:.3f} s{channels}")
    if meta.get("size"):
        table.add_row("size", f"{meta['size'][0]}x{meta['size'][1]}")
    kind = recipe["request"]["kind"] if recipe else "image"
    out.print(f"[bold]{file}[/] ({kind})", highlight=False)
    out.print(table)
    if meta.get("parameters"):
        out.print("\n[bold]parameters[/] (A1111 format):")
        print(meta["parameters"])
    out.print(f"\nRe-run: muselab {kind} --from {file}", style="dim", highlight=False)


@models_app.command("list")
def models_list(as_json: JsonOpt = False) -> None:
    """The catalogue, and which models are already in the local cache (with their size)."""
    cached = _cached_repos()
    rows = []
    for entry in CATALOGUE:
        size = cached.get(entry.id)
        rows.append(
            {
                "id": entry.id,
                "kind": entry.kind,
                "default": entry.default,
                "description": entry.description,
                "cached": size is not None,
                "size_bytes": size,
            }
        )
    if as_json:
        print(json.dumps(rows, indent=2))
        return
    table = Table(title=f"Model catalogue (cache: {hf_cache_dir()})")
    for column in ("id", "kind", "description", "local"):
        table.add_column(column)
    for row in rows:
        local = _human_size(row["size_bytes"]) if row["cached"] else "-"
        name = row["id"] + (" (default)" if row["default"] else "")
        table.add_row(name, row["kind"], row["description"], local)
    out.print(table)
    out.print("Any hub id or local folder also works with --model.", style="dim")


@models_app.command("download")
def models_download(
    model_id: Annotated[str, typer.Argument(help="A hub id, e.g. facebook/musicgen-small.")],
) -> None:
    """Fetch a model's weights (safetensors only) into the local cache, with a progress bar."""
    from muselab.engines.base import ModelUnavailable, download_model

    try:
        path = download_model(model_id)
    except ModelUnavailable as exc:
        raise CliError(str(exc), EXIT_MODEL) from None
    out.print(f"Downloaded {model_id} to {path}")


@models_app.command("convert")
def models_convert(
    model: Annotated[
        str | None, typer.Argument(help="Hub id or folder; default: the configured image (or music) model.")
    ] = None,
    kind: Annotated[
        Literal["image", "music"] | None,
        typer.Option(help="image or music; default: the catalogue's kind for a known id, else image."),
    ] = None,
    quantize: QuantizeOpt = None,
    preset: PresetOpt = None,
    offline: OfflineOpt = False,
) -> None:
    """Convert a model for the OpenVINO backend now: a one-time step, cached for later runs."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from muselab.config import catalogue_entry
    from muselab.engines import ModelUnavailable, load_engine
    from muselab.quiet import quiet_libraries

    entry = catalogue_entry(model) if model else None
    kind = kind or (entry.kind if entry else "image")
    quiet_libraries()
    settings = _settings(preset, "cpu", None, offline, quantize=quantize, backend="openvino")
    columns = [TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn()]
    with Progress(*columns, console=err) as progress:
        task = progress.add_task(f"Loading {model or settings.model_for(kind)}", total=None)

        def on_progress(event: Any) -> None:
            progress.update(task, description=event.note, completed=event.step, total=event.total)

        try:
            engine = load_engine(kind, settings, model, on_progress=on_progress)
        except ModelUnavailable as exc:
            raise CliError(str(exc), EXIT_MODEL) from None
    seconds = engine.load_timings.get("convert_s", 0.0)  # type: ignore[attr-defined]
    done = f"converted in {seconds:.0f} s" if seconds > 0.01 else "already converted"
    out.print(f"{engine.model}: {done}; cached in {settings.openvino_cache}", highlight=False)


@models_app.command("make-tiny")
def models_make_tiny(
    directory: Annotated[Path, typer.Argument(help="Folder to write the tiny models into.")],
) -> None:
    """Build tiny random-weight MusicGen and Stable Diffusion models (for tests and trying the pipeline)."""
    from muselab.quiet import quiet_libraries
    from muselab.testing.tiny import build_tiny_models

    quiet_libraries()
    with err.status("Building tiny models..."):
        paths = build_tiny_models(directory)
    for kind, path in paths.items():
        out.print(f"{kind}: {path}  (use with --model {path})", highlight=False)


@app.command()
def doctor(as_json: JsonOpt = False) -> None:
    """The device and dtype muselab will use and why, library versions, folders, cached models."""
    import diffusers
    import torch
    import transformers

    from muselab.devices import cpu_has_native_bf16, cpu_name
    from muselab.engines import describe_runtime

    settings = Settings()
    cached = _cached_repos()
    report = {
        "muselab": __version__,
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "transformers": transformers.__version__,
        **describe_runtime(settings),
        "cpu": cpu_name(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "cpu_native_bf16": cpu_has_native_bf16(),
        "threads": torch.get_num_threads(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "data_dir": str(settings.data_dir),
        "outputs": str(settings.outputs),
        "hf_cache": str(hf_cache_dir()),
        "offline": settings.is_offline(),
        "models_present": {entry.id: entry.id in cached for entry in CATALOGUE},
    }
    if as_json:
        print(json.dumps(report, indent=2))
        return
    table = Table(show_header=False, box=None)
    table.add_column(style="bold")
    table.add_column()
    for key, value in report.items():
        if key != "models_present":
            table.add_row(key, str(value))
    out.print(table)
    for model_id, present in report["models_present"].items():
        mark = "[green]present[/]" if present else "[dim]not downloaded[/]"
        out.print(f"  {model_id}: {mark}")


def _cached_repos() -> dict[str, int]:
    from huggingface_hub import scan_cache_dir
    from huggingface_hub.errors import CacheNotFound

    try:
        info = scan_cache_dir()
    except CacheNotFound:
        return {}
    return {repo.repo_id: repo.size_on_disk for repo in info.repos if repo.repo_type == "model"}


def _human_size(size: int | None) -> str:
    value = float(size or 0)
    for unit in ("B", "KB", "MB", "GB"):
        if value < 1024:
            return f"{value:.0f} {unit}"
        value /= 1024
    return f"{value:.1f} TB"


@app.command()
def bench(
    quick: Annotated[
        bool, typer.Option("--quick", help="Time a few steps and extrapolate (under 10 minutes).")
    ] = False,
    json_file: Annotated[Path | None, typer.Option("--json", help="Write every figure here as JSON.")] = None,
    docs: Annotated[
        Path | None, typer.Option("--docs", help="Write the table into this Markdown file, between bench markers.")
    ] = None,
    only: Annotated[
        str | None,
        typer.Option(
            help="Parts to run, comma-separated: image, fast, music, int8-full and fast-int8-full (int8 "
            "activations for SD 1.x and for the sd-turbo fast path; their one-time calibration takes "
            "minutes, so they are not in the default set), compiled (the UNet under torch.compile; "
            "in the default set on a CUDA GPU). Default: image, fast, music (and compiled on a GPU)."
        ),
    ] = None,
    music_seconds: Annotated[float | None, typer.Option(help="Seconds of audio (default 5 quick, 10 full).")] = None,
) -> None:
    """Baseline (a plain diffusers/transformers script) against muselab's defaults, side by side, on
    full-size random-weight SD 1.x, sd-turbo and musicgen-small; nothing is downloaded."""
    from muselab import benchmark

    parts = tuple(part.strip() for part in only.split(",") if part.strip()) if only else None
    known = ("image", "fast", "music", "int8-full", "fast-int8-full", "compiled")
    unknown = set(parts or ()) - set(known)
    if unknown:
        raise CliError(f"--only: unknown part(s) {', '.join(sorted(unknown))}; choose from {', '.join(known)}.", 2)
    if docs is not None and not docs.exists():
        raise CliError(f"--docs {docs}: no such file.", EXIT_BAD_INPUT)
    report = benchmark.run(quick=quick, json_path=json_file, parts=parts, music_seconds=music_seconds)
    table = benchmark.markdown_table(report)
    out.print(table, highlight=False, markup=False)
    if docs is not None:
        benchmark.update_docs(docs, report, "muselab " + " ".join(sys.argv[1:]))
        out.print(f"wrote the table into {docs}", highlight=False)


@app.callback(invoke_without_command=True)
def _root(
    version: Annotated[bool, typer.Option("--version", help="Print the version and exit.")] = False,
) -> None:
    if version:
        out.print(f"muselab {__version__}")
        raise typer.Exit()


if __name__ == "__main__":
    main()
