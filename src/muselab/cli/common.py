"""What the commands share: the app, the consoles, exit codes, errors, and the options every
generating command and server takes."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Any, Literal

import typer
from rich.console import Console

from muselab.config import BackendChoice, DeviceChoice, DtypeChoice, Preset, QuantizeChoice, Settings, WorkersChoice

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
ServeBackendOpt = Annotated[
    Literal["auto", "torch", "openvino", "ray"] | None,
    typer.Option(
        help="What runs the image UNet and decoder and the music decoder: openvino (converted once, "
        "cached) or torch; auto = openvino on a CPU where installed (images: unless memory matters more). "
        "ray = --workers ray (each replica then picks as auto does)."
    ),
]
# Where generation runs (`muselab.workers`): `muselab serve` and `muselab ui` take these.
WorkersOpt = Annotated[
    WorkersChoice | None,
    typer.Option(
        help="local: in this process; ray: in Ray Serve replicas (the ray extra of muselab; docs/SCALING.md)."
    ),
]
RayAddressOpt = Annotated[
    str | None,
    typer.Option(help="With --workers ray: auto (the cluster `ray start` made here), HOST:PORT of its head, or local."),
]
ReplicasOpt = Annotated[
    str | None, typer.Option(help="With --workers ray: replicas per model, N or MIN-MAX (autoscaled); default 1.")
]
ReplicaCpusOpt = Annotated[float | None, typer.Option(help="With --workers ray: CPUs each replica reserves (1).")]
ReplicaGpusOpt = Annotated[float | None, typer.Option(help="With --workers ray: GPUs each replica reserves (0).")]


def worker_settings(
    backend: str | None,
    workers: str | None,
    ray_address: str | None,
    replicas: str | None,
    replica_cpus: float | None,
    replica_gpus: float | None,
) -> dict[str, Any]:
    """The settings the options above stand for; `--backend ray` is `--workers ray`."""
    if backend == "ray":
        backend, workers = None, "ray"
    return {
        "backend": backend,
        "workers": workers,
        "ray_address": ray_address,
        "ray_replicas": replicas,
        "ray_num_cpus": replica_cpus,
        "ray_num_gpus": replica_gpus,
    }


LowMemoryOpt = Annotated[
    bool | None,
    typer.Option(
        "--low-memory",
        help="Attention slicing, VAE tiling, CPU offload on CUDA, one model loaded at a time: less memory, slower.",
    ),
]
FromOpt = Annotated[
    Path | None, typer.Option("--from", help="Re-run the recipe stored in a file; other options override it.")
]
JsonOpt = Annotated[
    bool,
    typer.Option("--json", help="Print the result as JSON on stdout (progress as JSON lines on stderr)."),
]
# A string, not a Path: a Path drops the trailing slash that says "a folder" (`-o renders/`).
OutputOpt = Annotated[
    str | None,
    typer.Option(
        "--output", "-o", help="Output file, or folder (an existing one, or ending in /); default <data dir>/outputs."
    ),
]


class CliError(Exception):
    def __init__(self, message: str, code: int = 1):
        super().__init__(message)
        self.code = code


def settings_from(preset: str | None, device: str | None, dtype: str | None, offline: bool, **more: Any) -> Settings:
    overrides = {
        "preset": preset,
        "device": device,
        "dtype": dtype,
        "offline": True if offline else None,
        **more,
    }
    return Settings(**{key: value for key, value in overrides.items() if value is not None})
