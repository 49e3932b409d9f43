"""LoRAs for Stable Diffusion: which ones a request asks for, and fusing them into the pipeline's
weights through diffusers (peft) before anything else (int8, OpenVINO) sees the weights: a fused
LoRA costs nothing per step, and OpenVINO converts the fused UNet."""

from __future__ import annotations

import hashlib
import json
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from muselab.loras import LoraError, LoraFile, find, parse_choice, split_prompt
from muselab.schemas import ImageRequest, RequestError

if TYPE_CHECKING:
    pass


@dataclass(frozen=True)
class ChosenLora:
    file: LoraFile
    weight: float
    purpose: str = ""  # what it is for, where the user did not name it (the fast tier's LCM-LoRA)

    @property
    def name(self) -> str:
        return self.file.name


def with_prompt_loras(request: ImageRequest) -> ImageRequest:
    """`request` with A1111's `<lora:name:w>` tags taken out of its prompt and added to `loras`
    (the `loras` field wins where both name one)."""
    prompt, tagged = split_prompt(request.prompt)
    if not tagged:
        return request
    if not prompt:
        raise RequestError("prompt: there is nothing left once its <lora:...> tags are taken out; describe the picture")
    try:
        return ImageRequest.model_validate({**request.model_dump(), "prompt": prompt, "loras": tagged + request.loras})
    except ValueError as exc:
        raise RequestError(f"prompt: a <lora:...> tag is not one muselab can use: {exc}") from None


def chosen_loras(request: ImageRequest, folder: Path | None) -> tuple[ChosenLora, ...]:
    """The LoRA files `request.loras` names in `folder`; a missing or unsafe one is a RequestError
    naming the field and the file."""
    if not request.loras:
        return ()
    if folder is None:
        raise RequestError("loras: this engine has no LoRA folder")
    chosen = []
    for choice in request.loras:
        name, weight = parse_choice(choice)
        try:
            chosen.append(ChosenLora(find(folder, name), weight))
        except LoraError as exc:
            raise RequestError(f"loras: {exc}") from None
    return tuple(chosen)


def identity(loras: tuple[ChosenLora, ...]) -> str:
    """Names a set of fused LoRAs (which files, by content, and how strongly) for caches: "" for none."""
    if not loras:
        return ""
    described = [(lora.name, lora.file.hash, lora.weight) for lora in loras]
    return "lora-" + hashlib.sha256(json.dumps(described).encode()).hexdigest()[:16]


def fuse_loras(pipe: Any, loras: tuple[ChosenLora, ...]) -> None:
    """Load each LoRA (diffusers and kohya formats, safetensors only) into the UNet and text
    encoder, fuse them at their weights and drop the adapters, so the weights are plain again. A
    file whose layers do not fit this model is refused, naming the file."""
    if not loras:
        return
    names = []
    with warnings.catch_warnings():
        # peft warns that a second adapter joins the first: that is what fusing several means.
        warnings.filterwarnings("ignore", message="Already found a `peft_config`")
        for index, lora in enumerate(loras):
            names.append(_load_one(pipe, lora, f"lora{index}"))
    pipe.set_adapters(names, adapter_weights=[lora.weight for lora in loras])

    pipe.fuse_lora(adapter_names=names, lora_scale=1.0)
    pipe.unload_lora_weights()  # the weights keep the fused sum; the adapter layers go


def _load_one(pipe: Any, lora: ChosenLora, adapter: str) -> str:
    try:
        pipe.load_lora_weights(
            str(lora.file.path.parent), weight_name=lora.file.path.name, adapter_name=adapter, use_safetensors=True
        )
    except (RuntimeError, ValueError, KeyError, OSError) as exc:
        pipe.unload_lora_weights()
        message = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else type(exc).__name__
        if lora.purpose:
            raise RequestError(
                f"speed: {lora.purpose} does not fit this model; choose another speed (turbo, quality): {message}"
            ) from None
        raise RequestError(
            f"loras: {lora.file.path} does not fit this model (is it a LoRA for another base model, "
            f"such as SDXL?): {message}"
        ) from None
    if not _touches_model(pipe, adapter):
        pipe.unload_lora_weights()
        raise RequestError(f"loras: {lora.file.path} holds no layer of this model; is it a LoRA for it?")
    return adapter


def _touches_model(pipe: Any, adapter: str) -> bool:
    """Whether the adapter landed on any layer (diffusers only warns when no key matches)."""
    for component in (getattr(pipe, "unet", None), getattr(pipe, "text_encoder", None)):
        config = getattr(component, "peft_config", None) or {}
        if adapter in config:
            return True
    return False
