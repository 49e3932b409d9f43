"""The shape docs/ARCHITECTURE.md describes, held: imports go one way (no cycles, counting the
imports inside functions), no module grows past a page or two, and the job service names no
model family."""

from __future__ import annotations

import ast
from pathlib import Path

import muselab

PACKAGE = Path(muselab.__file__).parent
#: A module longer than this is more than one thing; split it (docs/ARCHITECTURE.md says where).
MAX_LINES = 620


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path, modules: set[str]) -> set[str]:
    """The package's modules `path` imports, anywhere in it (a function-level import is an edge too)."""
    found: set[str] = set()
    package = module_name(path) if path.name == "__init__.py" else module_name(path).rpartition(".")[0]
    tree = ast.parse(path.read_text())
    typing_only = {
        id(inner)
        for node in ast.walk(tree)
        if isinstance(node, ast.If) and ast.unparse(node.test) in ("TYPE_CHECKING", "typing.TYPE_CHECKING")
        for inner in ast.walk(node)
    }
    for node in ast.walk(tree):
        if id(node) in typing_only:  # annotations only: never run
            continue
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(
                    package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else [])
                )
            names = [base] + [f"{base}.{alias.name}" for alias in node.names]
        else:
            continue
        for name in names:
            # The deepest module of the package the name reaches (a.b.c -> a.b if c is a function).
            while name and name not in modules:
                name = name.rpartition(".")[0]
            if name and name != module_name(path):
                found.add(name)
    return found


def import_graph() -> dict[str, set[str]]:
    paths = list(PACKAGE.rglob("*.py"))
    modules = {module_name(path) for path in paths}
    graph = {module_name(path): imports_of(path, modules) for path in paths}
    # Importing a.b.c runs a/__init__ and a/b/__init__ first; those are not edges of a.b.c's own.
    return {name: {edge for edge in edges if not name.startswith(edge + ".")} for name, edges in graph.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for edge in sorted(graph.get(node, ())):
            if state.get(edge) == 1:
                return [*stack[stack.index(edge) :], edge]
            if edge not in state and (cycle := visit(edge)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_no_import_cycles_even_through_function_level_imports():
    assert find_cycle(import_graph()) is None


def test_the_cycle_finder_finds_one():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]


def test_no_module_is_longer_than_a_page_or_two():
    long = {module_name(p): n for p in PACKAGE.rglob("*.py") if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert long == {}


def test_the_job_service_and_the_front_ends_know_no_model_family():
    """They run whatever the registry holds: no import of a family's engine or of the libraries
    behind them, and the job service names no request type of a family."""
    family_modules = (
        "diffusers",
        "transformers",
        "muselab.engines.image",
        "muselab.engines.music",
        "muselab.engines.scene",
    )
    for name in ("jobs.py", "store.py", "media.py", "families.py", "api", "ui"):
        for path in [PACKAGE / name] if name.endswith(".py") else (PACKAGE / name).rglob("*.py"):
            tree = ast.parse(path.read_text())
            for node in ast.walk(tree):
                if isinstance(node, ast.ImportFrom | ast.Import):
                    names = [node.module or ""] if isinstance(node, ast.ImportFrom) else [a.name for a in node.names]
                    assert not [n for n in names if n.startswith(family_modules)], f"{path}: imports {names}"
                if name == "jobs.py" and isinstance(node, ast.Name):
                    assert node.id not in ("MusicRequest", "ImageRequest", "SceneRequest"), f"jobs.py names {node.id}"
