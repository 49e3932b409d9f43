"""`muselab models`, `doctor` and `bench`: the catalogue, the machine, the speed."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Any, Literal

import typer
from rich.table import Table

from muselab import __version__
from muselab.cli.common import (
    EXIT_BAD_INPUT,
    EXIT_MODEL,
    CliError,
    JsonOpt,
    OfflineOpt,
    PresetOpt,
    QuantizeOpt,
    app,
    err,
    models_app,
    out,
    settings_from,
)
from muselab.config import Settings, hf_cache_dir
from muselab.families import catalogue


@models_app.command("list")
def models_list(as_json: JsonOpt = False) -> None:
    """The catalogue, and which models are already in the local cache (with their size)."""
    cached = _cached_repos()
    rows = []
    for entry in catalogue():
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

    from muselab.engines import ModelUnavailable, load_engine
    from muselab.families import catalogue_entry
    from muselab.quiet import quiet_libraries

    entry = catalogue_entry(model) if model else None
    kind = kind or (entry.kind if entry else "image")
    quiet_libraries()
    settings = settings_from(preset, "cpu", None, offline, quantize=quantize, backend="openvino")
    columns = [TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn()]
    with Progress(*columns, console=err) as progress:
        task = progress.add_task(f"Loading {model or settings.model_for(kind)}", total=None)

        def on_progress(event: Any) -> None:
            progress.update(task, description=event.note, completed=event.step, total=event.total)

        try:
            engine = load_engine(kind, settings, model, on_progress=on_progress)
        except ModelUnavailable as exc:
            raise CliError(str(exc), EXIT_MODEL) from None
    seconds = getattr(engine, "load_timings", {}).get("convert_s", 0.0)  # only engines with a conversion time it
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
        "models_present": {entry.id: entry.id in cached for entry in catalogue()},
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
            help="Parts to run, comma-separated: tiers (the speed tiers against the plain script), music, "
            "image (the default on PyTorch and with int8 weights beside it), fast (sd-turbo on PyTorch), "
            "int8-full and fast-int8-full (int8 activations for SD 1.x and for sd-turbo; their one-time "
            "calibration takes minutes), compiled (the UNet under torch.compile; in the default set on a "
            "CUDA GPU). Default: tiers, music (and compiled on a GPU)."
        ),
    ] = None,
    music_seconds: Annotated[float | None, typer.Option(help="Seconds of audio (default 5 quick, 10 full).")] = None,
) -> None:
    """Baseline (a plain diffusers/transformers script) against muselab's defaults, side by side, on
    full-size random-weight SD 1.x, sd-turbo and musicgen-small; nothing is downloaded."""
    from muselab import bench as benchmark

    parts = tuple(part.strip() for part in only.split(",") if part.strip()) if only else None
    known = ("tiers", "image", "fast", "music", "int8-full", "fast-int8-full", "compiled")
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
