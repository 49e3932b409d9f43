"""`muselab serve` (the HTTP API) and `muselab ui` (the studio)."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from muselab.cli.common import (
    EXIT_BAD_INPUT,
    CliError,
    DeviceOpt,
    DtypeOpt,
    LowMemoryOpt,
    OfflineOpt,
    PresetOpt,
    QuantizeOpt,
    RayAddressOpt,
    ReplicaCpusOpt,
    ReplicaGpusOpt,
    ReplicasOpt,
    ServeBackendOpt,
    WorkersOpt,
    app,
    err,
    settings_from,
    worker_settings,
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


def _create_app(settings: Any) -> Any:
    """The API app; a Ray cluster that is missing, or Ray itself, is a clear error, not a traceback."""
    from muselab.api import create_app
    from muselab.workers import ClusterUnavailable

    try:
        return create_app(settings)
    except (ClusterUnavailable, ImportError) as exc:
        raise CliError(str(exc), EXIT_BAD_INPUT) from None


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
    backend: ServeBackendOpt = None,
    low_memory: LowMemoryOpt = None,
    workers: WorkersOpt = None,
    ray_address: RayAddressOpt = None,
    replicas: ReplicasOpt = None,
    replica_cpus: ReplicaCpusOpt = None,
    replica_gpus: ReplicaGpusOpt = None,
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

    from muselab.api.security import is_loopback, protocol_with_timeout

    settings = settings_from(
        preset,
        device,
        dtype,
        offline,
        host=host,
        port=port,
        api_token=token,
        quantize=quantize,
        low_memory=low_memory,
        job_timeout=job_timeout,
        allow_any_model=allow_any_model,
        **worker_settings(backend, workers, ray_address, replicas, replica_cpus, replica_gpus),
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
    app_ = _create_app(settings)
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
    backend: ServeBackendOpt = None,
    low_memory: LowMemoryOpt = None,
    workers: WorkersOpt = None,
    ray_address: RayAddressOpt = None,
    replicas: ReplicasOpt = None,
    replica_cpus: ReplicaCpusOpt = None,
    replica_gpus: ReplicaGpusOpt = None,
) -> None:
    """Start the Streamlit studio (Home, Music, Image, Scene, Gallery) in your browser."""
    from muselab.api.security import is_loopback

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
        "MUSELAB_LOW_MEMORY": "1" if low_memory else None,
        "MUSELAB_OFFLINE": "1" if offline else None,
        "MUSELAB_UI_API_URL": api_url,
        "MUSELAB_API_TOKEN": token,
    }.items():
        if value is not None:
            env[name] = value
    for name, value in worker_settings(backend, workers, ray_address, replicas, replica_cpus, replica_gpus).items():
        if value is not None:
            env[f"MUSELAB_{name.upper()}"] = str(value)
    for name in ("MUSELAB_DATA_DIR", "MUSELAB_OUTPUT_DIR"):
        if env.get(name):
            env[name] = str(Path(env[name]).expanduser().resolve())  # the studio runs from its own folder
    folder = Path(__file__).parents[1] / "ui"
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
