"""Files that carry their own recipe: PNG and WAV/FLAC/OGG encoding, metadata, safe naming.

Images get an A1111-compatible ``parameters`` text chunk (read by A1111's PNG Info,
sd-parsers, Civitai...) plus a ``muselab`` chunk holding the full request as JSON.
Audio gets the same JSON in its comment (RIFF ``LIST/INFO/ICMT`` for WAV, a
Vorbis comment for FLAC/OGG). Files are written to a temporary name and linked
into place, so a reader never sees half a file and an existing file is never
overwritten.
"""

from __future__ import annotations

import io
import json
import os
import re
import struct
import tempfile
import unicodedata
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from muselab import __version__
from muselab.engines.base import GenerationResult, ImageOutput, MusicOutput
from muselab.loras import prompt_with_tags
from muselab.schemas import count_field

RECIPE_KEY = "muselab"
SOFTWARE = f"muselab {__version__}"
AUDIO_FORMATS = {"wav": ("WAV", "PCM_16"), "flac": ("FLAC", "PCM_16"), "ogg": ("OGG", "VORBIS")}
_A1111_SAMPLERS = {"DPM++ 2M Karras": ("DPM++ 2M", "Karras"), "PNDM": ("PLMS", None)}


class MetadataError(ValueError):
    """A file that holds no recipe muselab can read."""


# ---------------------------------------------------------------- recipes


def recipe_for(result: GenerationResult, output: ImageOutput | MusicOutput) -> dict[str, Any]:
    """What one output file records: the exact request that remakes it, and where it was made.

    No timestamp: the same request on the same machine gives byte-identical files.
    """
    count = count_field(type(result.request))
    request = result.request.model_copy(update={"seed": output.seed, **({count: 1} if count else {})})
    recipe: dict[str, Any] = {
        "software": SOFTWARE,
        "model_name": result.model_name,
        "device": result.device,
        "dtype": result.dtype,
        "request": request.model_dump(mode="json"),
    }
    if isinstance(output, ImageOutput):
        recipe["flagged"] = output.flagged
    else:
        recipe["sample_rate"] = output.sample_rate
        if output.stopped_at is not None:  # the request's piece, stopped: this is its beginning
            recipe["stopped_at"] = round(output.stopped_at, 3)
    return recipe


def a1111_parameters(request: dict[str, Any], model_name: str) -> str:
    """The A1111 'parameters' text: prompt, negative prompt line, then `Key: value` pairs."""
    sampler, schedule = _A1111_SAMPLERS.get(request["scheduler"], (request["scheduler"], None))
    pairs: list[tuple[str, Any]] = [("Steps", request["steps"]), ("Sampler", sampler)]
    if schedule:
        pairs.append(("Schedule type", schedule))
    pairs += [
        ("CFG scale", _plain_number(request["guidance"])),
        ("Seed", request["seed"]),
        *(
            [("Variation seed", request["subseed"]), ("Variation seed strength", _plain_number(strength))]
            if (strength := request.get("subseed_strength") or 0) > 0 and request.get("subseed") is not None
            else []
        ),
        ("Size", f"{request['width']}x{request['height']}"),
        ("Model", model_name),
    ]
    if request.get("strength") is not None:
        pairs.append(("Denoising strength", _plain_number(request["strength"])))
    if request.get("mask"):
        pairs.append(("Mask blur", request.get("mask_blur", 4)))
    if request.get("enable_hr") and not request.get("init_image"):
        pairs += [
            ("Hires upscale", _plain_number(request.get("hr_scale", 2.0))),
            ("Hires steps", request.get("hr_second_pass_steps", 0)),
            ("Hires upscaler", request.get("hr_upscaler", "Lanczos")),
        ]
    if request.get("decoder") == "fast":
        pairs.append(("VAE", "TAESD"))
    hashes = request.get("lora_hashes") or {}
    if hashes:
        pairs.append(("Lora hashes", ", ".join(f"{name}: {value}" for name, value in hashes.items())))
    pairs.append(("Version", SOFTWARE))
    # A1111 keeps the <lora:...> tags in the prompt: its readers load the LoRAs from them.
    lines = [prompt_with_tags(request["prompt"], list(request.get("loras") or []))]
    if request.get("negative_prompt"):
        lines.append(f"Negative prompt: {request['negative_prompt']}")
    lines.append(", ".join(f"{key}: {_quote(value)}" for key, value in pairs))
    return "\n".join(lines)


def a1111_fields(text: str) -> dict[str, str]:
    """A1111 'parameters' text as A1111's PNG Info shows it: Prompt, Negative prompt (if any),
    then each `Key: value` of its last line."""
    lines = text.strip().split("\n")
    settings_line = lines[-1] if len(lines) > 1 and re.match(r"^\s*Steps:", lines[-1]) else ""
    body = lines[:-1] if settings_line else lines
    prompt_lines, negative_lines, in_negative = [], [], False
    for line in body:
        if line.startswith("Negative prompt:"):
            in_negative = True
            line = line.removeprefix("Negative prompt:").strip()
        (negative_lines if in_negative else prompt_lines).append(line)
    pairs = dict(
        (key.strip(), json.loads(value) if value.startswith('"') else value.strip())
        for key, value in re.findall(r'\s*([\w \-/]+):\s*("(?:\\.|[^\\"])*"|[^,]*)(?:,|$)', settings_line)
    )
    fields = {"Prompt": "\n".join(prompt_lines).strip()}
    if negative_lines:
        fields["Negative prompt"] = "\n".join(negative_lines).strip()
    return fields | pairs


def parse_a1111_parameters(text: str) -> dict[str, Any]:
    """Read A1111 'parameters' text back into an image request (as a dict)."""
    pairs = a1111_fields(text)
    request: dict[str, Any] = {"prompt": pairs["Prompt"]}
    if "Negative prompt" in pairs:
        request["negative_prompt"] = pairs["Negative prompt"]
    if "Steps" in pairs:
        request["steps"] = int(pairs["Steps"])
    if "CFG scale" in pairs:
        request["guidance"] = float(pairs["CFG scale"])
    if "Seed" in pairs:
        request["seed"] = int(pairs["Seed"])
    if "Variation seed" in pairs and "Variation seed strength" in pairs:
        request["subseed"] = int(pairs["Variation seed"])
        request["subseed_strength"] = float(pairs["Variation seed strength"])
    if "Size" in pairs:
        width, height = pairs["Size"].split("x")
        request["width"], request["height"] = int(width), int(height)
    if "Sampler" in pairs:
        request["scheduler"] = _scheduler_from_a1111(pairs["Sampler"], pairs.get("Schedule type"))
    if "Model" in pairs:
        request["model_name"] = pairs["Model"]
    if pairs.get("VAE", "").lower().startswith("taesd"):
        request["decoder"] = "fast"
    if "Denoising strength" in pairs:
        request["strength"] = float(pairs["Denoising strength"])
    if "Mask blur" in pairs:
        request["mask_blur"] = int(pairs["Mask blur"])
    if "Hires upscale" in pairs:
        request["enable_hr"], request["hr_scale"] = True, float(pairs["Hires upscale"])
        request["hr_upscaler"] = "Latent" if pairs.get("Hires upscaler", "").startswith("Latent") else "Lanczos"
        request["hr_second_pass_steps"] = int(pairs.get("Hires steps", 0))
    return request


def png_text(data: bytes) -> dict[str, str]:
    """The text chunks of a PNG held in memory (empty for a picture of another format)."""
    import io

    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as image:
            return {str(key): str(value) for key, value in (getattr(image, "text", {}) or {}).items()}
    except OSError as exc:
        raise MetadataError(f"image: not a readable picture: {exc}") from None


def _scheduler_from_a1111(sampler: str, schedule: str | None) -> str:
    if sampler in ("PLMS", "PNDM"):
        return "PNDM"
    if sampler.startswith("DPM++ 2M"):
        karras = schedule == "Karras" or sampler.endswith("Karras")
        return "DPM++ 2M Karras" if karras else "DPM++ 2M"
    return sampler


def _quote(value: Any) -> str:
    text = str(value)
    return json.dumps(text) if ("," in text or ":" in text or '"' in text) and not text.isdigit() else text


def _plain_number(value: float) -> str:
    return f"{value:g}"


# ---------------------------------------------------------------- names and atomic writes


def slugify(text: str, max_length: int = 48) -> str:
    ascii_text = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode()
    slug = re.sub(r"[^a-z0-9]+", "-", ascii_text.lower()).strip("-")
    return slug[:max_length].rstrip("-") or "untitled"


def output_name(prompt: str, seed: int, extension: str) -> str:
    return f"{slugify(prompt)}-{seed}.{extension}"


def current_umask() -> int:
    """The process's umask, read without changing it (Linux); elsewhere set and restored at once."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def write_new_file(target: Path, write: Callable[[io.BufferedWriter], None]) -> Path:
    """Write via a temporary file and link it in under `target`, or `stem-2`, `stem-3`... if taken.

    The link is atomic and fails when the name exists, so two writers never clobber each
    other and a crash leaves at most a hidden temporary file, never a half-written output.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.stem}-", suffix=".part", dir=target.parent)
    tmp = Path(tmp_name)
    try:
        # mkstemp makes the file 0600, and the link keeps that mode: give it the one any other
        # program's new file gets (0644 under the usual umask), so a web server, another account or
        # a container sharing the folder can read the user's outputs.
        os.fchmod(fd, 0o666 & ~current_umask())
        with os.fdopen(fd, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        candidate, number = target, 1
        while True:
            try:
                os.link(tmp, candidate)
                return candidate
            except FileExistsError:
                number += 1
                candidate = target.with_name(f"{target.stem}-{number}{target.suffix}")
    finally:
        tmp.unlink(missing_ok=True)


# ---------------------------------------------------------------- images


def encode_png(image: Any, recipe: dict[str, Any]) -> bytes:
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    request = recipe["request"]
    info.add_itxt("parameters", a1111_parameters(request, recipe["model_name"]))
    info.add_itxt(RECIPE_KEY, json.dumps(recipe, ensure_ascii=False))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", pnginfo=info)
    return buffer.getvalue()


def save_image(image: Any, recipe: dict[str, Any], target: Path) -> Path:
    data = encode_png(image, recipe)
    return write_new_file(target, lambda handle: handle.write(data))


# ---------------------------------------------------------------- audio


def normalize_loudness(audio: np.ndarray, target_dbfs: float = -16.0, peak_dbfs: float = -1.0) -> np.ndarray:
    """Scale to a target RMS level, never letting the peak pass `peak_dbfs`."""
    rms = float(np.sqrt(np.mean(np.square(audio, dtype=np.float64))))
    peak = float(np.max(np.abs(audio))) if audio.size else 0.0
    if rms < 1e-9:
        return audio
    gain = min(10 ** (target_dbfs / 20) / rms, 10 ** (peak_dbfs / 20) / peak)
    return (audio * gain).astype(np.float32)


def encode_audio(audio: np.ndarray, sample_rate: int, recipe: dict[str, Any], extension: str) -> bytes:
    import soundfile as sf

    if extension not in AUDIO_FORMATS:
        raise ValueError(f"unsupported audio format '{extension}': use one of {', '.join(AUDIO_FORMATS)}")
    container, subtype = AUDIO_FORMATS[extension]
    audio = np.clip(audio, -1.0, 1.0)
    buffer = io.BytesIO()
    comment = json.dumps(recipe, ensure_ascii=False)
    title = recipe["request"]["prompt"][:200]
    with sf.SoundFile(buffer, "w", sample_rate, audio.shape[1], format=container, subtype=subtype) as handle:
        if container != "WAV":
            handle.title, handle.comment, handle.software = title, comment, recipe["software"]
        handle.write(audio)
    data = buffer.getvalue()
    if container == "WAV":
        # libsndfile drops WAV comments over about 2 KB; write the INFO chunk ourselves.
        data = _add_wav_info(data, {"INAM": title, "ISFT": recipe["software"], "ICMT": comment})
    return data


def save_audio(
    audio: np.ndarray, sample_rate: int, recipe: dict[str, Any], target: Path, normalize: bool = False
) -> Path:
    if normalize:
        audio = normalize_loudness(audio)
    data = encode_audio(audio, sample_rate, recipe, target.suffix.lstrip(".").lower())
    return write_new_file(target, lambda handle: handle.write(data))


def _add_wav_info(riff: bytes, fields: dict[str, str]) -> bytes:
    body = b"INFO"
    for key, text in fields.items():
        value = text.encode("utf-8") + b"\0"
        body += key.encode("ascii") + struct.pack("<I", len(value)) + value + (b"\0" if len(value) % 2 else b"")
    chunk = b"LIST" + struct.pack("<I", len(body)) + body
    data = riff + chunk
    return data[:4] + struct.pack("<I", len(data) - 8) + data[8:]


def _read_wav_info(data: bytes) -> dict[str, str]:
    if data[:4] != b"RIFF" or data[8:12] != b"WAVE":
        return {}
    fields: dict[str, str] = {}
    position = 12
    while position + 8 <= len(data):
        chunk_id, size = (
            data[position : position + 4],
            struct.unpack("<I", data[position + 4 : position + 8])[0],
        )
        body = data[position + 8 : position + 8 + size]
        if chunk_id == b"LIST" and body[:4] == b"INFO":
            inner = 4
            while inner + 8 <= len(body):
                key, length = body[inner : inner + 4], struct.unpack("<I", body[inner + 4 : inner + 8])[0]
                fields[key.decode("ascii", "replace")] = (
                    body[inner + 8 : inner + 8 + length].rstrip(b"\0").decode("utf-8", "replace")
                )
                inner += 8 + length + (length % 2)
        position += 8 + size + (size % 2)
    return fields


# ---------------------------------------------------------------- reading back


def read_metadata(path: Path) -> dict[str, Any]:
    """The recipe a file carries: {'recipe': {...} or None, 'parameters': str or None, 'format': ...}.

    PNGs from other tools (A1111 and friends) have only 'parameters'; it is parsed into a request.
    """
    path = Path(path)
    if not path.is_file():
        raise MetadataError(f"No such file: {path}")
    suffix = path.suffix.lower()
    if suffix == ".png":
        from PIL import Image

        try:
            with Image.open(path) as image:
                text = dict(getattr(image, "text", {}) or {})
                size = image.size
        except OSError as exc:
            raise MetadataError(f"{path} is not a readable PNG: {exc}") from None
        recipe = json.loads(text[RECIPE_KEY]) if RECIPE_KEY in text else None
        parameters = text.get("parameters")
        if recipe is None and parameters is None:
            raise MetadataError(f"{path} carries no generation recipe (no 'parameters' or 'muselab' chunk).")
        return {"format": "png", "size": size, "recipe": recipe, "parameters": parameters}
    if suffix.lstrip(".") in AUDIO_FORMATS:
        import soundfile as sf

        try:
            info = sf.info(str(path))
        except RuntimeError as exc:
            raise MetadataError(f"{path} is not a readable audio file: {exc}") from None
        if suffix == ".wav":
            comment = _read_wav_info(path.read_bytes()).get("ICMT", "")
        else:
            with sf.SoundFile(str(path)) as handle:
                comment = handle.comment
        try:
            recipe = json.loads(comment)
        except json.JSONDecodeError:
            raise MetadataError(f"{path} carries no muselab recipe in its comment.") from None
        return {
            "format": suffix.lstrip("."),
            "recipe": recipe,
            "sample_rate": info.samplerate,
            "channels": info.channels,
            "duration": info.duration,
        }
    if suffix == ".mp4":
        return read_video_metadata(path)
    raise MetadataError(f"{path}: muselab reads recipes from .png, .wav, .flac, .ogg and .mp4 files.")


def request_from_file(path: Path) -> dict[str, Any]:
    """The request that made a file, as a dict ready for the request models."""
    meta = read_metadata(path)
    if meta.get("recipe"):
        return dict(meta["recipe"]["request"])
    parsed = parse_a1111_parameters(meta["parameters"])
    parsed.pop("model_name", None)
    parsed["kind"] = "image"
    return parsed


# ---------------------------------------------------------------- saving a whole result


def output_extension(kind: str, output: Path | None, audio_format: str | None = None) -> str:
    """The file extension for a result, checked before any work is done."""
    suffix = output.suffix.lower().lstrip(".") if output is not None and not _is_folder(output) else ""
    if kind == "image":
        if suffix not in ("", "png"):
            raise ValueError(f"Images are saved as PNG; change the output name '{output}' to end in .png.")
        return "png"
    extension = (audio_format or suffix or "wav").lower()
    if extension not in AUDIO_FORMATS:
        raise ValueError(
            f"Unsupported audio format '{extension}': use one of {', '.join(AUDIO_FORMATS)} "
            "(--format, or the output file's extension)."
        )
    if suffix and audio_format and suffix != audio_format.lower():
        raise ValueError(f"--format {audio_format} does not match the output name '{output}'.")
    return extension


def save_result(
    result: GenerationResult,
    output: Path | None,
    default_dir: Path,
    audio_format: str | None = None,
    normalize: bool = False,
) -> list[Path]:
    """Save every output of `result`, each with its own recipe, and return the paths written."""
    kind = result.request.kind
    extension = output_extension(kind, output, audio_format)
    paths = []
    for number, item in enumerate(result.outputs, start=1):
        if output is None or _is_folder(output):
            folder = default_dir if output is None else output
            target = folder / output_name(result.request.prompt, item.seed, extension)
        elif len(result.outputs) == 1:
            target = output.with_suffix(f".{extension}")
        else:
            target = output.with_name(f"{output.stem}-{number}.{extension}")
        recipe = recipe_for(result, item)
        if isinstance(item, ImageOutput):
            paths.append(save_image(item.image, recipe, target))
        else:
            paths.append(save_audio(item.audio, item.sample_rate, recipe, target, normalize))
    return paths


def save_outputs(
    result: GenerationResult,
    output: Path | None,
    default_dir: Path,
    audio_format: str | None = None,
    normalize: bool = False,
) -> list[dict[str, Any]]:
    """Save `result` (`save_result`; a scene's picture, soundtrack and MP4) and describe each file
    as the history records it: path, kind, prompt, seed, flagged and recipe."""
    if result.outputs and hasattr(result.outputs[0], "picture"):
        return [item for scene in result.outputs for item in _save_scene(result, scene, output or default_dir)]
    paths = save_result(result, output, default_dir, audio_format, normalize)
    return [
        {
            "path": path,
            "kind": result.request.kind,
            "prompt": result.request.prompt,
            "seed": item.seed,
            "flagged": getattr(item, "flagged", False),
            "recipe": recipe_for(result, item),
        }
        for path, item in zip(paths, result.outputs, strict=True)
    ]


def _save_scene(result: GenerationResult, scene: Any, folder: Path) -> list[dict[str, Any]]:
    """A scene writes three files into `folder`: the picture and the soundtrack, each with its own
    recipe, and the MP4 of both with the scene's (only the picture, when the soundtrack failed)."""
    folder.mkdir(parents=True, exist_ok=True)
    described = save_outputs(scene.picture, None, folder)
    if scene.sound is None:
        return described
    described += save_outputs(scene.sound, None, folder)
    image, clip = scene.picture.outputs[0], scene.sound.outputs[0]
    recipe = {
        "software": SOFTWARE,
        "model_name": result.model_name,
        "device": result.device,
        "dtype": result.dtype,
        "request": result.request.model_dump(mode="json"),
        "flagged": image.flagged,
        "sample_rate": clip.sample_rate,
    }
    target = folder / output_name(result.request.prompt, image.seed, "mp4")
    video = save_video(image.image, clip.audio, clip.sample_rate, recipe, target)
    kind, prompt = result.request.kind, result.request.prompt
    return [
        *described,
        {"path": video, "kind": kind, "prompt": prompt, "seed": image.seed, "flagged": image.flagged, "recipe": recipe},
    ]


def _is_folder(path: Path) -> bool:
    return path.is_dir() or str(path).endswith(("/", os.sep))


# ---------------------------------------------------------------- scenes: a still with its soundtrack


def encode_mp4(image: Any, audio: np.ndarray, sample_rate: int, recipe: dict[str, Any]) -> bytes:
    """An H.264/AAC MP4 of a still picture for as long as its soundtrack, recipe in the comment tag."""
    import av

    width, height = (image.width // 2) * 2, (image.height // 2) * 2  # yuv420p needs even sizes
    picture = np.asarray(image.convert("RGB"))[:height, :width]
    buffer = io.BytesIO()
    with av.open(buffer, "w", format="mp4") as container:
        container.metadata["comment"] = json.dumps(recipe, ensure_ascii=False)
        container.metadata["title"] = recipe["request"]["prompt"][:200]
        video = container.add_stream("libx264", rate=1)
        video.width, video.height, video.pix_fmt = width, height, "yuv420p"
        channels = audio.shape[1]
        sound = container.add_stream("aac", rate=sample_rate)
        sound.layout = "mono" if channels == 1 else "stereo"
        frame = av.VideoFrame.from_ndarray(picture, format="rgb24")
        seconds = max(1, int(np.ceil(len(audio) / sample_rate)))
        for second in range(seconds):  # a still needs only one frame a second
            frame.pts = second
            for packet in video.encode(frame):
                container.mux(packet)
        for packet in video.encode():
            container.mux(packet)
        planar = np.ascontiguousarray(np.clip(audio, -1, 1).T.astype(np.float32))
        samples = av.AudioFrame.from_ndarray(planar, format="fltp", layout=sound.layout.name)
        samples.sample_rate, samples.pts = sample_rate, 0
        for packet in sound.encode(samples):
            container.mux(packet)
        for packet in sound.encode():
            container.mux(packet)
    return buffer.getvalue()


def save_video(image: Any, audio: np.ndarray, sample_rate: int, recipe: dict[str, Any], target: Path) -> Path:
    data = encode_mp4(image, audio, sample_rate, recipe)
    return write_new_file(target, lambda handle: handle.write(data))


def read_video_metadata(path: Path) -> dict[str, Any]:
    import av

    try:
        with av.open(str(path)) as container:
            comment = container.metadata.get("comment", "")
            duration = (container.duration or 0) / 1_000_000
    except (av.error.FFmpegError, OSError) as exc:
        raise MetadataError(f"{path} is not a readable MP4: {exc}") from None
    try:
        recipe = json.loads(comment)
    except json.JSONDecodeError:
        raise MetadataError(f"{path} carries no muselab recipe.") from None
    return {"format": "mp4", "recipe": recipe, "duration": duration}
