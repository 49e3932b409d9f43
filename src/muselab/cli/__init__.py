"""The `muselab` command line: one module per group of commands; `generate` makes a command for
each kind of request from its family's schema."""

from __future__ import annotations

from typing import Annotated

import typer

from muselab import __version__
from muselab.cli.common import EXIT_BAD_INPUT, CliError, app, err, out
from muselab.cli.generate import add_commands
from muselab.families import PluginError

try:
    add_commands(app)  # first: `muselab --help` lists the generating commands first
    plugin_error: PluginError | None = None
except PluginError as exc:  # said by `main`, as any other error, rather than as a traceback on import
    plugin_error = exc

from muselab.cli import batch, cluster, history, models, serve, upscale  # noqa: F401  (their commands register on import)

__all__ = ["app", "main"]


def main() -> None:
    import sys

    try:
        if plugin_error is not None:
            raise CliError(str(plugin_error), EXIT_BAD_INPUT)
        app()
    except CliError as exc:
        err.print(f"[bold red]Error:[/] {exc}", highlight=False, soft_wrap=True)
        sys.exit(exc.code)


@app.callback(invoke_without_command=True)
def _root(
    version: Annotated[bool, typer.Option("--version", help="Print the version and exit.")] = False,
) -> None:
    if version:
        out.print(f"muselab {__version__}")
        raise typer.Exit()


if __name__ == "__main__":
    main()
