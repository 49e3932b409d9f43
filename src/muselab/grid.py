"""Comparison grids (A1111's X/Y plot): one request, any of its fields varied along an x and an
optional y axis, every cell a normal job and output; for pictures, one labelled grid PNG too.

`Axis.parse("steps=10,20,30", ImageRequest)` reads an axis (`prompt_sr=fox,cat` is A1111's Prompt
S/R: each value in turn replaces the first one in the prompt) (values split as CSV, so a value with a
comma is quoted); `cell_requests` makes the cells, row by row, all with one seed so that only the
axes differ; `draw` lays the cells out under their column labels and beside their row labels.
"""

from __future__ import annotations

import csv
import random
from dataclasses import dataclass
from typing import Any

from muselab.schemas import MAX_SEED, RequestError, parse_request

#: Per-axis values; past this a grid is a batch of many hundreds and unreadable as one picture.
MAX_AXIS_VALUES = 32
LABEL_PADDING = 8
FONT_SIZE = 16


@dataclass(frozen=True)
class Axis:
    field: str
    values: tuple[Any, ...]

    @classmethod
    def parse(cls, text: Any, request_type: Any, name: str = "x") -> Axis:
        """An axis from "FIELD=V1,V2,..." or {"field": ..., "values": [...]}; the field is a request
        field's name or one of its command-line flags (`--negative` or `negative`)."""
        if isinstance(text, dict):
            field, values = str(text.get("field", "")), list(text.get("values") or [])
        else:
            field, _, rest = str(text).partition("=")
            values = next(csv.reader([rest], skipinitialspace=True), []) if rest.strip() else []
        if not field.strip():
            raise RequestError(f"Invalid request:\n  - {name}: give FIELD=V1,V2,... (for example steps=10,20,30)")
        field = _field_name(field.strip(), request_type, name)
        values = [value.strip() if isinstance(value, str) else value for value in values]
        if not values or any(value in ("", None) for value in values):
            raise RequestError(f"Invalid request:\n  - {name}: give {field}=V1,V2,... with at least one value")
        if len(values) > MAX_AXIS_VALUES:
            raise RequestError(f"Invalid request:\n  - {name}: at most {MAX_AXIS_VALUES} values an axis")
        return cls(field, tuple(values))

    def public(self) -> dict[str, Any]:
        return {"field": self.field, "values": list(self.values)}

    def label(self, value: Any) -> str:
        return str(value) if self.field == PROMPT_SR else f"{self.field}: {value}"


#: A1111's "Prompt S/R" axis: each value in turn replaces the first value where it stands in the prompt.
PROMPT_SR = "prompt_sr"


def _field_name(given: str, request_type: Any, axis: str) -> str:
    from muselab.prompt_list import option_fields

    key = given.lstrip("-")
    if key.lower() in ("prompt_sr", "prompt-sr", "sr", "prompt s/r"):
        return PROMPT_SR
    options = option_fields(request_type)
    target = options.get(f"--{key}") or options.get(f"-{key}")
    found = target[0] if target else None
    if found is None:
        fields = ", ".join(name for name in request_type.model_fields if name != "kind")
        raise RequestError(
            f"Invalid request:\n  - {axis}: {given!r} is not a field of {request_type.model_fields['kind'].default} "
            f"requests; they are {fields}"
        )
    return found


def cell_requests(base: dict[str, Any], request_type: Any, x: Axis, y: Axis | None) -> tuple[list[Any], int]:
    """Every cell's request, row by row (y outer, x inner), and the seed they share: the base's, or
    one picked now, so that a cell differs from its neighbours by its axes only. A value the field
    does not take is refused naming its axis, before any cell runs."""
    seed = base.get("seed")
    if seed is None:
        seed = random.SystemRandom().randrange(MAX_SEED + 1)
    cells = []
    for row, y_value in enumerate(y.values if y else (None,)):
        for column, x_value in enumerate(x.values):
            data = {**base, "seed": seed}
            try:
                for axis, value in ((x, x_value), (y, y_value)):
                    if axis is not None:
                        _apply(data, axis, value)
                cells.append(parse_request(request_type, data))
            except RequestError as exc:
                where = f"x={x_value!r}" + (f", y={y_value!r}" if y is not None else "")
                raise RequestError(f"{exc}\n  (the cell at {where}, column {column + 1}, row {row + 1})") from None
    return cells, seed


def _apply(data: dict[str, Any], axis: Axis, value: Any) -> None:
    if axis.field != PROMPT_SR:
        data[axis.field] = value
        return
    search, prompt = str(axis.values[0]), str(data.get("prompt") or "")
    if search not in prompt:
        raise RequestError(
            f"Invalid request:\n  - prompt_sr: the first value, {search!r}, must be in the prompt ({prompt[:80]!r}); "
            "each value replaces it in turn (A1111's Prompt S/R)"
        )
    data["prompt"] = prompt.replace(search, str(value))


@dataclass(frozen=True)
class Layout:
    """Where things go in a grid picture: the label column on the left, the label row on top."""

    cell: tuple[int, int]
    columns: int
    rows: int
    left: int
    top: int

    @property
    def size(self) -> tuple[int, int]:
        return self.left + self.columns * self.cell[0], self.top + self.rows * self.cell[1]

    def origin(self, column: int, row: int) -> tuple[int, int]:
        return self.left + column * self.cell[0], self.top + row * self.cell[1]


def _font() -> Any:
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=FONT_SIZE)
    except TypeError:  # Pillow before 10.1 has one bitmap size
        return ImageFont.load_default()


def layout(cell: tuple[int, int], x: Axis, y: Axis | None) -> Layout:
    """The space the labels need: the widest row label, and the tallest wrapped column label."""
    from PIL import Image, ImageDraw

    font, measure = _font(), ImageDraw.Draw(Image.new("RGB", (1, 1)))
    line_height = measure.textbbox((0, 0), "Ag", font=font)[3] + 4
    column_lines = max(len(_wrap(x.label(value), cell[0] - 2 * LABEL_PADDING, font, measure)) for value in x.values)
    top = column_lines * line_height + 2 * LABEL_PADDING
    left = 0
    if y is not None:
        widest = max(measure.textlength(y.label(value), font=font) for value in y.values)
        left = int(min(widest, 2 * cell[0])) + 2 * LABEL_PADDING
    return Layout(cell, len(x.values), len(y.values) if y else 1, left, top)


def _wrap(text: str, width: int, font: Any, measure: Any) -> list[str]:
    lines, line = [], ""
    for word in text.split():
        candidate = f"{line} {word}".strip()
        if line and measure.textlength(candidate, font=font) > width:
            lines.append(line)
            line = word
        else:
            line = candidate
    return [*lines, line] if line else lines or [""]


def draw(cells: list[Any | None], x: Axis, y: Axis | None) -> Any:
    """The grid picture: `cells` row by row (None for a cell that made no picture, shown grey and
    marked), the x labels above the columns, the y labels left of the rows."""
    from PIL import Image, ImageDraw

    made = [cell for cell in cells if cell is not None]
    size = made[0].size if made else (256, 256)
    plan = layout(size, x, y)
    grid = Image.new("RGB", plan.size, "white")
    pen, font = ImageDraw.Draw(grid), _font()
    line_height = pen.textbbox((0, 0), "Ag", font=font)[3] + 4
    for column, value in enumerate(x.values):
        left, _ = plan.origin(column, 0)
        for index, line in enumerate(_wrap(x.label(value), size[0] - 2 * LABEL_PADDING, font, pen)):
            width = pen.textlength(line, font=font)
            pen.text((left + (size[0] - width) / 2, LABEL_PADDING + index * line_height), line, fill="black", font=font)
    for row in range(plan.rows):
        if y is not None:
            _, top = plan.origin(0, row)
            pen.text(
                (LABEL_PADDING, top + size[1] / 2 - line_height / 2), y.label(y.values[row]), fill="black", font=font
            )
        for column in range(plan.columns):
            cell = cells[row * plan.columns + column]
            origin = plan.origin(column, row)
            if cell is None:
                pen.rectangle([origin, (origin[0] + size[0] - 1, origin[1] + size[1] - 1)], fill=(200, 200, 200))
                pen.text((origin[0] + LABEL_PADDING, origin[1] + LABEL_PADDING), "no picture", fill="black", font=font)
            else:
                grid.paste(cell.convert("RGB").resize(size), origin)
    return grid
