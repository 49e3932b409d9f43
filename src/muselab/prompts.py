"""Dynamic prompts, through the `dynamicprompts` library (the A1111 extension's own engine):
`{red|green|blue} fox` picks one, `{2$$a|b|c}` two, `__animal__` a line of `animal.txt` in the
wildcards folder (`Settings.wildcards`, sub-folders as `__folder/name__`).

Random mode makes one prompt (a single job: the request's seed picks, so a seed remakes it);
combinatorial mode makes every prompt (a batch: one job each). Only the expanded prompt goes on:
it is what the job, its history and its recipe hold.
"""

from __future__ import annotations

import random
import re
from pathlib import Path
from typing import Any, Literal

from muselab.schemas import MAX_PROMPT_CHARS, RequestError

DynamicMode = Literal["random", "combinatorial"]
#: Templated fields: the prompts. Other text fields (model names, upload references) are not.
TEMPLATED = ("prompt", "negative_prompt", "music_prompt")

_WILDCARD = re.compile(r"__([\w\-/. ]+?)__")


def is_template(text: str | None) -> bool:
    """Whether `text` asks for expansion at all: a plain prompt never reaches the library, so it
    runs exactly as written."""
    return bool(text) and ("{" in text or _WILDCARD.search(text) is not None)  # type: ignore[operator]


def expand(
    template: str,
    mode: DynamicMode,
    wildcards: Path,
    *,
    seed: int | None = None,
    limit: int = 1000,
    field: str = "prompt",
) -> list[str]:
    """The prompts `template` stands for: one (random) or all (combinatorial, at most `limit`)."""
    if not is_template(template):
        return [template]
    from dynamicprompts.generators import CombinatorialPromptGenerator, RandomPromptGenerator
    from dynamicprompts.wildcards import WildcardManager

    manager = WildcardManager(wildcards)
    _check_wildcards(template, manager, wildcards, field)
    try:
        if mode == "combinatorial":
            prompts = list(CombinatorialPromptGenerator(manager).generate(template, max_prompts=limit + 1))
        else:
            rng_seed = seed if seed is not None else random.SystemRandom().randrange(2**32)
            prompts = list(RandomPromptGenerator(manager, seed=rng_seed).generate(template, 1))
    except Exception as exc:  # pyparsing's errors for an unclosed brace and the like
        raise RequestError(
            f"Invalid request:\n  - {field}: not a dynamic prompt muselab can read ({exc}); variants are written "
            "{a|b|c}, wildcards __name__, and a literal brace as \\{"
        ) from None
    if len(prompts) > limit:
        raise RequestError(
            f"Invalid request:\n  - {field}: the template makes more than {limit} prompts; "
            "take fewer variants, or raise MUSELAB_MAX_BATCH_ITEMS"
        )
    prompts = [prompt.strip() for prompt in prompts]
    for prompt in prompts:
        if not prompt or len(prompt) > MAX_PROMPT_CHARS:
            raise RequestError(
                f"Invalid request:\n  - {field}: the template makes {prompt[:60]!r}, which is not a prompt of "
                f"1 to {MAX_PROMPT_CHARS} characters"
            )
    return prompts


def _check_wildcards(template: str, manager: Any, folder: Path, field: str) -> None:
    """A wildcard with no file is an error here: the library would keep `__name__` as text."""
    for name in _WILDCARD.findall(template):
        values = [] if ".." in name else manager.get_values(name)
        if not list(values):
            known = sorted(manager.get_collection_names())
            listed = ", ".join(f"__{known_name}__" for known_name in known[:20]) or "none yet"
            raise RequestError(
                f"Invalid request:\n  - {field}: no wildcard file for __{name}__ (a {name}.txt in the wildcards "
                f"folder, MUSELAB_WILDCARD_DIR, one choice a line); the wildcards are: {listed}"
            )


def expand_one(request: Any, settings: Any) -> Any:
    """`request` with each templated field expanded at random (its seed picks); as it is when no
    field is a template or the settings turn dynamic prompts off."""
    if not settings.dynamic_prompts:
        return request
    updates = {}
    for index, name in enumerate(TEMPLATED):
        value = getattr(request, name, None)
        if is_template(value):
            seed = None if request.seed is None else request.seed + index
            updates[name] = expand(value, "random", settings.wildcards, seed=seed, field=name)[0]
    return request.model_copy(update=updates) if updates else request


def expand_all(request: Any, settings: Any, limit: int) -> list[Any]:
    """Every request `request`'s prompt template stands for (combinatorial); its other templated
    fields are picked at random per request, as in `expand_one`."""
    if not settings.dynamic_prompts or not is_template(request.prompt):
        return [request]
    prompts = expand(request.prompt, "combinatorial", settings.wildcards, limit=limit)
    return [request.model_copy(update={"prompt": prompt}) for prompt in prompts]
