"""The `muselab` command line: one module per group of commands; `generate` makes a command for
each kind of request from its family's schema."""

from __future__ import annotations

from typing import Annotated

import typer

from muselab import __version__
from muselab.cli.common import CliError, app, err, out
from muselab.cli.generate import add_commands

add_commands(app)  # first: `muselab --help` lists the generating commands first

from muselab.cli import history, models, serve  # noqa: E402, F401  (their commands register on import)

__all__ = ["app", "main"]


def main() -> None:
    import sys

    try:
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
