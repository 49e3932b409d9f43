"""A prompt list, as `muselab batch FILE`, `POST /api/batches` and the studio's Batch page take it.

Either one prompt a line with optional options after it, in the style of A1111's "prompts from
file or textbox" script:

    a red fox in snow --steps 20 --seed 5
    --prompt "a lighthouse at dusk" --negative_prompt "blurry" --cfg_scale 6
    lo-fi beat with warm piano --kind music -d 8

or JSON Lines, one whole request an object (`{"kind": "music", "prompt": ..., "duration": 8}`),
kinds mixed (a text list may have such lines too). Blank lines and lines starting with # are
skipped. The options are the request's fields by name (`--negative_prompt`), by their
command-line flags (`--negative`, `-d`) or by the A1111 names the script takes (`--cfg_scale`,
`--sampler_name`, `--batch_size`, `--sd_model`). Every error names its line.
"""

from __future__ import annotations

import json
import shlex
import typing
from typing import Any

from muselab.families import family, kinds
from muselab.schemas import RequestError, field_option, parse_request

#: A1111's script options, by the request field each stands for.
A1111_NAMES = {
    "cfg_scale": "guidance",
    "sampler_name": "scheduler",
    "sampler_index": "scheduler",
    "batch_size": "num_images",
    "sd_model": "model",
    "negative": "negative_prompt",
}


def is_jsonl(text: str) -> bool:
    """JSON Lines (every line a request) when the first line is a JSON object; in a text list, a
    line may still be one. `{red|green} fox` is a dynamic prompt, not JSON."""
    first = next((line for line in text.splitlines() if line.strip() and not _comment(line)), "")
    return _is_json_object(first)


def _is_json_object(line: str) -> bool:
    try:
        return line.lstrip().startswith("{") and isinstance(json.loads(line), dict)
    except json.JSONDecodeError:
        return False


def _comment(line: str) -> bool:
    return line.lstrip().startswith("#")


def parse(text: str, kind: str = "image") -> list[Any]:
    """The requests of a prompt list (text or JSON Lines), each checked against its kind's schema;
    a RequestError names the first bad line and what it takes."""
    if kind not in kinds():
        raise RequestError(f"Invalid request:\n  - kind: must be one of {', '.join(kinds())} (got {kind!r})")
    requests = []
    jsonl = is_jsonl(text)
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip() or _comment(line):
            continue
        try:
            data = _json_line(line) if jsonl else line_fields(line, kind)
            line_kind = data.setdefault("kind", kind)
            if line_kind not in kinds():
                raise RequestError(f"Invalid request:\n  - kind: must be one of {', '.join(kinds())}")
            requests.append(parse_request(family(line_kind).request, data))
        except RequestError as exc:
            raise RequestError(f"line {number}: {exc}") from None
    if not requests:
        raise RequestError("Invalid request:\n  - the prompt list holds no prompt (one a line; # starts a comment)")
    return requests


def parse_items(items: list[Any], kind: str = "image") -> list[Any]:
    """Requests given as JSON objects (`POST /api/batches`' `items`), each with its kind or `kind`."""
    requests = []
    for index, data in enumerate(items):
        if not isinstance(data, dict):
            raise RequestError(f"Invalid request:\n  - items[{index}]: must be a request (a JSON object)")
        item_kind = data.get("kind", kind)
        if item_kind not in kinds():
            raise RequestError(f"Invalid request:\n  - items[{index}].kind: must be one of {', '.join(kinds())}")
        try:
            requests.append(parse_request(family(item_kind).request, {**data, "kind": item_kind}))
        except RequestError as exc:
            raise RequestError(f"items[{index}]: {exc}") from None
    return requests


def line_fields(line: str, kind: str = "image") -> dict[str, Any]:
    """The fields one line of a text list gives (a JSON object line, or a prompt and its options),
    before the schema checks them."""
    return _json_line(line) if _is_json_object(line) else _text_line(line, kind)


def _json_line(line: str) -> dict[str, Any]:
    try:
        data = json.loads(line)
    except json.JSONDecodeError as exc:
        raise RequestError(f"Invalid request:\n  - not a JSON object ({exc.msg}, column {exc.colno})") from None
    if not isinstance(data, dict):
        raise RequestError("Invalid request:\n  - a JSON Lines list holds one JSON object (a request) a line")
    return data


def _text_line(line: str, kind: str) -> dict[str, Any]:
    """A prompt and its options: the text before the first ` --` is the prompt as written (quotes and
    apostrophes kept); what follows is split as a shell would."""
    stripped = line.strip()
    cut = 0 if stripped.startswith("--") else stripped.find(" --")
    prompt, rest = (stripped, "") if cut < 0 else (stripped[:cut].strip(), stripped[cut:])
    try:
        tokens = shlex.split(rest)
    except ValueError as exc:
        raise RequestError(f"Invalid request:\n  - the options: {exc} (quote a value with spaces)") from None
    given_kind = _take(tokens, "--kind") or kind
    data: dict[str, Any] = _options(tokens, given_kind)
    if prompt and "prompt" not in data:
        data["prompt"] = prompt
    return {**data, "kind": given_kind}


def _take(tokens: list[str], flag: str) -> str | None:
    if flag in tokens:
        index = tokens.index(flag)
        if index + 1 < len(tokens):
            value = tokens[index + 1]
            del tokens[index : index + 2]
            return value
    return None


def _options(tokens: list[str], kind: str) -> dict[str, Any]:
    if kind not in kinds():
        raise RequestError(f"Invalid request:\n  - kind: must be one of {', '.join(kinds())} (got {kind!r})")
    request_type = family(kind).request
    flags = option_fields(request_type)
    data: dict[str, Any] = {}
    index = 0
    while index < len(tokens):
        token = tokens[index]
        name, _, inline = token.partition("=")
        target = flags.get(name)
        if target is None:
            known = ", ".join(
                (field_option(info).flags or (f"--{field.replace('_', '-')}",))[0].split("/")[0]
                for field, info in request_type.model_fields.items()
                if field != "kind"
            )
            raise RequestError(f"Invalid request:\n  - {token}: not an option of {kind} requests; they are {known}")
        field, value = target
        info = request_type.model_fields[field]
        if value is not None:  # a switch: --hires, --no-hires
            data[field] = value
            index += 1
            continue
        if inline:
            given, index = inline, index + 1
        elif index + 1 < len(tokens):
            given, index = tokens[index + 1], index + 2
        else:
            raise RequestError(f"Invalid request:\n  - {name}: give it a value")
        if typing.get_origin(info.annotation) is list or "list" in str(info.annotation):
            data.setdefault(field, []).append(given)
        else:
            data[field] = given
    return data


def option_fields(request_type: Any) -> dict[str, tuple[str, Any]]:
    """Each option a line may use (`--steps`, `-d`, `--cfg_scale`): the field, and for a switch the
    value it sets. A grid's axes name their fields by the same options (`grid.Axis.parse`)."""
    flags: dict[str, tuple[str, Any]] = {}
    for field, info in request_type.model_fields.items():
        if field == "kind":
            continue
        option = field_option(info)
        boolean = info.annotation is bool
        on, off = option.switch if option.switch is not None else (True, False)
        for name in {field, field.replace("_", "-")}:
            flags[f"--{name}"] = (field, on if boolean or option.switch is not None else None)
            if boolean or option.switch is not None:
                flags[f"--no-{name.replace('_', '-')}"] = (field, off)
        for flag in option.flags:
            parts = flag.split("/")
            if len(parts) == 2:  # "--fast-decoder/--full-decoder"
                flags[parts[0]], flags[parts[1]] = (field, on), (field, off)
            else:
                flags[flag] = (field, on if boolean else None)
    for a1111, field in A1111_NAMES.items():
        if field in request_type.model_fields and f"--{a1111}" not in flags:
            flags[f"--{a1111}"] = flags[f"--{field}"]
    return flags
