"""What every engine shares: progress events, cancellation, results and model loading errors."""

from __future__ import annotations

import contextvars
import re
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from muselab.config import looks_like_path
from muselab.devices import Placement
from muselab.schemas import Request


@dataclass(frozen=True)
class ProgressEvent:
    """One step of work done. `step`/`total` count over the whole request (all images or clips)."""

    stage: str  # "generating", "decoding", or "converting" (a one-time model conversion while loading)
    step: int
    total: int
    elapsed: float
    eta: float | None
    item: int = 0  # which image or clip (0-based) is being made
    items: int = 1
    preview: Any = None  # a small PIL image, every few image steps when asked for
    note: str = ""  # what is being done, in words (conversion stages)

    @property
    def fraction(self) -> float:
        return self.step / self.total if self.total else 0.0


ProgressCallback = Callable[[ProgressEvent], None]


def wants_previews(on_progress: ProgressCallback | None) -> bool:
    """Whether the listener shows pictures as they form: one that does says so with an attribute
    `previews = True` (the job service's does), and an engine that can draw them then does."""
    return bool(getattr(on_progress, "previews", False))


class Cancelled(Exception):
    """The user cancelled; `completed` holds the outputs finished before that moment."""

    def __init__(self, completed: list[Any] | None = None):
        super().__init__("cancelled")
        self.completed = completed or []


class CancelToken:
    """Set from any thread; the engine checks it between steps and stops within one step."""

    def __init__(self) -> None:
        self._event = threading.Event()

    def cancel(self) -> None:
        self._event.set()

    @property
    def cancelled(self) -> bool:
        return self._event.is_set()

    def wait(self, timeout: float | None = None) -> bool:
        """Block until cancelled (True) or `timeout` passes (False)."""
        return self._event.wait(timeout)

    def raise_if_cancelled(self) -> None:
        if self._event.is_set():
            raise Cancelled()


_CURRENT_CANCEL: contextvars.ContextVar[CancelToken | None] = contextvars.ContextVar("muselab_cancel", default=None)


@contextmanager
def cancellable(cancel: CancelToken) -> Iterator[None]:
    """Within this block, a long call that can be stopped midway (one OpenVINO inference: a UNet
    step of a large picture can take minutes on a CPU) checks `cancel` while it runs, not only
    between steps: see `current_cancel`."""
    token = _CURRENT_CANCEL.set(cancel)
    try:
        yield
    finally:
        _CURRENT_CANCEL.reset(token)


def current_cancel() -> CancelToken | None:
    return _CURRENT_CANCEL.get()


class ProgressClock:
    """Counts steps and estimates time left from the steps done so far."""

    def __init__(self, total: int, on_progress: ProgressCallback | None, items: int = 1):
        self.total, self.items, self.on_progress = total, items, on_progress
        self.start = time.perf_counter()
        self.first_step_at: float | None = None
        self.first_step = 0  # the step count when `first_step_at` was taken
        self.step = 0

    def advance(self, item: int, stage: str = "generating", preview: Any = None, steps: int = 1) -> None:
        """`steps` done at once: a batch (clips sampled together) finishes one step of each per call."""
        self.step += steps
        now = time.perf_counter()
        if self.first_step_at is None:
            # The first step carries one-off costs (allocation, text encoding); estimate from it
            # only until a second step is seen.
            self.first_step_at, self.first_step = now, self.step
            eta = (now - self.start) / self.step * (self.total - self.step)
        else:
            per_step = (now - self.first_step_at) / max(self.step - self.first_step, 1)
            eta = per_step * (self.total - self.step)
        self.emit(stage, item, eta, preview)

    def emit(self, stage: str, item: int, eta: float | None, preview: Any = None) -> None:
        if self.on_progress is not None:
            event = ProgressEvent(
                stage=stage,
                step=self.step,
                total=self.total,
                elapsed=time.perf_counter() - self.start,
                eta=max(eta, 0.0) if eta is not None else None,
                item=item,
                items=self.items,
                preview=preview,
            )
            self.on_progress(event)


@dataclass
class ImageOutput:
    image: Any  # PIL.Image.Image
    seed: int
    flagged: bool = False


@dataclass
class MusicOutput:
    audio: Any  # numpy float32 array, (samples, channels)
    sample_rate: int
    seed: int
    #: A long piece stopped before its end: the seconds it kept (its windows finished).
    stopped_at: float | None = None


@dataclass
class GenerationResult:
    """Outputs plus the fully resolved request (every default filled in) that made them."""

    request: Request
    outputs: list[Any]
    model_name: str
    device: str
    dtype: str
    seconds: float
    timings: dict[str, float] = field(default_factory=dict)


def engine_result(engine: Any, request: Request, outputs: list[Any], started: float | None = None) -> GenerationResult:
    """Wrap outputs made by `engine` (all of them, or those finished before a cancel)."""
    return GenerationResult(
        request=request,
        outputs=outputs,
        model_name=engine.model_name,
        device=engine.placement.device,
        dtype=engine.placement.dtype_name,
        seconds=time.perf_counter() - started if started is not None else 0.0,
    )


class Engine(Protocol):
    kind: str
    model: str
    placement: Placement

    @property
    def model_name(self) -> str: ...

    def resolve(self, request: Any) -> Any:
        """`request` with every default filled in (seed, sizes, the model by its label)."""
        ...

    def steps(self, request: Any) -> int:
        """The progress steps `request` takes: the `total` its progress events count to."""
        ...

    def generate(
        self,
        request: Any,
        on_progress: ProgressCallback | None = None,
        cancel: CancelToken | None = None,
    ) -> GenerationResult: ...


class ModelUnavailable(RuntimeError):
    """The model's weights cannot be loaded; the message says why and how to fix it."""


_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?$")
# Only what from_pretrained needs with use_safetensors=True; never pickled weights.
DOWNLOAD_PATTERNS = ["*.json", "*.txt", "*.safetensors", "*.model", "*.md"]
SKIP_PATTERNS = ["*.fp16.*", "*non_ema*", "*ema-only*", "*.onnx*", "*.msgpack", "*.h5"]


def locate_model(model: str, offline: bool, kind: str) -> str:
    """A local folder holding `model`: the folder itself, its cached snapshot, or a fresh download.

    Hub ids found in the Hugging Face cache load with no network at all; missing ones are
    downloaded (with a progress bar) unless offline. Anything else raises ModelUnavailable.
    """
    path = Path(model).expanduser()
    if path.is_dir():
        return str(path)
    if looks_like_path(model) or path.exists():
        raise ModelUnavailable(
            f"The {kind} model folder '{model}' does not exist (or is not a folder).\n"
            f"Fix: pass --model with a folder that holds a saved {kind} model, or a hub id."
        )
    if not _HUB_ID.match(model):
        raise ModelUnavailable(
            f"'{model}' is neither a local folder nor a Hugging Face hub id (like 'facebook/musicgen-small')."
        )
    cached = cached_snapshot(model)
    if cached is not None:
        return str(cached)
    if offline:
        raise ModelUnavailable(missing_weights_message(model, kind, "you are offline (HF_HUB_OFFLINE or --offline)"))
    return str(download_model(model, kind))


def cached_snapshot(model_id: str) -> Path | None:
    """The cached snapshot folder of a hub id, if a complete-looking one is there."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        folder = Path(snapshot_download(model_id, local_files_only=True))
    except (LocalEntryNotFoundError, OSError, ValueError):
        return None
    has_config = (folder / "config.json").exists() or (folder / "model_index.json").exists()
    return folder if has_config else None


def download_model(model_id: str, kind: str = "requested") -> Path:
    """Fetch a hub model's safetensors weights and configs into the cache, with a progress bar."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError

    if not hub_reachable():
        raise ModelUnavailable(missing_weights_message(model_id, kind, "huggingface.co cannot be reached"))
    try:
        return Path(snapshot_download(model_id, allow_patterns=DOWNLOAD_PATTERNS, ignore_patterns=SKIP_PATTERNS))
    except (OSError, HfHubHTTPError, ValueError) as exc:
        raise ModelUnavailable(missing_weights_message(model_id, kind, _hub_failure(exc))) from None


def hub_reachable(timeout: float = 5.0) -> bool:
    """A quick TCP check, so an unplugged machine fails in seconds, not after minutes of retries."""
    import socket
    from urllib.parse import urlparse

    from huggingface_hub import constants

    url = urlparse(constants.ENDPOINT)
    try:
        with socket.create_connection((url.hostname or "", url.port or 443), timeout=timeout):
            return True
    except OSError:
        return False


def _hub_failure(exc: BaseException) -> str:
    text = str(exc).lower()
    if "gated" in text or "401" in text or "403" in text:
        return "the repository is gated or private: accept its licence on huggingface.co and log in (`hf auth login`)"
    if "404" in text or "not found" in text:
        return "no such repository exists on the hub (check the id)"
    return f"the download failed ({_first_line(exc)})"


def missing_weights_message(model: str, kind: str, why: str) -> str:
    return (
        # No folder here: the message reaches API clients; `muselab doctor` names the cache folder.
        f"The {kind} model '{model}' is not available: it is not in the local Hugging Face cache and {why}.\n"
        "Fix it with one of:\n"
        f"  - download it while online:   muselab models download {model}\n"
        "  - use a saved copy:           --model PATH (a folder)\n"
        "  - try the pipeline offline:   --preset tiny (tiny random-weight models; the output is noise)"
    )


# transformers and diffusers build models under process-wide context managers (meta-device
# initialisation), so two loads in two threads corrupt each other: one load at a time.
LOADING = threading.Lock()


def load_or_explain(load: Callable[[], Any], model: str, kind: str) -> Any:
    """Run a from_pretrained call on a local folder, turning its failures into ModelUnavailable."""
    try:
        with LOADING:
            return load()
    except ModelUnavailable:
        raise
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ModelUnavailable(
            f"'{model}' could not be loaded as a {kind} model (safetensors weights are required): {_first_line(exc)}"
        ) from None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0][:300]
