"""The OpenVINO path for images on CPUs.

The UNet and the VAE decoder are converted once to OpenVINO IR (`ov.convert_model`, optionally
int8 weights from NNCF), cached on disk, and then run by OpenVINO's CPU runtime *inside the same
diffusers pipeline*: `pipe.unet` and `pipe.vae.decoder` are swapped for thin modules that call the
compiled models, so schedulers, guidance, callbacks, tiling and previews are all unchanged.
The text encoder stays in PyTorch: it runs once per image and costs a fraction of a second.

Why: measured on 2-core machines (docs/PERFORMANCE.md), OpenVINO's float32 UNet step is 1.0-1.2x
PyTorch's on an AVX-512 Xeon and 1.1-1.5x on an AVX2 EPYC, at the same output (PSNR 83 dB). It
costs memory: the CPU runtime keeps its own packed copy of the weights.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import logging
import os
import shutil
import sys
import threading
import time
import uuid
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

from muselab.engines.base import ModelUnavailable, ProgressCallback, ProgressEvent

#: Bump when the conversion below changes, so stale cached IR is never used.
CONVERSION_VERSION = 1

#: PyTorch's tracer keeps global state: two conversions at once (an image and a music model loading
#: in two job workers) corrupt each other's graphs. One at a time per process.
TRACING_LOCK = threading.Lock()


class ConversionProgress:
    """Reports a conversion stage by stage as `ProgressEvent`s (stage "converting")."""

    def __init__(self, total: int, on_progress: ProgressCallback | None):
        self.total, self.on_progress = total, on_progress
        self.step = 0
        self.started = time.perf_counter()

    def __call__(self, note: str, advance: bool = True) -> None:
        if self.on_progress is not None:
            self.on_progress(
                ProgressEvent(
                    stage="converting",
                    step=self.step,
                    total=self.total,
                    elapsed=time.perf_counter() - self.started,
                    eta=None,
                    note=note,
                )
            )
        if advance:
            self.step += 1


def openvino_available() -> bool:
    return importlib.util.find_spec("openvino") is not None


def nncf_available() -> bool:
    return importlib.util.find_spec("nncf") is not None


def openvino_version() -> str | None:
    if not openvino_available():
        return None
    import openvino

    return openvino.__version__.split("-")[0]


class OpenVinoUnavailable(ModelUnavailable):
    """The OpenVINO backend was asked for but cannot run here; the message says what to do."""


def require_openvino(quantize: str) -> None:
    if not openvino_available():
        raise OpenVinoUnavailable(
            "The OpenVINO backend needs the 'openvino' package, which is not installed.\n"
            "Fix: pip install openvino   (or use --backend torch)"
        )
    if quantize == "int8" and not nncf_available():
        raise OpenVinoUnavailable(
            "int8 weights for the OpenVINO backend come from NNCF, which is not installed.\n"
            "Fix: pip install nncf   (or use --quantize none, or --backend torch)"
        )


def precision_hint(dtype: torch.dtype) -> str:
    """OpenVINO's CPU plugin picks bf16 by itself wherever the CPU has the instructions, even where
    they are slower than float32 (measured here: 13 s against 8.5 s a UNet step), so the dtype
    chosen by muselab's own probe (`devices.choose_placement`) is passed on explicitly."""
    return "bf16" if dtype == torch.bfloat16 else "f32"


def cache_key(component_folder: Path, quantize: str, dtype: torch.dtype, conversion: int = CONVERSION_VERSION) -> str:
    """Names one converted component: which weights (path, size, time), how (`conversion`: the
    converting code's version), and with which OpenVINO. A hub snapshot's path holds its commit,
    so a new revision is converted afresh."""
    files = sorted(p for p in component_folder.iterdir() if p.suffix in (".safetensors", ".json"))
    identity = {
        "folder": str(component_folder.resolve()),
        "files": [(p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in files],
        "quantize": quantize,
        "dtype": str(dtype),
        "openvino": openvino_version(),
        "conversion": conversion,
    }
    digest = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]
    return f"{component_folder.name}-{quantize}-{digest}"


class _UNetForExport(torch.nn.Module):
    """The UNet with the three inputs SD 1.x/2.x pipelines pass and a plain tensor out."""

    def __init__(self, unet: torch.nn.Module):
        super().__init__()
        self.unet = unet

    def forward(
        self, sample: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor
    ) -> torch.Tensor:
        return self.unet(sample, timestep, encoder_hidden_states, return_dict=False)[0]


def _unet_example(unet: Any) -> tuple[torch.Tensor, ...]:
    config = unet.config
    size = config.sample_size if isinstance(config.sample_size, int) else config.sample_size[0]
    dtype = unet.dtype
    return (
        torch.randn(2, config.in_channels, size, size, dtype=dtype),
        torch.tensor(500.0, dtype=torch.float32),
        torch.randn(2, 77, config.cross_attention_dim, dtype=dtype),
    )


def _decoder_example(vae: Any) -> tuple[torch.Tensor, ...]:
    config = vae.config
    return (torch.randn(1, config.latent_channels, 32, 32, dtype=vae.dtype),)


def read_unet_config(folder: Path) -> Any:
    """The UNet's config (with the class defaults filled in) without building the UNet: what the
    pipeline reads from `pipe.unet.config` when the converted UNet comes from the cache."""
    import inspect

    from diffusers import UNet2DConditionModel
    from diffusers.configuration_utils import FrozenDict

    defaults = {
        name: parameter.default
        for name, parameter in inspect.signature(UNet2DConditionModel.__init__).parameters.items()
        if parameter.default is not inspect.Parameter.empty
    }
    return FrozenDict({**defaults, **UNet2DConditionModel.load_config(folder)})


def unsupported_reason(config: Any) -> str | None:
    """None if a UNet with this config can take the OpenVINO path, else why not (in words)."""
    if getattr(config, "addition_embed_type", None) is not None or getattr(config, "class_embed_type", None):
        return "the UNet takes extra conditioning (SDXL-style), which the OpenVINO path does not convert"
    if getattr(config, "time_cond_proj_dim", None) is not None:
        return "the UNet takes a guidance embedding (LCM-style), which the OpenVINO path does not convert"
    return None


def convert(
    module: torch.nn.Module | None,
    example: tuple[torch.Tensor, ...],
    target: Path,
    quantize: str,
    say: ConversionProgress,
    converted: Path | None = None,
) -> None:
    """Trace `module` into OpenVINO IR at `target` (model.xml + model.bin), int8 weights when asked.
    With `converted` (the same model already converted at full precision), that IR is compressed
    instead: no PyTorch module is needed and nothing is traced again."""
    import openvino as ov

    name = target.name.split("-")[0]
    if converted is not None:
        say(f"Reading the converted {name} (cached in {target.parent})")
        model = ov.Core().read_model(converted / "model.xml")
    else:
        assert module is not None
        say(f"Converting the {name} to OpenVINO (one time; cached in {target.parent})")
        with TRACING_LOCK, torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # tracer warnings about shape checks baked in as constants
            model = ov.convert_model(module, example_input=example)
    if quantize == "int8":
        say(f"Compressing the {name}'s weights to int8 (NNCF)")
        model = compress_int8(model)
    else:
        say.step += 1
    say(f"Saving the converted {name}")
    save_atomically(model, target)


def compress_int8(model: Any) -> Any:
    """int8 weights (per output channel, asymmetric) from NNCF; activations stay as they are."""
    import nncf

    nncf.set_log_level(logging.WARNING)
    # NNCF draws its own progress bars on stdout, which is the CLI's --json output: keep it clean.
    with contextlib.redirect_stdout(sys.stderr):
        return nncf.compress_weights(model, mode=nncf.CompressWeightsMode.INT8_ASYM)


def save_atomically(model: Any, target: Path) -> None:
    """Save an OpenVINO model as `target`/model.xml (+ .bin). Written beside the cache entry and
    renamed into place: a crash or a kill never leaves half a model under the entry's name, and two
    processes converting at once cannot collide."""
    import openvino as ov

    partial = target.with_name(f"{target.name}.partial-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    _remove_stale_partials(target.parent)
    partial.mkdir(parents=True)
    try:
        # compress_to_fp16=False: float32 weights stay float32, so the output matches PyTorch's.
        ov.save_model(model, partial / "model.xml", compress_to_fp16=False)
        partial.rename(target)
    except OSError:
        if not (target / "model.xml").exists():
            raise
    finally:
        shutil.rmtree(partial, ignore_errors=True)  # gone already unless another process won


def _remove_stale_partials(folder: Path, older_than_s: float = 6 * 3600) -> None:
    """Partial conversions left by killed processes (none still running converts for hours)."""
    now = time.time()
    for path in folder.glob("*.partial-*"):
        with contextlib.suppress(OSError):
            if now - path.stat().st_mtime > older_than_s:
                shutil.rmtree(path, ignore_errors=True)


class _CompiledModule(torch.nn.Module):
    """Calls one compiled OpenVINO model; it has no parameters, only the `dtype` and `device`
    diffusers reads from every pipeline component."""

    def __init__(self, compiled: Any, dtype: torch.dtype):
        super().__init__()
        self.compiled = compiled
        self.request = compiled.create_infer_request()
        self._dtype = dtype

    @property
    def dtype(self) -> torch.dtype:
        return self._dtype

    @property
    def device(self) -> torch.device:
        return torch.device("cpu")

    def run(self, *inputs: np.ndarray) -> torch.Tensor:
        result = self.request.infer(list(inputs), share_inputs=True)
        # The request reuses its output buffer on the next call: copy before handing it out.
        return torch.from_numpy(np.array(result[0], copy=True)).to(self._dtype)


class OpenVinoUNet(_CompiledModule):
    """A stand-in for diffusers' UNet2DConditionModel (SD 1.x/2.x), backed by OpenVINO."""

    def __init__(self, compiled: Any, config: Any, dtype: torch.dtype):
        super().__init__(compiled, dtype)
        self.config = config

    def forward(
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor | float | int,
        encoder_hidden_states: torch.Tensor,
        *args: Any,
        return_dict: bool = True,
        **kwargs: Any,
    ) -> Any:
        from diffusers.models.unets.unet_2d_condition import UNet2DConditionOutput

        # The converted graph takes exactly these three inputs; extra conditioning (ControlNet
        # residuals, LCM guidance embeddings, SDXL's added inputs) would be silently dropped.
        extra = [
            name for name, value in kwargs.items() if value is not None and not (isinstance(value, dict) and not value)
        ]
        if args or extra:
            raise NotImplementedError(
                f"The OpenVINO UNet takes no extra conditioning ({', '.join(extra) or 'positional arguments'}); "
                "use --backend torch for this pipeline."
            )
        step = torch.as_tensor(timestep, dtype=torch.float32).reshape(-1)[:1].reshape(())
        output = self.run(sample.detach().float().numpy(), step.numpy(), encoder_hidden_states.detach().float().numpy())
        return UNet2DConditionOutput(sample=output) if return_dict else (output,)


class OpenVinoDecoder(_CompiledModule):
    """A stand-in for the VAE's `decoder` module (latents after post_quant_conv -> pixels)."""

    def forward(self, z: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        return self.run(z.detach().float().numpy())


def compile_ir(model: Any, dtype: torch.dtype, **options: Any) -> Any:
    """Compile for the CPU, for one request at a time in muselab's dtype: `model` is a converted
    folder (its model.xml) or an `ov.Model`; `options` add plugin properties."""
    import openvino as ov

    source = model / "model.xml" if isinstance(model, Path) else model
    properties = {"INFERENCE_PRECISION_HINT": precision_hint(dtype), "PERFORMANCE_HINT": "LATENCY", **options}
    return ov.Core().compile_model(source, "CPU", properties)


def converted_unet_folder(source: Path, cache_dir: Path, quantize: str, dtype: torch.dtype) -> Path:
    return cache_dir / cache_key(source / "unet", quantize, dtype)


def cached_unet_source(source: Path, cache_dir: Path, quantize: str, dtype: torch.dtype) -> Path | None:
    """The cached IR an engine can build its UNet from without reading the PyTorch weights: the
    converted UNet itself, or (for int8) the full-precision one, compressed on the way."""
    for kind in (quantize, "none"):
        folder = converted_unet_folder(source, cache_dir, kind, dtype)
        if (folder / "model.xml").exists():
            return folder
    return None


def use_openvino(
    pipe: Any,
    source: Path,
    cache_dir: Path,
    dtype: torch.dtype,
    quantize: str = "none",
    on_progress: ProgressCallback | None = None,
    unet_config: Any = None,
) -> dict[str, float]:
    """Swap the pipeline's UNet and VAE decoder for OpenVINO ones, converting them first when the
    cache (`cache_dir`) does not hold them yet. `pipe.unet` may be None (the pipeline was loaded
    without it because the converted UNet is cached); then pass `unet_config`
    (`read_unet_config`). `dtype` is the dtype the PyTorch components were loaded in and the
    precision OpenVINO computes in. Returns the seconds spent converting and compiling."""
    from muselab.quantize import return_freed_memory

    timings = {"convert_s": 0.0, "compile_s": 0.0}
    unet_dir = converted_unet_folder(source, cache_dir, quantize, dtype)
    decoder_dir = cache_dir / cache_key(source / "vae", "none", dtype)
    missing = [folder for folder in (unet_dir, decoder_dir) if not (folder / "model.xml").exists()]
    # Progress only when there is one-time work; a cached load is quick and quiet.
    say = ConversionProgress(3 * len(missing) + 1, on_progress if missing else None)
    started = time.perf_counter()
    unet_config = unet_config if pipe.unet is None else pipe.unet.config
    if unet_dir in missing:
        converted = cached_unet_source(source, cache_dir, quantize, dtype)
        if pipe.unet is not None:
            unet = pipe.unet.eval()
            convert(_UNetForExport(unet), _unet_example(unet), unet_dir, quantize, say, converted)
        elif converted is not None:
            convert(None, (), unet_dir, quantize, say, converted)
        else:
            raise OpenVinoUnavailable(f"The converted UNet is gone from {cache_dir}; load the model again.")
    if decoder_dir in missing:
        decoder = pipe.vae.decoder.eval()
        convert(decoder, _decoder_example(pipe.vae), decoder_dir, "none", say)
    timings["convert_s"] = time.perf_counter() - started
    say("Compiling the OpenVINO models")
    started = time.perf_counter()
    unet = OpenVinoUNet(compile_ir(unet_dir, dtype), unet_config, dtype)
    decoder = OpenVinoDecoder(compile_ir(decoder_dir, dtype), dtype)
    pipe.unet = unet
    pipe.vae.decoder = decoder
    if hasattr(pipe, "_is_unet_config_sample_size_int"):  # set from the UNet in the pipeline's __init__
        pipe._is_unet_config_sample_size_int = isinstance(unet_config.sample_size, int)
    return_freed_memory()  # the PyTorch UNet and decoder just dropped
    timings["compile_s"] = time.perf_counter() - started
    say("OpenVINO models ready", advance=False)
    return timings
