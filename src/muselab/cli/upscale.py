"""`muselab upscale FILE`: enlarge a picture and redraw its detail, as an image job."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from muselab.cli.common import (
    EXIT_BAD_INPUT,
    CliError,
    DeviceOpt,
    DtypeOpt,
    JsonOpt,
    OfflineOpt,
    PresetOpt,
    app,
    settings_from,
)
from muselab.cli.generate import generate, output_path, read_upload
from muselab.upscale import UPSCALE_SCALE, UPSCALE_STRENGTH


@app.command()
def upscale(
    file: Annotated[Path, typer.Argument(help="The picture to enlarge: PNG, JPEG or WebP.")],
    scale: Annotated[
        float, typer.Option(min=1.0, max=4.0, help="How much larger, each side (at most 2048 pixels).")
    ] = UPSCALE_SCALE,
    strength: Annotated[
        float,
        typer.Option(min=0.0, max=1.0, help="How much the detail pass may change (A1111's denoising strength)."),
    ] = UPSCALE_STRENGTH,
    prompt: Annotated[str | None, typer.Option(help="What the picture shows; default: its recipe's prompt.")] = None,
    output: Annotated[Path | None, typer.Option("--output", "-o", help="Folder or file for the PNG.")] = None,
    preset: PresetOpt = None,
    device: DeviceOpt = None,
    dtype: DtypeOpt = None,
    offline: OfflineOpt = False,
    as_json: JsonOpt = False,
) -> None:
    """Enlarge a picture (Lanczos) and redraw its detail with an img2img pass at a low strength,
    with its recipe's prompt, model and seed where it carries one (muselab's or A1111's)."""
    from muselab.families import family
    from muselab.media import MetadataError, request_from_file
    from muselab.schemas import RequestError, parse_request
    from muselab.uploads import decode_base64, decode_image
    from muselab.upscale import upscale_fields

    picture = read_upload(str(file), "FILE")
    try:
        size = decode_image(decode_base64(picture, "init_image"), "init_image").size
        recipe = request_from_file(file)
    except RequestError as exc:
        raise CliError(f"{file}: {exc}", EXIT_BAD_INPUT) from None
    except MetadataError:
        recipe = None  # a picture from elsewhere: enlarged with a generic prompt, or --prompt
    fields = upscale_fields(recipe, size, picture, scale, strength)
    if prompt:
        fields["prompt"] = prompt
    try:
        request = parse_request(family("image").request, fields)
    except RequestError as exc:
        raise CliError(str(exc), EXIT_BAD_INPUT) from None
    settings = settings_from(preset, device, dtype, offline)
    generate(family("image"), request, settings, output_path(output), as_json)
