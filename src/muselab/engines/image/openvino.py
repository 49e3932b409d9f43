"""The OpenVINO path for images on CPUs.

The UNet and the VAE decoder are converted once to OpenVINO IR (`ov.convert_model`, optionally
int8 weights from NNCF), cached on disk, and then run by OpenVINO's CPU runtime *inside the same
diffusers pipeline*: `pipe.unet` and `pipe.vae.decoder` are swapped for thin modules that call the
compiled models, so schedulers, guidance, callbacks, tiling and previews are all unchanged.
The text encoder stays in PyTorch: it runs once per image and costs a fraction of a second.

Why: measured on 2-core machines (docs/PERFORMANCE.md), OpenVINO's float32 UNet step is 1.0-1.2x
PyTorch's on an AVX-512 Xeon and 1.1-1.5x on an AVX2 EPYC, at the same output (PSNR 83 dB). It
costs memory: the CPU runtime keeps its own packed copy of the weights.

`--quantize int8-full` goes further: int8 weights *and* activations in the UNet (NNCF post-training
quantization, its activation ranges calibrated once on UNet inputs recorded while the float model
makes a few short images), so the CPU multiplies int8 by int8 (VNNI): about 2.4x the float32 step on
an AVX-512 Xeon, at a visible but small cost in fidelity (docs/PERFORMANCE.md).

Whether a model takes this path is its `RuntimePlan`'s call (`engines.runtime`); what the music
path shares with it (caching, compiling, cancelling) is in `engines.openvino_runtime`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from muselab.engines.base import ProgressCallback
from muselab.engines.image import step_cache
from muselab.engines.image.schedulers import make_scheduler
from muselab.engines.image.step_cache import DeepUNet, ShallowUNet
from muselab.engines.openvino_runtime import (
    TRACING_LOCK,
    ConversionProgress,
    OpenVinoUnavailable,
    _CompiledModule,
    cache_key,
    compile_ir,
    compress_int8,
    save_atomically,
)

if TYPE_CHECKING:
    from muselab.engines.runtime import RuntimePlan


#: Bump when the conversion below changes, so stale cached IR is never used.
CONVERSION_VERSION = 3  # 2: float32 inputs and outputs whatever the weights; 3: the UNet's deep features out too

#: What the UNet's int8 activations are calibrated on (`--quantize int8-full`): a few short images
#: with the default sampler, every UNet call recorded. Varied subjects, so the ranges are not one
#: picture's; few steps, so the calls still span the noise levels from pure noise to nearly clean.
#: 2 prompts x 4 steps: 8 recorded calls (about 2 minutes at 512x512 on 2 cores, once per model).
CALIBRATION_PROMPTS = (
    "a portrait photo of an old fisherman, natural light, detailed skin",
    "a watercolor landscape with mountains, a lake and a red boat at sunset",
)
CALIBRATION_STEPS = 4
#: Bump when the calibration recipe (prompts, steps, NNCF settings) changes: it names the cached IR.
CALIBRATION_VERSION = 1


class _DecoderForExport(torch.nn.Module):
    """The VAE decoder, float32 in and out (as `_UNetForExport`, for the same reason)."""

    def __init__(self, decoder: torch.nn.Module):
        super().__init__()
        self.decoder = decoder

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.decoder(z.to(next(self.decoder.parameters()).dtype)).float()


def _unet_example(unet: Any) -> tuple[torch.Tensor, ...]:
    config = unet.config
    size = config.sample_size if isinstance(config.sample_size, int) else config.sample_size[0]
    return (
        torch.randn(2, config.in_channels, size, size),
        torch.tensor(500.0, dtype=torch.float32),
        torch.randn(2, 77, config.cross_attention_dim),
    )


def _shallow_example(unet: Any) -> tuple[torch.Tensor, ...]:
    """The UNet's example and the deep features its last layer takes (as many channels as the
    first block's, at the latents' size)."""
    sample, timestep, text = _unet_example(unet)
    features = torch.randn(2, unet.config.block_out_channels[0], *sample.shape[-2:])
    return sample, timestep, text, features


def _decoder_example(vae: Any) -> tuple[torch.Tensor, ...]:
    config = vae.config
    return (torch.randn(1, config.latent_channels, 32, 32),)


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

    name, how = [*target.name.split("-"), ""][:2]
    if how == "shallow":
        name = f"{name}'s shallow path (for the balanced speed)"
    if converted is not None:
        say(f"Reading the converted {name}")
        model = ov.Core().read_model(converted / "model.xml")
    else:
        assert module is not None
        say(f"Converting the {name} to OpenVINO (one time)")
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


def quantize_activations(model: Any, samples: list[list[np.ndarray]]) -> Any:
    """int8 weights and activations (NNCF post-training quantization) for a converted UNet, the
    activation ranges taken from `samples` (its inputs, as recorded by `record_unet_inputs`).

    TRANSFORMER is NNCF's preset for attention models (it leaves the softmax and the layer norms in
    float). SmoothQuant stays off, as in optimum-intel's diffusion recipe; it would cost a second
    statistics pass (40 s of compiling alone for SD 1.x on 2 cores). Bias correction is off: on the
    SD 1.x architecture it changed the UNet output's SNR against float32 by 0.1 dB (22.1 against
    22.0) for half a minute more."""
    import nncf

    nncf.set_log_level(logging.WARNING)
    with contextlib.redirect_stdout(sys.stderr):
        return nncf.quantize(
            model,
            nncf.Dataset(samples),
            subset_size=len(samples),
            model_type=nncf.ModelType.TRANSFORMER,
            advanced_parameters=nncf.AdvancedQuantizationParameters(
                smooth_quant_alphas=nncf.AdvancedSmoothQuantParameters(convolution=-1, matmul=-1),
                disable_bias_correction=True,
            ),
        )


def record_unet_inputs(pipe: Any, unet: OpenVinoUNet, say: ConversionProgress) -> list[list[np.ndarray]]:
    """The UNet's inputs while `pipe` (with the float `unet` in place) makes a few short images
    with muselab's default sampler at the model's native size: calibration data from this model's
    own text encoder and noise levels, with no dataset to download."""
    from muselab.engines.image.family import GENERIC_DEFAULTS

    samples: list[list[np.ndarray]] = []
    original_run = unet.run

    def recording_run(*inputs: np.ndarray) -> torch.Tensor:
        samples.append([np.array(value, copy=True) for value in inputs])
        return original_run(*inputs)

    previous_unet, previous_scheduler = pipe.unet, pipe.scheduler
    total = len(CALIBRATION_PROMPTS) * CALIBRATION_STEPS
    size = unet.config.sample_size
    side = (size if isinstance(size, int) else size[0]) * pipe.vae_scale_factor
    try:  # everything swapped in here is swapped back, whatever stops it (a cancel raises in `say`)
        unet.run = recording_run  # type: ignore[method-assign]
        pipe.unet, pipe.scheduler = unet, make_scheduler(GENERIC_DEFAULTS.scheduler, pipe.scheduler.config)
        say(f"Calibrating int8 activations: UNet call 0 of {total}", False)  # the first call takes a while
        for index, prompt in enumerate(CALIBRATION_PROMPTS):

            def on_step_end(pipe: Any, step: int, timestep: Any, tensors: dict[str, Any], index: int = index) -> dict:
                say(f"Calibrating int8 activations: UNet call {index * CALIBRATION_STEPS + step + 1} of {total}", False)
                return tensors

            pipe(
                prompt,
                num_inference_steps=CALIBRATION_STEPS,
                width=side,
                height=side,
                guidance_scale=7.5,
                generator=torch.Generator("cpu").manual_seed(index),
                output_type="latent",
                callback_on_step_end=on_step_end,
            )
    finally:
        pipe.unet, pipe.scheduler = previous_unet, previous_scheduler
        unet.__dict__.pop("run", None)
    return samples


class OpenVinoUNet(_CompiledModule):
    """A stand-in for diffusers' UNet2DConditionModel (SD 1.x/2.x), backed by OpenVINO. Its graph
    also returns the deep features the balanced tier's step caching keeps (`step_cache.DeepUNet`);
    with `shallow` (the converted `step_cache.ShallowUNet`), it runs that tier's shallow steps."""

    def __init__(
        self,
        compiled: Any,
        config: Any,
        dtype: torch.dtype,
        recompile: Callable[[], Any] | None = None,
        shallow: _CompiledModule | None = None,
    ):
        super().__init__(compiled, dtype, recompile)
        self.config = config
        self.shallow_part = shallow

    def deep(self, sample: torch.Tensor, timestep: Any, text: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        output = self.forward(sample, timestep, text, return_dict=False)[0]
        return output, self.output(1)

    def shallow(self, sample: torch.Tensor, timestep: Any, text: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        assert self.shallow_part is not None
        step = torch.as_tensor(timestep, dtype=torch.float32).reshape(-1)[:1].reshape(())
        return self.shallow_part.run(
            sample.detach().float().numpy(),
            step.numpy(),
            text.detach().float().numpy(),
            features.detach().float().numpy(),
        )

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


def converted_unet_folder(source: Path, cache_dir: Path, quantize: str, dtype: torch.dtype, loras: str = "") -> Path:
    """Where the UNet of `source` converted as asked is cached; `loras` names the LoRAs fused into
    it (`engines.image.lora.identity`), so each set of LoRAs and weights is a conversion of its own."""
    calibrated = quantize == "int8-full"  # its IR also depends on the calibration recipe
    conversion = f"{CONVERSION_VERSION}+calibration{CALIBRATION_VERSION}" if calibrated else CONVERSION_VERSION
    if loras:
        conversion = f"{conversion}+{loras}"
    return cache_dir / cache_key(source / "unet", quantize, dtype, conversion)


def shallow_unet_folder(source: Path, cache_dir: Path, dtype: torch.dtype, loras: str = "") -> Path:
    """Where the shallow path of `source`'s UNet (the balanced tier's, `step_cache.ShallowUNet`) is
    cached: always float, as it is under a tenth of the UNet's work."""
    conversion = f"{CONVERSION_VERSION}+{loras}" if loras else CONVERSION_VERSION
    return cache_dir / cache_key(source / "unet", "shallow", dtype, conversion)


def cached_unet_source(
    source: Path, cache_dir: Path, quantize: str, dtype: torch.dtype, loras: str = ""
) -> Path | None:
    """The cached IR an engine can build its UNet from without reading the PyTorch weights: the
    converted UNet itself, or (for int8 and int8-full) the full-precision one, quantized on the way."""
    for kind in (quantize, "none"):
        folder = converted_unet_folder(source, cache_dir, kind, dtype, loras)
        if (folder / "model.xml").exists():
            return folder
    return None


@dataclasses.dataclass
class OpenVinoSetup:
    """What `use_openvino` needs to put a model folder's pipeline on OpenVINO."""

    source: Path
    unet_config: Any
    unet_cached: bool  # the converted UNet is in the cache: the pipeline loads without the PyTorch one
    on_progress: ProgressCallback | None = None
    loras: str = ""  # the LoRAs fused into the UNet (`engines.image.lora.identity`)


def openvino_setup(
    plan: RuntimePlan, source: Path, on_progress: ProgressCallback | None = None, loras: str = ""
) -> tuple[RuntimePlan, OpenVinoSetup | None]:
    """How to run the model in `source` on OpenVINO as `plan` says; or, where its UNet is one the
    converter cannot take, what `plan.without_openvino` makes of that (PyTorch for `--backend auto`,
    else it raises with the reason)."""
    try:
        unet_config = read_unet_config(source / "unet")
    except (OSError, ValueError) as exc:
        problem: str | None = f"its UNet config could not be read ({exc})"
    else:
        problem = unsupported_reason(unet_config)
    if problem is not None:
        return plan.without_openvino(problem), None
    cached = cached_unet_source(source, plan.openvino_cache, plan.quantize, plan.dtype, loras) is not None
    if step_cache.unsupported_reason(unet_config) is None:
        shallow = shallow_unet_folder(source, plan.openvino_cache, plan.dtype, loras)
        cached = cached and (shallow / "model.xml").exists()
    return plan, OpenVinoSetup(source, unet_config, cached, on_progress, loras)


def _convert_unet(
    pipe: Any,
    unet_dir: Path,
    float_dir: Path,
    cache_dir: Path,
    quantize: str,
    dtype: torch.dtype,
    say: ConversionProgress,
    unet_config: Any,
) -> None:
    """Put the converted UNet at `unet_dir`. int8-full first needs the float one (`float_dir`,
    converted here unless cached) to run the calibration images with."""
    float_cached = (float_dir / "model.xml").exists()
    if pipe.unet is None and not float_cached:
        raise OpenVinoUnavailable(f"The converted UNet is gone from {cache_dir}; load the model again.")
    if quantize != "int8-full":
        # int8 weights are compressed from the cached float IR where there is one: no second trace.
        converted = float_dir if quantize == "int8" and float_cached else None
        module = None if converted is not None else DeepUNet(pipe.unet.eval())
        convert(module, () if module is None else _unet_example(pipe.unet), unet_dir, quantize, say, converted)
        return
    if not float_cached:
        convert(DeepUNet(pipe.unet.eval()), _unet_example(pipe.unet), float_dir, "none", say)
    import openvino as ov

    from muselab.quantize import return_freed_memory

    pipe.unet = None  # converted: the PyTorch UNet's 3.4 GB (SD 1.x) would only add to the peak below
    return_freed_memory()

    calibrating = OpenVinoUNet(compile_ir(float_dir, dtype), unet_config, dtype)
    samples = record_unet_inputs(pipe, calibrating, say)
    del calibrating  # its packed weights, before NNCF compiles a copy of its own
    return_freed_memory()
    say.step += 1
    say(f"Quantizing the unet's weights and activations to int8 (NNCF, {len(samples)} calibration calls)")
    model = quantize_activations(ov.Core().read_model(float_dir / "model.xml"), samples)
    say("Saving the quantized unet")
    save_atomically(model, unet_dir)


def use_openvino(
    pipe: Any,
    source: Path,
    cache_dir: Path,
    dtype: torch.dtype,
    quantize: str = "none",
    on_progress: ProgressCallback | None = None,
    unet_config: Any = None,
    loras: str = "",
) -> dict[str, float]:
    """Swap the pipeline's UNet and VAE decoder for OpenVINO ones, converting them first when the
    cache (`cache_dir`) does not hold them yet. `pipe.unet` may be None (the pipeline was loaded
    without it because the converted UNet is cached); then pass `unet_config`
    (`read_unet_config`). `dtype` is the dtype the PyTorch components were loaded in and the
    precision OpenVINO computes in. Returns the seconds spent converting and compiling."""
    from muselab.quantize import return_freed_memory

    timings = {"convert_s": 0.0, "compile_s": 0.0}
    unet_dir = converted_unet_folder(source, cache_dir, quantize, dtype, loras)
    float_dir = converted_unet_folder(source, cache_dir, "none", dtype, loras)
    decoder_dir = cache_dir / cache_key(source / "vae", "none", dtype, CONVERSION_VERSION)
    unet_config = unet_config if pipe.unet is None else pipe.unet.config
    splits = step_cache.unsupported_reason(unet_config) is None
    shallow_dir = shallow_unet_folder(source, cache_dir, dtype, loras) if splits else None
    wanted = (unet_dir, decoder_dir, *((shallow_dir,) if shallow_dir else ()))
    missing = [folder for folder in wanted if not (folder / "model.xml").exists()]
    stages = 3 * len(missing) + 1
    if quantize == "int8-full" and unet_dir in missing and not (float_dir / "model.xml").exists():
        stages += 3  # the float UNet first: the calibration images run on it
    # Progress only when there is one-time work; a cached load is quick and quiet.
    say = ConversionProgress(stages, on_progress if missing else None)
    started = time.perf_counter()
    if shallow_dir in missing:  # first: int8-full's conversion lets go of the PyTorch UNet
        if pipe.unet is None:
            raise OpenVinoUnavailable(f"The UNet's shallow path is gone from {cache_dir}; load the model again.")
        convert(ShallowUNet(pipe.unet.eval()), _shallow_example(pipe.unet), shallow_dir, "none", say)
    if unet_dir in missing:
        _convert_unet(pipe, unet_dir, float_dir, cache_dir, quantize, dtype, say, unet_config)
    if decoder_dir in missing:
        decoder = _DecoderForExport(pipe.vae.decoder.eval())
        convert(decoder, _decoder_example(pipe.vae), decoder_dir, "none", say)
    timings["convert_s"] = time.perf_counter() - started
    say("Compiling the OpenVINO models")
    started = time.perf_counter()
    shallow = None
    if shallow_dir is not None:
        recompile = functools.partial(compile_ir, shallow_dir, dtype)
        shallow = _CompiledModule(recompile(), dtype, recompile=recompile)
    unet = OpenVinoUNet(
        compile_ir(unet_dir, dtype),
        unet_config,
        dtype,
        recompile=functools.partial(compile_ir, unet_dir, dtype),
        shallow=shallow,
    )
    decoder = OpenVinoDecoder(
        compile_ir(decoder_dir, dtype), dtype, recompile=functools.partial(compile_ir, decoder_dir, dtype)
    )
    pipe.unet = unet
    pipe.vae.decoder = decoder
    if hasattr(pipe, "_is_unet_config_sample_size_int"):  # set from the UNet in the pipeline's __init__
        pipe._is_unet_config_sample_size_int = isinstance(unet_config.sample_size, int)
    return_freed_memory()  # the PyTorch UNet and decoder just dropped
    timings["compile_s"] = time.perf_counter() - started
    say("OpenVINO models ready", advance=False)
    return timings
