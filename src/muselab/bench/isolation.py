"""Each benchmark part in a process of its own, its figures back as JSON; progress lines and saving.

A part is a function of `muselab.bench`'s modules taking JSON-able keyword arguments and `say`, and
returning its figures. In a child process (`python -m muselab.bench module:function arguments`)
its peak memory is its own (an allocator keeps freed memory, so a second model in one process
starts from the first one's high-water mark) and it inherits no other part's warm caches.
"""

from __future__ import annotations

import importlib
import json
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

Say = Callable[[str], None]


def run_part(
    function: Callable[..., dict[str, Any]], arguments: dict[str, Any], isolate: bool, say: Say
) -> dict[str, Any]:
    """`function(**arguments)`, in a child process when `isolate`; its progress lines go to stderr
    as they come, its result comes back as JSON on stdout."""
    if not isolate:
        return function(say=say, **arguments)
    where = f"{function.__module__}:{function.__name__}"
    command = [sys.executable, "-m", "muselab.bench", where, json.dumps(arguments)]
    child = subprocess.run(command, stdout=subprocess.PIPE, text=True, check=False)
    if child.returncode != 0:
        raise RuntimeError(f"benchmark part {function.__name__} failed (exit {child.returncode}); its error is above")
    return json.loads(child.stdout.strip().splitlines()[-1])


def child_main(argv: list[str]) -> int:
    """A child's side of `run_part`: `argv` is the part (`module:function`) and its JSON arguments."""
    from muselab.devices import flush_denormals
    from muselab.quiet import quiet_libraries

    flush_denormals()  # as muselab's job workers run (before any tensor operation of this process)
    quiet_libraries()
    (module, name), arguments = argv[0].split(":"), json.loads(argv[1])
    result = getattr(importlib.import_module(module), name)(say=say_to_stderr, **arguments)
    print(json.dumps(result, default=json_default))
    return 0


def save(report: dict[str, Any], path: Path | None) -> None:
    if path is not None:
        tmp = Path(path).with_suffix(".tmp")
        tmp.write_text(json.dumps(report, indent=2, default=json_default) + "\n")
        tmp.replace(path)


def json_default(value: Any) -> Any:
    return str(value)


def say_with_time(text: str, stream: Any = None) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {text}", file=stream or sys.stdout, flush=True)


def say_to_stderr(text: str) -> None:
    """A child's progress lines: its stdout carries only the JSON result."""
    say_with_time(text, sys.stderr)
