"""`muselab history`, `jobs` and `info`: what was made, and the recipe a file carries."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from muselab.cli.common import (
    EXIT_BAD_INPUT,
    CliError,
    JsonOpt,
    app,
    err,
    out,
)
from muselab.config import Settings

history_app = typer.Typer(help="Past outputs, with their ratings: list and export.", invoke_without_command=True)
app.add_typer(history_app, name="history")


@history_app.callback()
def history(
    ctx: typer.Context,
    kind: Annotated[str | None, typer.Option(help="music or image")] = None,
    search: Annotated[str | None, typer.Option("--search", "-s", help="Text the prompt contains.")] = None,
    batch: Annotated[str | None, typer.Option(help="Only the outputs of this batch (its id).")] = None,
    limit: Annotated[int, typer.Option(min=1, max=1000)] = 20,
    as_json: JsonOpt = False,
) -> None:
    """List recent outputs, newest first."""
    if ctx.invoked_subcommand:
        return
    store = _store()
    records = store.list_outputs(kind=kind, text=search, batch_id=batch, limit=limit)
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
