"""How and where an engine runs, decided once: the `RuntimePlan`.

A plan says which device and dtype (`devices.choose_placement`), whether the weights are int8, what
runs the heavy part (PyTorch, or OpenVINO on a CPU), whether a GPU offloads sub-models, and the
settings loading needs (OpenVINO's conversion cache, offline, ...), each choice with its reason in
words. `image_plan` and `music_plan` make a family's plan from the `Settings`; loading an engine
carries it out (`ImageEngine.load`, `MusicEngine.load`) and `describe_runtime` shows it
(`muselab doctor`, the API's /api/info, the studio's front page), so what is shown is what loading
does. What only loading can find out (a model the OpenVINO path cannot convert) is settled by
`RuntimePlan.without_openvino`, and the engine's `placement` then says what runs in the end.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from muselab.config import FAST_DECODER, Kind, Settings
from muselab.devices import Placement, choose_placement, physical_memory_gib
from muselab.engines.openvino_runtime import (
    OpenVinoUnavailable,
    missing_packages,
    nncf_available,
    openvino_available,
    openvino_version,
)
from muselab.quantize import fbgemm_available


@dataclass(frozen=True)
class RuntimePlan:
    """Everything loading decides before it reads a weight, with the reasons."""

    kind: Kind
    model: str  # as messages name it: the hub id or folder, or "the image model" before one is chosen
    placement: Placement  # device and dtype, and why
    quantize: str  # "none", "int8", "int8-dynamic" (music) or "int8-full" (images)
    quantize_reason: str
    requested_backend: str  # the --backend setting: "auto", "torch" or "openvino"
    backend: str  # what runs the UNet and VAE decoder, or MusicGen's decoder: "torch" or "openvino"
    backend_reason: str
    #: `--backend auto` chose OpenVINO: should loading find it cannot work after all, PyTorch runs
    #: instead of an error (not with int8-full, which exists only on OpenVINO).
    fallback: bool
    #: Why this plan cannot run, as the error loading raises (`require`); None when it can.
    problem: str | None
    low_memory: bool  # attention and VAE slicing, tiled decoding (images)
    offload: bool  # model CPU offload: each sub-model visits the GPU only while it runs (images)
    offload_reason: str
    compile: bool  # torch.compile the UNet (images)
    cuda_graphs: bool  # MusicGen's decoder step replayed as a CUDA graph on a CUDA GPU
    openvino_cache: Path  # where converted models are kept between runs
    offline: bool  # never reach the hub
    safety_checker: bool = True  # images
    fast_decoder: str = FAST_DECODER  # images: the tiny autoencoder (TAESD) for decoder="fast" and previews
    lora_dir: Path | None = None  # images: where the LoRAs a request names are found
    inputs_dir: Path | None = None  # where the pictures and clips a request starts from are kept
    lcm_lora: str = "latent-consistency/lcm-lora-sdv1-5"  # images: the fast tier's LoRA (hub id or folder)

    @property
    def device(self) -> str:
        return self.placement.device

    @property
    def dtype(self) -> torch.dtype:
        return self.placement.dtype

    def require(self) -> None:
        """Raise the error that says why this plan cannot run, if it cannot."""
        if self.problem is not None:
            raise OpenVinoUnavailable(self.problem)

    def without_openvino(self, problem: str) -> RuntimePlan:
        """This plan once loading has found that OpenVINO cannot take the model after all (`problem`,
        in words: its UNet takes conditioning the converter drops, its conversion failed): PyTorch
        where `--backend auto` chose OpenVINO, else OpenVinoUnavailable, naming the problem."""
        if not self.fallback:
            raise OpenVinoUnavailable(_refusal(self.model, self.quantize, problem))
        return dataclasses.replace(
            self, backend="torch", fallback=False, backend_reason=f"{self.backend_reason}, but {problem}: PyTorch"
        )


def image_plan(settings: Settings, placement: Placement | None = None, model: str | None = None) -> RuntimePlan:
    """How an image model runs with `settings` on `placement` (default: the settings' own)."""
    placement = placement or choose_placement(settings.device, settings.dtype)
    model = model or "the image model"
    quantize, quantize_reason = image_quantize(settings.quantize)
    backend, backend_reason, problem = _image_backend(settings, model, placement.device, quantize)
    offload = settings.low_memory and placement.device == "cuda"
    return RuntimePlan(
        kind="image",
        model=model,
        placement=placement,
        quantize=quantize,
        quantize_reason=quantize_reason,
        requested_backend=settings.backend,
        backend=backend,
        backend_reason=backend_reason,
        fallback=settings.backend == "auto" and backend == "openvino" and quantize != "int8-full",
        problem=problem,
        low_memory=settings.low_memory,
        offload=offload,
        offload_reason="--low-memory on a CUDA GPU" if offload else "only with --low-memory on a CUDA GPU",
        compile=settings.compile,
        cuda_graphs=settings.cuda_graphs,
        openvino_cache=settings.openvino_cache,
        offline=settings.is_offline(),
        safety_checker=settings.safety_checker,
        fast_decoder=settings.fast_decoder(),
        lora_dir=settings.loras,
        inputs_dir=settings.inputs,
        lcm_lora=settings.model_for("lcm-lora"),
    )


def music_plan(settings: Settings, placement: Placement | None = None, model: str | None = None) -> RuntimePlan:
    """How a MusicGen model runs with `settings` on `placement` (default: the settings' own)."""
    placement = placement or choose_placement(settings.device, settings.dtype)
    model = model or "the music model"
    quantize, quantize_reason = music_quantize(settings.quantize, placement.device)
    backend, backend_reason, problem = _music_backend(settings.backend, model, placement.device, quantize)
    return RuntimePlan(
        kind="music",
        model=model,
        placement=placement,
        quantize=quantize,
        quantize_reason=quantize_reason,
        requested_backend=settings.backend,
        backend=backend,
        backend_reason=backend_reason,
        fallback=settings.backend == "auto" and backend == "openvino",
        problem=problem,
        low_memory=settings.low_memory,
        offload=False,
        offload_reason="music models load whole",
        compile=False,
        cuda_graphs=settings.cuda_graphs,
        openvino_cache=settings.openvino_cache,
        offline=settings.is_offline(),
        inputs_dir=settings.inputs,
    )


PLANS = {"image": image_plan, "music": music_plan}

#: What an engine made from keywords (`engine_plan`) gets for a setting it is not given: PyTorch,
#: float weights and the Settings' defaults, whatever MUSELAB_ variables say (of those, only the
#: cache folder's reaches such a plan: tests point it away from the user's own).
_ENGINE_DEFAULTS: dict[str, Any] = {
    "backend": "torch",
    "quantize": "none",
    "offline": False,
    "low_memory": False,
    "compile": False,
    "cuda_graphs": True,
    "safety_checker": True,
    "fast_decoder_model": FAST_DECODER,
}


def engine_plan(kind: Kind, model: str, plan: RuntimePlan | Placement | None, options: dict[str, Any]) -> RuntimePlan:
    """`plan` itself, or the plan the keywords an engine was given make on a placement (models built
    in memory, tests, the benchmark): `options` are settings by name (`backend`, `quantize`,
    `low_memory`...), `fast_decoder` and `openvino_cache`, each decided as from `Settings`."""
    if isinstance(plan, RuntimePlan):
        if options:
            raise TypeError(f"a RuntimePlan says it all: {', '.join(sorted(options))} given beside it")
        return plan
    options = dict(options)
    openvino_cache = options.pop("openvino_cache", None)
    lcm_lora = options.pop("lcm_lora", None)
    if "fast_decoder" in options:
        options["fast_decoder_model"] = options.pop("fast_decoder")
    unknown = options.keys() - Settings.model_fields.keys()
    if unknown:
        raise TypeError(f"no such engine option: {', '.join(sorted(unknown))}")
    made = PLANS[kind](Settings(**{**_ENGINE_DEFAULTS, **options}), plan or choose_placement(), model)
    if lcm_lora is not None:
        made = dataclasses.replace(made, lcm_lora=str(lcm_lora))
    return made if openvino_cache is None else dataclasses.replace(made, openvino_cache=Path(openvino_cache))


def image_quantize(setting: str) -> tuple[str, str]:
    """What `--quantize` means for an image model, and why. Image models are bound by compute:
    int8 weights save memory there, not time, so only on request; int8 activations (int8-full) buy
    time but change the picture, so only on request."""
    if setting == "int8-full":
        return "int8-full", "--quantize int8-full was asked for: int8 weights and activations in the UNet"
    if setting in ("int8", "int8-dynamic"):
        return "int8", f"--quantize {setting} was asked for: int8 weights (images have no int8 activations on PyTorch)"
    if setting == "none":
        return "none", "--quantize none was asked for"
    return "none", "image models are bound by compute: int8 weights would save memory, not time"


def music_quantize(setting: str, device: str) -> tuple[str, str]:
    """What `--quantize` means for MusicGen on `device`, and why. Its decoder reads every weight once
    per token: on a CPU int8 makes that step faster (int8 activations too, where fbgemm can multiply
    int8 by int8: measured about 1.6x the weight-only speed, logits within 28-30 dB of float32
    against 32-33 dB); on a GPU the step is bound by per-token overhead, so only on request.
    "int8-full" (an image option: int8 activations in the UNet) leaves music as auto has it."""
    if setting not in ("auto", "int8-full"):
        return setting, f"--quantize {setting} was asked for"
    if device != "cpu":
        return "none", f"on {device} a token is bound by per-token overhead, not by reading the weights"
    if fbgemm_available():
        return "int8-dynamic", "a CPU token reads every decoder weight: int8 weights, and int8 activations (fbgemm)"
    return "int8", "a CPU token reads every decoder weight: int8 weights (no fbgemm here for int8 activations)"


#: OpenVINO's CPU runtime keeps its own packed copy of the weights: an SD 1.x image peaks at about
#: 9.4 GiB there against PyTorch's 5.5 (docs/PERFORMANCE.md), so `auto` wants this much memory.
OPENVINO_AUTO_MIN_MEMORY_GIB = 12.0

INT8_FULL_NEEDS_OPENVINO = (
    "--quantize int8-full (int8 activations) runs on the OpenVINO backend, and {reason}. "
    "Use --quantize int8 (int8 weights, on PyTorch too) or --quantize none."
)


def _on_cpus_only(device: str) -> str:
    return f"it runs on CPUs, and this engine is placed on {device} (use --device cpu)"


def _refusal(model: str, quantize: str, problem: str) -> str:
    """The error for an OpenVINO that cannot take `model` where PyTorch may not stand in for it."""
    if quantize == "int8-full":
        return INT8_FULL_NEEDS_OPENVINO.format(reason=f"'{model}' cannot use it: {problem}")
    return f"'{model}' cannot use the OpenVINO backend: {problem}. Or use --backend torch."


def auto_uses_openvino(device: str, quantize: str, low_memory: bool = False, compile: bool = False) -> bool:
    """What `--backend auto` means for an image model: OpenVINO on a CPU (as fast as PyTorch or
    faster, same pictures), unless `auto_openvino_obstacle` names a reason not to."""
    return auto_openvino_obstacle(device, quantize, low_memory, compile) is None


def auto_openvino_obstacle(device: str, quantize: str, low_memory: bool = False, compile: bool = False) -> str | None:
    """Why `--backend auto` keeps PyTorch for an image model, in words, or None: it is not
    installed, or memory matters more (`--quantize int8`, whose memory saving OpenVINO's float32
    weight copies would undo; `--low-memory`; a machine with less than
    OPENVINO_AUTO_MIN_MEMORY_GIB, which the one-time conversion needs), or `--compile` (a PyTorch
    feature) is on. `--quantize int8-full` exists only on OpenVINO (and needs NNCF)."""
    if device != "cpu":
        return _on_cpus_only(device)
    if compile:
        return "--compile is for the PyTorch backend (turn it off)"
    if low_memory:
        return "--low-memory keeps PyTorch (turn it off)"
    if quantize == "int8":
        return "--quantize int8 saves more memory on PyTorch"
    if not openvino_available() or (quantize == "int8-full" and not nncf_available()):
        return "the openvino and nncf packages are not both installed (pip install openvino nncf)"
    if physical_memory_gib() < OPENVINO_AUTO_MIN_MEMORY_GIB:
        return (
            f"this machine has {physical_memory_gib():.0f} GiB of RAM, less than the "
            f"{OPENVINO_AUTO_MIN_MEMORY_GIB} GiB the one-time conversion needs (--backend openvino to try anyway)"
        )
    return None


def _image_backend(settings: Settings, model: str, device: str, quantize: str) -> tuple[str, str, str | None]:
    """(backend, why, problem) for an image model. `auto` quietly keeps PyTorch where OpenVINO
    would not suit (`auto_openvino_obstacle`); an explicit "openvino" that cannot work here is an
    error that says why, and so is int8-full anywhere OpenVINO does not run."""
    if settings.backend == "openvino":
        if device != "cpu":
            problem = _refusal(model, quantize, _on_cpus_only(device))
        elif settings.compile:
            problem = _refusal(model, quantize, "--compile is for the PyTorch backend (turn one of them off)")
        else:
            problem = missing_packages(quantize)
        return "openvino", "--backend openvino was asked for", problem
    if settings.backend == "torch":
        obstacle: str | None = "--backend torch was asked for"
        why = obstacle
    else:
        obstacle = auto_openvino_obstacle(device, quantize, settings.low_memory, settings.compile)
        if obstacle is None:
            return "openvino", "--backend auto on a CPU: OpenVINO, as fast as PyTorch or faster, same pictures", None
        why = f"--backend auto keeps PyTorch: {obstacle}"
    problem = INT8_FULL_NEEDS_OPENVINO.format(reason=obstacle) if quantize == "int8-full" else None
    return "torch", why, problem


def _music_backend(requested: str, model: str, device: str, quantize: str) -> tuple[str, str, str | None]:
    """(backend, why, problem) for MusicGen's decoder steps. `auto` means OpenVINO on a CPU for
    int8 weights (the CPU default), where it is installed: faster tokens at the same error. With
    float32 weights it keeps PyTorch, which would otherwise hold a second float32 copy while
    converting. An explicit "openvino" that cannot work here is an error that says why."""
    if requested == "torch":
        return "torch", "--backend torch was asked for", None
    if requested == "openvino":
        problem = missing_packages(quantize)
        if device != "cpu":
            problem = (
                f"'{model}' cannot use the OpenVINO backend: it runs on CPUs, and this engine is placed on "
                f"{device} (use --device cpu, or --backend torch)."
            )
        return "openvino", "--backend openvino was asked for", problem
    if device != "cpu":
        obstacle = f"OpenVINO runs on CPUs, and this engine is placed on {device}"
    elif quantize == "none":
        obstacle = "float32 weights would be held twice while converting"
    elif missing_packages(quantize) is not None:
        obstacle = "the openvino and nncf packages are not both installed (pip install openvino nncf)"
    else:
        return "openvino", "--backend auto on a CPU with int8 weights: OpenVINO, faster tokens at the same error", None
    return "torch", f"--backend auto keeps PyTorch: {obstacle}", None


def describe_runtime(settings: Settings, public: bool = False) -> dict[str, str]:
    """Where and how the engines will run with `settings`, and why: what `muselab doctor`, the API's
    /api/info and the UI's front page show, so a user can see why generation is as fast as it is.
    `*_engine` is `torch`, `openvino` or `unavailable`; `*_backend` says more. `public` names no
    folder of the machine and no library version (the API may be exposed, and versions tell an
    attacker which known holes to try)."""
    placement = choose_placement(settings.device, settings.dtype)
    image, music = image_plan(settings, placement), music_plan(settings, placement)
    version = "" if public else f" {openvino_version()}"
    cached = "" if public else f", cached in {image.openvino_cache}"
    image_engine, image_backend = _shown(image, f"openvino{version} (models converted once{cached})")
    music_engine, music_backend = _shown(music, f"openvino{version} (decoder converted once{cached})")
    return {
        "device": placement.device,
        "dtype": placement.dtype_name,
        "reason": placement.reason,
        "quantize_music": music.quantize,
        "quantize_image": image.quantize,
        "image_engine": image_engine,
        "image_backend": image_backend,
        "music_engine": music_engine,
        "music_backend": music_backend,
    }


def _shown(plan: RuntimePlan, on_openvino: str) -> tuple[str, str]:
    """A plan as `describe_runtime` shows it: (engine, the backend in words)."""
    if plan.problem is not None:
        if plan.backend == "torch":  # int8-full, where OpenVINO does not run
            return (
                "unavailable",
                "UNAVAILABLE: --quantize int8-full needs the OpenVINO backend (see `muselab image --help`)",
            )
        if plan.kind == "image" and not openvino_available():
            return "unavailable", "openvino (NOT INSTALLED: pip install openvino)"
        return "unavailable", f"openvino (UNAVAILABLE: {plan.problem.splitlines()[0]})"
    if plan.backend == "openvino":
        return "openvino", on_openvino
    if openvino_available() or (plan.kind == "image" and plan.requested_backend == "torch"):
        return "torch", "torch"
    return "torch", "torch (openvino is not installed)"
