"""The picture-editing paths on a CUDA GPU (float16), for bench/gpu-check.sh: each checked on the
tiny models as the CPU tests check them, then timed on full-size random SD 1.x (512x512 inpainting,
hires fix to 1024x1024). Prints one line per check and a JSON summary; exits 1 if a check fails.
The timings are of compute only: random weights say nothing of quality."""

from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageFilter

from muselab.engines.image.engine import ImageEngine
from muselab.engines.image.tiny import build_tiny_stable_diffusion
from muselab.schemas import ImageRequest
from muselab.testing.tiny import build_tiny_models
from muselab.uploads import InputStore

failures: list[str] = []
summary: dict[str, object] = {"gpu": torch.cuda.get_device_name(0), "torch": torch.__version__}


def check(name: str, ok: bool, detail: str = "") -> None:
    print(f"{'ok  ' if ok else 'FAIL'} {name} {detail}", flush=True)
    if not ok:
        failures.append(name)


def picture(width: int = 64, height: int = 64) -> Image.Image:
    x, y = np.meshgrid(np.linspace(0, 255, width), np.linspace(0, 255, height))
    return Image.fromarray(np.stack([x, y, 255 - x], axis=-1).astype(np.uint8))


def box_mask(size: tuple[int, int], box: tuple[int, int, int, int]) -> Image.Image:
    mask = Image.new("L", size, 0)
    mask.paste(255, box)
    return mask


def kept_outside(result: Image.Image, source: Image.Image, mask: Image.Image) -> bool:
    keep = np.asarray(mask.filter(ImageFilter.GaussianBlur(4))) == 0
    return bool(np.array_equal(np.asarray(result)[keep], np.asarray(source)[keep]))


def tiny_checks(data: Path) -> None:
    build_tiny_models(data / "tiny-models")
    engine = ImageEngine.load(str(data / "tiny-models" / "tiny-stable-diffusion"), offline=True, data_dir=data)
    summary["placement"] = f"{engine.placement.device} {engine.placement.dtype}"
    store = InputStore(engine.plan.inputs_dir)
    source, mask = picture(), box_mask((64, 64), (16, 16, 40, 40))
    reference, mask_reference = store.keep(source), store.keep(mask)
    base = {"prompt": "a fox", "seed": 3, "steps": 6, "speed": "quality"}
    for fill in ("original", "fill", "latent noise", "latent nothing"):
        request = ImageRequest(**base, init_image=reference, mask=mask_reference, inpainting_fill=fill)
        image = engine.generate(request).outputs[0].image
        check(f"inpaint {fill}", kept_outside(image, source, mask) and image.size == (64, 64))
    only = ImageRequest(**base, init_image=reference, mask=mask_reference, inpaint_full_res=True)
    check("only masked", kept_outside(engine.generate(only).outputs[0].image, source, mask))
    grown = ImageRequest(**base, init_image=reference, outpaint=16, outpaint_sides=["left"])
    check("outpaint", engine.generate(grown).outputs[0].image.size == (80, 64))
    for upscaler in ("Lanczos", "Latent"):
        hires = ImageRequest(**base, enable_hr=True, hr_upscaler=upscaler)
        check(f"hires {upscaler}", engine.generate(hires).outputs[0].image.size == (128, 128))
    long_prompt = " ".join(["a red fox in the snow, watercolor"] * 15) + ", (fox:1.3)"
    emphasis = ImageRequest(**{**base, "prompt": long_prompt})
    image = engine.generate(emphasis).outputs[0].image
    check("emphasis, 2 chunks", np.asarray(image).std() > 0)
    same = engine.generate(ImageRequest(**{**base, "prompt": "a (fox:1.0)"})).outputs[0].image
    plain = engine.generate(ImageRequest(**base)).outputs[0].image
    check("(fox:1.0) == fox", np.array_equal(np.asarray(same), np.asarray(plain)))
    folder = build_tiny_stable_diffusion(data / "tiny-inpainting", inpainting=True)
    nine = ImageEngine.load(str(folder), offline=True, data_dir=data)
    image = nine.generate(ImageRequest(**base, init_image=reference, mask=mask_reference, strength=1.0))
    check("9-channel inpainting", kept_outside(image.outputs[0].image, source, mask))


def full_size_timings(data: Path) -> None:
    from muselab.bench.architectures import build_sd1_random

    folder = data / "sd1-random"
    build_sd1_random(torch.float16, verbose=False).save_pretrained(folder, safe_serialization=True)
    engine = ImageEngine.load(str(folder), offline=True, data_dir=data, safety_checker=False)
    store = InputStore(engine.plan.inputs_dir)
    source, mask = picture(512, 512), box_mask((512, 512), (128, 128, 384, 384))
    common = {"prompt": "a fox", "seed": 1, "steps": 25, "speed": "quality"}
    requests = {
        "txt2img_512": ImageRequest(**common),
        "inpaint_512_strength_0.75": ImageRequest(**common, init_image=store.keep(source), mask=store.keep(mask)),
        "hires_512_to_1024_strength_0.5": ImageRequest(**common, enable_hr=True, strength=0.5),
    }
    timings = {}
    for name, request in requests.items():
        engine.generate(request.model_copy(update={"steps": 2}))  # warm-up (kernels, from_pipe)
        torch.cuda.synchronize()
        started = time.perf_counter()
        result = engine.generate(request)
        torch.cuda.synchronize()
        timings[name] = {"seconds": round(time.perf_counter() - started, 3), "size": result.outputs[0].image.size}
        print(name, timings[name], flush=True)
    summary["full_size_sd1"] = timings
    summary["peak_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)


if __name__ == "__main__":
    with tempfile.TemporaryDirectory() as folder:
        tiny_checks(Path(folder))
        full_size_timings(Path(folder))
    summary["failures"] = failures
    print(json.dumps(summary, indent=1))
    sys.exit(1 if failures else 0)
