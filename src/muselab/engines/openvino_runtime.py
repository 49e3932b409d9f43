"""What both OpenVINO paths (images: `engines.image.openvino`, music: `engines.music.openvino`)
share: whether OpenVINO and NNCF are installed, cache keys, int8 weight compression, atomic saves
into the conversion cache, compiling for the CPU, and a compiled model that a cancel can stop
midway. Nothing here knows about a model family; the `openvino` and `nncf` packages themselves
are imported only when used (the first conversion or compile), so this module is cheap to import.
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
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from muselab.engines.base import Cancelled, ModelUnavailable, ProgressCallback, ProgressEvent, current_cancel

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


def missing_packages(quantize: str) -> str | None:
    """What the OpenVINO backend with `quantize` lacks here, as the message to show, or None."""
    if not openvino_available():
        return (
            "The OpenVINO backend needs the 'openvino' package, which is not installed.\n"
            "Fix: pip install openvino   (or use --backend torch)"
        )
    if quantize != "none" and not nncf_available():
        return (
            "int8 for the OpenVINO backend comes from NNCF, which is not installed.\n"
            "Fix: pip install nncf   (or use --quantize none, or --backend torch)"
        )
    return None


def require_openvino(quantize: str) -> None:
    missing = missing_packages(quantize)
    if missing is not None:
        raise OpenVinoUnavailable(missing)


def precision_hint(dtype: torch.dtype) -> str:
    """OpenVINO's CPU plugin picks bf16 by itself wherever the CPU has the instructions, even where
    they are slower than float32 (measured here: 13 s against 8.5 s a UNet step), so the dtype
    chosen by muselab's own probe (`devices.choose_placement`) is passed on explicitly."""
    return "bf16" if dtype == torch.bfloat16 else "f32"


def cache_key(component_folder: Path, quantize: str, dtype: torch.dtype, conversion: int | str) -> str:
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


def compile_ir(model: Any, dtype: torch.dtype, **options: Any) -> Any:
    """Compile for the CPU, for one request at a time in muselab's dtype: `model` is a converted
    folder (its model.xml) or an `ov.Model`; `options` add plugin properties."""
    import openvino as ov

    source = model / "model.xml" if isinstance(model, Path) else model
    properties = {
        "INFERENCE_PRECISION_HINT": precision_hint(dtype),
        "PERFORMANCE_HINT": "LATENCY",
        # Denormal numbers as zero, as `devices.flush_denormals` does for PyTorch: OpenVINO's own
        # threads run without it by default, and a matmul fed denormals ran 130x slower here.
        "CPU_DENORMALS_OPTIMIZATION": True,
        **options,
    }
    return ov.Core().compile_model(source, "CPU", properties)


#: How often a running inference looks at its job's cancel token.
CANCEL_POLL_MS = 50


class _CompiledModule(torch.nn.Module):
    """Calls one compiled OpenVINO model; it has no parameters, only the `dtype` and `device`
    diffusers reads from every pipeline component."""

    def __init__(self, compiled: Any, dtype: torch.dtype, recompile: Callable[[], Any] | None = None):
        """`recompile` makes the compiled model anew: with it, a run stops midway when its job is
        cancelled (see `run`); without it, a run always finishes."""
        super().__init__()
        self.compiled = compiled
        self.request = compiled.create_infer_request()
        self._dtype = dtype
        self._recompile = recompile
        self._stale = False

    @property
    def dtype(self) -> torch.dtype:
        return self._dtype

    @property
    def device(self) -> torch.device:
        return torch.device("cpu")

    def run(self, *inputs: np.ndarray) -> torch.Tensor:
        cancel = current_cancel() if self._recompile is not None else None
        if self._stale:
            # OpenVINO's CPU graph is left in a broken state by a cancelled inference (its next
            # one at another size fails shape inference, even in a new request): compile again.
            assert self._recompile is not None
            self.compiled = self._recompile()
            self.request = self.compiled.create_infer_request()
            self._stale = False
        if cancel is None:
            self.request.infer(list(inputs), share_inputs=True)
        elif cancel.cancelled:  # before it starts: nothing to stop, the graph stays sound
            raise Cancelled()
        else:
            # Run it asynchronously and watch the job's cancel token (a Cancel button, the time
            # limit, a shutdown): one step of a large picture takes minutes on a CPU.
            self.request.start_async(list(inputs), share_inputs=True)
            while not self.request.wait_for(CANCEL_POLL_MS):
                if cancel.cancelled:
                    self.request.cancel()
                    with contextlib.suppress(RuntimeError):
                        self.request.wait()  # raises at once: cancelled
                    self._stale = True
                    raise Cancelled()
        return self.output(0)

    def output(self, index: int) -> torch.Tensor:
        """Output `index` of the last run. The request reuses its output buffers on the next call:
        copied before handing it out."""
        return torch.from_numpy(np.array(self.request.get_output_tensor(index).data, copy=True)).to(self._dtype)
