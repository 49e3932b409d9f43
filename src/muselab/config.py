"""Settings (environment variables prefixed ``MUSELAB_`` or CLI flags) and the model catalogue."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import platformdirs
from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from muselab.families import catalogue, tiny_models
from muselab.schemas import SPEED_CHOICES, Speed

Kind = Literal["music", "image"]
Preset = Literal["default", "tiny"]
DeviceChoice = Literal["auto", "cpu", "cuda", "mps"]
DtypeChoice = Literal["auto", "float32", "bfloat16", "float16"]
QuantizeChoice = Literal["auto", "none", "int8", "int8-dynamic", "int8-full"]
BackendChoice = Literal["auto", "torch", "openvino"]
WorkersChoice = Literal["local", "ray"]


#: The tiny autoencoder (TAESD) for SD 1.x/2.x latents: previews and the fast decoder.
FAST_DECODER = "madebyollin/taesd"


def default_model(kind: str) -> str:
    """The catalogue's default model of `kind`: the first family of that kind names it."""
    model = next((entry.id for entry in catalogue(kind) if entry.default), None)
    if model is None:
        raise KeyError(f"no default {kind} model: name one with --model or MUSELAB_MODELS")
    return model


class Settings(BaseSettings):
    """Every setting can come from an environment variable, e.g. ``MUSELAB_DATA_DIR``."""

    model_config = SettingsConfigDict(env_prefix="MUSELAB_", extra="ignore")

    data_dir: Path = Field(
        default_factory=lambda: Path(platformdirs.user_data_dir("muselab")),
        description="Where outputs, history and the tiny models live.",
    )
    cache_dir: Path = Field(
        default_factory=lambda: Path(platformdirs.user_cache_dir("muselab")),
        description="Derived files worth keeping between runs: models converted for OpenVINO.",
    )
    output_dir: Path | None = Field(default=None, description="Where generated files go; default <data_dir>/outputs.")
    lora_dir: Path | None = Field(
        default=None, description="Where LoRA files (NAME.safetensors) are; default <data_dir>/loras."
    )
    preset: Preset = Field(
        default="default",
        description="'tiny' swaps every model for a tiny random-weight one built locally "
        "(for trying the pipeline and for tests; the output is noise).",
    )
    music_model: str | None = Field(default=None, description="Hub id or folder of the music model.")
    image_model: str | None = Field(default=None, description="Hub id or folder of the image model.")
    fast_decoder_model: str | None = Field(
        default=None, description="Hub id or folder of the tiny autoencoder (TAESD) for fast decoding."
    )
    models: dict[str, str] = Field(
        default_factory=dict,
        description="Models of other kinds (a plugin family's), by kind, as JSON: "
        'MUSELAB_MODELS=\'{"sine": "/path/to/folder"}\'.',
    )
    speed: Speed = Field(default="auto", description=f"Image speed tier when a request names none. {SPEED_CHOICES}")
    device: DeviceChoice = "auto"
    dtype: DtypeChoice = "auto"
    quantize: QuantizeChoice = Field(
        default="auto",
        description="'int8' stores the linear layers of the UNet, the text encoders and the MusicGen model "
        "as int8: a quarter of float32's memory and slightly different output. 'auto' uses int8 only where it "
        "buys speed: MusicGen on a CPU, whose token loop is bound by reading the weights (there int8-dynamic "
        "where the CPU can). 'int8-dynamic' also quantizes MusicGen's activations per token (x86 CPUs): "
        "faster still, a little more error. 'int8-full' also quantizes the image UNet's activations "
        "(OpenVINO on a CPU; calibrated once at conversion, a few minutes): UNet steps about 2.4x faster "
        "on CPUs with VNNI, pictures close to float32 but not identical; music as with 'auto'.",
    )
    backend: BackendChoice = Field(
        default="auto",
        description="What runs the image model's UNet and VAE decoder and MusicGen's decoder. 'openvino' "
        "converts them once to OpenVINO (cached under <cache_dir>/openvino) and runs them there. 'auto' picks it "
        "on a CPU when the openvino package is installed. Images: the faster of the two at the same output "
        "(1.0-1.3x measured), unless memory matters more: it keeps its own copy of the weights (SD 1.x peaks at "
        "9.4 GiB against 5.5), so not with --quantize int8 or --low-memory or under 12 GiB of RAM; nor with "
        "--compile. Music: the decoder step as one compiled graph with int8 weights and an in-place KV cache, "
        "faster tokens at the same error as PyTorch's int8. 'torch' keeps PyTorch everywhere.",
    )
    low_memory: bool = Field(
        default=False,
        description="Trade speed for memory: attention slicing, VAE slicing and tiling, "
        "on CUDA model CPU offload (each sub-model moves to the GPU only while it runs), and one model "
        "loaded at a time (jobs for different models take turns; a scene unloads its image model "
        "before loading its music model).",
    )
    compile: bool = Field(
        default=False,
        description="torch.compile the UNet on load: faster steps after a one-time compile of a minute or more.",
    )
    cuda_graphs: bool = Field(
        default=True,
        description="On a CUDA GPU, run each MusicGen token as one replay of a captured CUDA graph of the "
        "decoder step (measured 4.3-4.4x faster than launching its kernels one by one on an H100 and an H200, 15x on "
        "the first clip of a length). False launches them one by one.",
    )
    safety_checker: bool = True
    offline: bool | None = Field(default=None, description="Never reach the hub; default follows HF_HUB_OFFLINE.")

    prepare_models: bool = Field(
        default=True,
        description="When the studio or the server starts, load the configured models in the background "
        "(converting them first for OpenVINO, once), so the first Generate does not wait for it. Only models "
        "whose weights are on this machine; not with --low-memory.",
    )
    # Job service
    max_queue: int = Field(default=16, ge=1, le=10_000, description="Jobs waiting or running at once.")
    max_models: int = Field(default=2, ge=1, le=16, description="Models kept loaded (least recently used go).")
    job_timeout: float = Field(
        default=1800.0,
        gt=0,
        description="Seconds a job may run, once its model is loaded, before it is stopped (a one-time conversion "
        "while loading is not counted).",
    )
    # HTTP API
    host: str = "127.0.0.1"
    port: int = Field(default=7860, ge=1, le=65535)
    api_token: str | None = Field(default=None, description="Required as 'Authorization: Bearer ...' when set.")
    cors_origins: list[str] = Field(default_factory=list, description="Web origins allowed to call the API.")
    max_body_bytes: int = Field(default=64 * 1024, ge=1024)
    max_upload_body_bytes: int = Field(
        default=32 * 2**20,
        ge=1024,
        description="Body limit of the routes that take a picture (a starting image): 20 MB in base64.",
    )
    client_timeout: float = Field(
        default=30.0,
        gt=0,
        le=3600,
        description="Seconds an HTTP client may take to send a request's headers or its body; slower ones are dropped.",
    )
    allow_any_model: bool = Field(
        default=False,
        description="Let API and studio clients name any hub id or a folder on this machine as a model. Off, they "
        "may name the catalogue's models and the configured ones (a folder by its name), and a path never "
        "reaches the file system. The CLI, run by this machine's user, may always name folders.",
    )
    # Many jobs at once: batches, dynamic prompts, grids, webhooks
    max_batch_items: int = Field(
        default=1000, ge=1, le=100_000, description="Jobs one batch or grid may hold (after dynamic prompts expand)."
    )
    dynamic_prompts: bool = Field(
        default=True,
        description="Expand {a|b|c} and __wildcard__ in prompts (dynamicprompts); off, prompts run as written.",
    )
    wildcard_dir: Path | None = Field(
        default=None, description="Wildcard files (NAME.txt, one choice a line); default <data_dir>/wildcards."
    )
    webhook_hosts: list[str] = Field(
        default_factory=list,
        description="Hosts (host or host:port) a job's callback URL may name; empty, callbacks are refused. "
        "Only these: a callback must not make the server reach other machines.",
    )
    webhook_secret: str | None = Field(
        default=None, description="Key of the HMAC-SHA256 signature (X-Muselab-Signature) on every callback."
    )
    webhook_retries: int = Field(
        default=5, ge=0, le=20, description="Tries after the first when a callback fails (5xx, 429, no answer)."
    )
    webhook_backoff: float = Field(
        default=2.0, ge=0, le=600, description="Seconds before the first retry; each next one waits twice as long."
    )
    # Where generation runs (`muselab.workers`): this process, or replicas on a Ray Serve cluster.
    workers: WorkersChoice = Field(
        default="local",
        description="'local' runs generation in this process; 'ray' in Ray Serve replicas (pip install "
        "'muselab[ray]'), one deployment per model, while this process keeps the queue, history and files.",
    )
    ray_address: str = Field(
        default="auto",
        description="The Ray cluster to join with workers=ray: 'auto' (the one `ray start` made here), "
        "HOST:PORT of its head, or 'local' (start one inside this process, for trying it).",
    )
    ray_replicas: str = Field(
        default="1",
        pattern=r"^\d{1,3}(-\d{1,3})?$",
        description="Replicas per model: N, or MIN-MAX to let Serve autoscale between them.",
    )
    ray_num_cpus: float = Field(default=1.0, ge=0, le=512, description="CPUs each replica reserves.")
    ray_num_gpus: float = Field(default=0.0, ge=0, le=16, description="GPUs each replica reserves (0.5 shares one).")
    ray_max_ongoing: int = Field(
        default=1, ge=1, le=64, description="Jobs one replica runs at once (max_ongoing_requests)."
    )
    ray_max_queued: int = Field(
        default=8,
        ge=-1,
        le=10_000,
        description="Jobs that may wait for a model's replicas beyond those running (max_queued_requests); "
        "more are refused as busy (429). -1: only the service's own queue bound (max_queue).",
    )
    # Streamlit UI: in-process job service unless a running `muselab serve` is named here.
    ui_api_url: str | None = Field(default=None, description="URL of a muselab server for the UI to use.")

    @property
    def outputs(self) -> Path:
        return self.output_dir or self.data_dir / "outputs"

    @property
    def loras(self) -> Path:
        return self.lora_dir or self.data_dir / "loras"

    @property
    def wildcards(self) -> Path:
        return self.wildcard_dir or self.data_dir / "wildcards"

    @property
    def inputs(self) -> Path:
        """Pictures clients sent to start from, kept by content hash (`muselab.uploads`)."""
        return self.data_dir / "inputs"

    @property
    def openvino_cache(self) -> Path:
        """Converted OpenVINO models: a one-time conversion each, kept between runs."""
        return self.cache_dir / "openvino"

    @property
    def tiny_models_dir(self) -> Path:
        return self.data_dir / "tiny-models"

    def model_for(self, kind: str) -> str:
        """The model a command of this kind uses: explicit setting, then preset, then catalogue."""
        if kind == "decoder":
            return self.fast_decoder()
        explicit = {"music": self.music_model, "image": self.image_model}.get(kind) or self.models.get(kind)
        if explicit:
            return explicit
        if self.preset == "tiny" and kind in tiny_models():
            return str(self.tiny_models_dir / tiny_models()[kind].folder)
        return default_model(kind)

    def served_models(self, kind: str) -> dict[str, str]:
        """The models a client may name for `kind` ("music", "image" or "decoder"), by label, with
        the id or folder each label stands for: the catalogue's and the configured one."""
        served = {FAST_DECODER: FAST_DECODER} if kind == "decoder" else {}
        served.update({entry.id: entry.id for entry in catalogue(kind)})
        if self.preset == "tiny":
            for tiny in tiny_models().values():
                if tiny.also_serves == kind:
                    folder = str(self.tiny_models_dir / tiny.folder)
                    served[model_label(folder)] = folder
        try:
            configured = self.model_for(kind)
        except KeyError:  # a kind of tiny model only ("melody"), with none configured
            return served
        served[model_label(configured)] = configured
        return served

    def fast_decoder(self) -> str:
        """The tiny autoencoder used when a request asks for the fast decoder."""
        if self.fast_decoder_model:
            return self.fast_decoder_model
        if self.preset == "tiny":
            return str(self.tiny_models_dir / tiny_models()["decoder"].folder)
        return FAST_DECODER

    def is_offline(self) -> bool:
        if self.offline is not None:
            return self.offline
        from huggingface_hub import constants

        return bool(constants.HF_HUB_OFFLINE)


def looks_like_path(model: str) -> bool:
    return model.startswith((".", "/", "~")) or model.count("/") > 1 or "\\" in model


def model_label(model: str) -> str:
    """How a model is named to clients and in the files it makes: a hub id as it is, a folder on
    this machine by its own name (never the folders above it, which name the user and the machine).
    A job's models joined by " + " (a scene's two) are each named so."""
    if not model:
        return model
    if " + " in model:
        return " + ".join(model_label(part) for part in model.split(" + "))
    if looks_like_path(model) or Path(model).expanduser().is_dir():
        return Path(model.rstrip("/\\")).name
    return model


def hf_cache_dir() -> Path:
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE)
