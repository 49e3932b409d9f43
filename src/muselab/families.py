"""Model families: the one place a kind of generation is declared.

A family says which request it takes (its schema: every field with its bounds, default and help),
how to load its engine, which models it serves (catalogue entries, or folders whose config names
one of its architectures), how many progress steps a request takes before its model is loaded,
and how to build a tiny random-weight model of it. The CLI, the API, the studio, the job service
and the tiny-model builder all read the registry, so a new family is one module:

    FAMILY = Family(name="chime", kind="chime", request=ChimeRequest, load=load, output="audio", ...)

(docs/examples/ holds a whole toy family, one file, and docs/ARCHITECTURE.md says how to add one.)

Built-in families are listed in `BUILT_IN`; others come from the `muselab.families` entry point
group of an installed package, or from modules named in `MUSELAB_PLUGINS` (comma-separated).
Each such module defines `FAMILY` (or `FAMILIES`, a sequence).
"""

from __future__ import annotations

import functools
import importlib
import json
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    from muselab.config import Settings
    from muselab.engines.base import Engine, ProgressCallback
    from muselab.schemas import BaseRequest

BUILT_IN = ("muselab.engines.music.family", "muselab.engines.image.family", "muselab.engines.scene")
ENTRY_POINT_GROUP = "muselab.families"


class PluginError(RuntimeError):
    """A model family named by the environment or an entry point cannot be used."""


@dataclass(frozen=True)
class CatalogueEntry:
    """A model muselab knows by name, with the defaults that suit it."""

    id: str
    kind: str
    description: str
    default: bool = False
    # Images: sampler defaults. Distilled models need few steps and no guidance.
    steps: int | None = None
    guidance: float | None = None
    scheduler: str | None = None


@dataclass(frozen=True)
class TinyModel:
    """A tiny random-weight model a family builds offline: same classes and folder layout as a real
    checkpoint, so tests and `--preset tiny` go through the real loading code."""

    folder: str  # its folder's name under the tiny-models folder
    #: Writes the model to a folder and returns it; `replace=False` keeps one that appeared meanwhile.
    build: Callable[[Path, bool], Path]
    #: A second model for this kind of request (the tiny melody model, for music): served to
    #: clients beside the configured one when the preset is tiny.
    also_serves: str | None = None


@dataclass(frozen=True)
class Family:
    """One kind of generation and the engine that does it. Several families may make one kind
    (two music model families, say): they share its request, and `loader_for` picks by model."""

    name: str  # "musicgen", "stable-diffusion": unique
    kind: str  # the request's `kind`: the CLI command, the API route (/api/jobs/KIND), the studio page
    request: type[BaseRequest]
    #: Loads an engine for a model (hub id or folder). Not called for a composite family.
    load: Callable[[str, Settings, ProgressCallback | None], Engine] | None
    output: Literal["audio", "image", "video"]  # what its files hold
    title: str  # "Music": the studio page's and the CLI command's name for people
    summary: str  # one line for `muselab KIND --help`, with an example
    unit: str = "steps"  # what its progress counts ("audio tokens", "denoising steps")
    icon: str = ":material/auto_awesome:"  # the studio's icon for its page (Material Symbols)
    catalogue: tuple[CatalogueEntry, ...] = ()
    #: Config class names (a folder's `model_index.json` `_class_name`, or `config.json`
    #: `architectures`) it loads: how a folder that is not in the catalogue finds its family.
    architectures: tuple[str, ...] = ()
    #: Tiny models by the kind of model each stands in for (the family's own kind, and any part it
    #: loads beside its main model, such as the image family's "decoder").
    tiny: dict[str, TinyModel] = field(default_factory=dict)
    #: The progress steps a request takes, known before its model is loaded (a scene's bar adds up
    #: its parts before loading the second); at least what the loaded engine will count.
    max_steps: Callable[[Any], int] | None = None
    #: A composite family runs other families' engines (a scene: a picture, then its soundtrack):
    #: `compose(parts, request, settings)` makes its engine, a context manager, where
    #: `parts(kind, model)` lends a loaded engine; the request's model fields name ids or folders.
    compose: Callable[[Any], Engine] | None = None
    #: Settings its command-line command offers besides the shared ones (device, dtype, ...).
    settings: tuple[str, ...] = ()
    #: `check(request, settings)` looks at what a request names on this machine before it queues
    #: (the LoRA files an image request names) and returns it as it should queue; raises RequestError.
    check: Callable[[Any, Settings], Any] | None = None
    #: `estimate(request, settings, runs)`: how long the request would take here, per speed tier
    #: (`runs`: this machine's finished jobs of the kind, `HistoryStore.run_times`).
    estimate: Callable[[Any, Settings, list[dict[str, Any]]], dict[str, Any]] | None = None

    @property
    def default_model(self) -> str | None:
        return next((entry.id for entry in self.catalogue if entry.default), None)


def lazy(target: str) -> Callable[..., Any]:
    """`"module:function"` as a function that imports its module on first call: a registration
    names its loader and tiny builder without importing torch and the model libraries."""
    module_name, _, function_name = target.partition(":")

    def call(*args: Any, **kwargs: Any) -> Any:
        return getattr(importlib.import_module(module_name), function_name)(*args, **kwargs)

    call.__name__ = call.__qualname__ = function_name
    return call


_EXTRA: list[Family] = []


def register(family: Family) -> None:
    """Add a family from code (tests, notebooks); modules found at start-up register by `FAMILY`."""
    _EXTRA.append(family)
    _families.cache_clear()


def families() -> tuple[Family, ...]:
    return _families()


@functools.cache
def _families() -> tuple[Family, ...]:
    found: dict[str, Family] = {}
    for module_name in (*BUILT_IN, *_plugin_modules()):
        try:
            module = importlib.import_module(module_name)
            declared_families = getattr(module, "FAMILIES", None) or [module.FAMILY]
        except (ImportError, AttributeError) as exc:
            raise PluginError(
                f"The model family module '{module_name}' (from MUSELAB_PLUGINS or the '{ENTRY_POINT_GROUP}' "
                f"entry points) could not be used: {type(exc).__name__}: {exc}. It must be importable and "
                "define FAMILY (or FAMILIES)."
            ) from None
        for declared in declared_families:
            found.setdefault(declared.name, declared)
    for declared in _EXTRA:
        found[declared.name] = declared
    return tuple(found.values())


def _plugin_modules() -> list[str]:
    from importlib.metadata import entry_points

    names = [entry.value for entry in entry_points(group=ENTRY_POINT_GROUP)]
    names += [name.strip() for name in os.environ.get("MUSELAB_PLUGINS", "").split(",") if name.strip()]
    return names


def kinds() -> tuple[str, ...]:
    """Every kind of request, in registration order: music, image, scene, then plugins'."""
    return tuple(dict.fromkeys(candidate.kind for candidate in families()))


def family(kind: str) -> Family:
    """The first family of `kind`: its request, title and output stand for the kind."""
    for candidate in families():
        if candidate.kind == kind:
            return candidate
    raise KeyError(f"no model family makes '{kind}'; known kinds: {', '.join(kinds())}")


def request_types() -> dict[str, type[BaseRequest]]:
    """Every kind's request schema, by kind (what the API's routes and the CLI's commands take)."""
    return {kind: family(kind).request for kind in kinds()}


def model_kinds() -> tuple[str, ...]:
    """Every kind of model a family loads or builds: the families' own and their parts ("decoder")."""
    names = list(dict.fromkeys(candidate.kind for candidate in families() if candidate.compose is None))
    names += [kind for candidate in families() for kind in candidate.tiny if kind not in names]
    return tuple(names)


def catalogue(kind: str | None = None) -> tuple[CatalogueEntry, ...]:
    """The models muselab knows by name, every family's (or one kind's)."""
    return tuple(entry for candidate in families() for entry in candidate.catalogue if kind in (None, entry.kind))


def catalogue_entry(model_id: str) -> CatalogueEntry | None:
    return next((entry for entry in catalogue() if entry.id == model_id), None)


def tiny_models() -> dict[str, TinyModel]:
    """Every family's tiny models, by the kind of model each stands in for."""
    return {kind: tiny for candidate in families() for kind, tiny in candidate.tiny.items()}


def loader_for(kind: str, model: str) -> Family:
    """The family that loads `model` for `kind`: by catalogue entry, then by the architecture a
    folder's config names, else the first family of that kind."""
    candidates = [candidate for candidate in families() if candidate.kind == kind and candidate.load is not None]
    if not candidates:
        raise KeyError(f"no model family loads '{kind}' models; known kinds: {', '.join(kinds())}")
    entry = catalogue_entry(model)
    if entry is not None:
        return next((candidate for candidate in candidates if entry in candidate.catalogue), candidates[0])
    architectures = folder_architectures(Path(model).expanduser())
    return next((c for c in candidates if architectures & set(c.architectures)), candidates[0])


def folder_architectures(folder: Path) -> set[str]:
    """The class names a saved model's config gives (diffusers' `_class_name`, transformers'
    `architectures`); empty for anything that is not such a folder."""
    names: set[str] = set()
    for config_name in ("model_index.json", "config.json"):
        try:
            config = json.loads((folder / config_name).read_text())
        except (OSError, ValueError):
            continue
        if isinstance(config, dict):
            names.update(str(name) for name in config.get("architectures") or [])
            if config.get("_class_name"):
                names.add(str(config["_class_name"]))
    return names
