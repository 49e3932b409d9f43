"""Requests and results, with the bounds every front end shares.

A request holds everything that decides the output (the *recipe*); it is what
gets embedded in each file and what ``--from FILE`` reads back.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from muselab.loras import MAX_LORAS, format_choice, parse_choice

# How a field shows outside the schema; the families declare their fields with these, from here.
from muselab.options import ModelOf as ModelOf
from muselab.options import Option as Option
from muselab.options import count_field as count_field
from muselab.options import field_model_kind as field_model_kind
from muselab.options import field_option as field_option
from muselab.options import model_fields as model_fields
from muselab.validation import describe_errors as describe_errors
from muselab.validation import explain_validation_error as explain_validation_error
from muselab.validation import field_bounds as field_bounds

#: The image speed tiers (engines/image/speed.py), for requests and for the server's default.
Speed = Literal["auto", "quality", "balanced", "fast", "turbo"]

SPEED_CHOICES = (
    "quality: the model's own 25 steps; balanced: the same with the UNet's deep features reused "
    "between steps (DeepCache); fast: LCM-LoRA, 4 steps, tiny autoencoder; turbo: sd-turbo, 1 step; "
    "auto: fast on a CPU, quality on a GPU."
)


def speed_field(what: str = "") -> Any:
    return Field(default=None, description=f"{what}{SPEED_CHOICES} Default: the server's (MUSELAB_SPEED).")


MAX_SEED = 2**32 - 1
MAX_PROMPT_CHARS = 2000
#: The longest piece of music a request may ask for (audiocraft's long-form pieces go this far).
MAX_MUSIC_SECONDS = 300

ResizeMode = Literal["just resize", "crop and resize", "resize and fill"]
#: A1111's "masked content": what the masked area starts from before it is repainted.
InpaintingFill = Literal["fill", "original", "latent noise", "latent nothing"]
OutpaintSide = Literal["left", "right", "up", "down"]
HiresUpscaler = Literal["Lanczos", "Latent"]
#: A base64 picture at the upload limit (muselab.uploads: 20 MB) with a data-URL prefix.
MAX_UPLOAD_CHARS = 28_000_000
#: How an upload field names an output of the history instead of sending a file: "output:ID".
HISTORY_OUTPUT = "output:"
SchedulerName = Literal["DPM++ 2M Karras", "DPM++ 2M", "Euler a", "Euler", "DDIM", "PNDM", "LCM"]
SCHEDULERS: tuple[str, ...] = SchedulerName.__args__  # type: ignore[attr-defined]


Prompt = Annotated[str, Field(min_length=1, max_length=MAX_PROMPT_CHARS)]
Seed = Annotated[
    int | None,
    Field(default=None, ge=0, le=MAX_SEED, description="Seed; the same seed gives the same output. Random if unset."),
    Option(label="Seed (empty = random)"),
]


class BaseRequest(BaseModel):
    """What every request has: a prompt, a seed and a model. A family's request adds its own fields,
    each declared once here with its bounds, default and help; the CLI, the API and the studio read
    them from the schema."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: str
    prompt: Prompt
    seed: Seed = None
    model: Annotated[
        str | None,
        Field(default=None, max_length=500, description="Hub id or local folder."),
        Option(flags=("--model", "-m"), label="Model (hub id or folder; empty = default)"),
    ] = None

    @field_validator("prompt")
    @classmethod
    def _prompt_has_text(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("empty")
        return value.strip()


def model_field(kind: str) -> Any:
    """The `model` field of a family whose models are of `kind` (its type, for a request class)."""
    return Annotated[
        str | None,
        Field(default=None, max_length=500, description="Hub id or local folder."),
        Option(flags=("--model", "-m"), label="Model (hub id or folder; empty = default)"),
        ModelOf(kind),
    ]


class MusicRequest(BaseRequest):
    kind: Literal["music"] = "music"
    prompt: Annotated[
        Prompt,
        Field(description="What the music should sound like."),
        Option(main=True, label="Describe the music", placeholder="lo-fi beat with warm piano, 80 bpm"),
    ]
    model: model_field("music") = None
    duration: Annotated[
        float,
        Field(
            default=8.0,
            ge=1,
            le=MAX_MUSIC_SECONDS,
            description=f"Seconds, 1-{MAX_MUSIC_SECONDS}. Past the model's context (30 s) the piece is made in "
            "windows, each continuing the one before (extend_stride).",
        ),
        Option(flags=("--duration", "-d"), label="Duration (seconds)", step=1.0, main=True),
    ] = 8.0
    extend_stride: Annotated[
        float,
        Field(
            default=18.0,
            ge=5,
            le=25,
            description="Pieces longer than the model's context: the new seconds each window adds; the rest "
            "of its 30 s is the end of the audio so far, which it continues (audiocraft's extend_stride).",
        ),
        Option(label="Long pieces: new seconds per window", step=1.0),
    ] = 18.0
    temperature: Annotated[
        float,
        Field(default=1.0, ge=0.05, le=5.0, description="Sampling temperature."),
        Option(label="Temperature", step=0.05),
    ] = 1.0
    top_k: Annotated[
        int,
        Field(default=250, ge=0, le=2048, description="Top-k sampling; 0 turns it off."),
        Option(label="Top-k (0 = off)"),
    ] = 250
    top_p: Annotated[
        float,
        Field(default=0.0, ge=0.0, le=1.0, description="Nucleus sampling; 0 turns it off."),
        Option(label="Top-p (0 = off)", step=0.05),
    ] = 0.0
    guidance: Annotated[
        float,
        Field(default=3.0, ge=0.0, le=20.0, description="Classifier-free guidance; 1 or less turns it off."),
        Option(label="Guidance (CFG; 1 or less = off)", step=0.5),
    ] = 3.0
    num_clips: Annotated[
        int,
        Field(default=1, ge=1, le=8, description="How many clips; clip i uses seed + i."),
        Option(flags=("--clips", "-n"), label="Clips", count=True),
    ] = 1
    audio_prompt: Annotated[
        str | None,
        Field(
            default=None,
            max_length=MAX_UPLOAD_CHARS,
            description="A clip to continue: WAV, FLAC, OGG or MP3 in base64 (a 'data:audio/wav;base64,' "
            "prefix is fine), at most 20 MB, shorter than duration; or the 'sha256:...' reference of one "
            "sent before, or 'output:ID', a clip in the history. The piece starts with it and lasts duration "
            "seconds in all.",
        ),
        Option(flags=("--continue",), label="Continue a clip", metavar="FILE", upload="audio", studio=False),
    ] = None
    new_only: Annotated[
        bool,
        Field(default=False, description="With audio_prompt: keep only the new part, not the clip it continues."),
        Option(flags=("--new-only",), label="Only the new part", studio=False),
    ] = False
    melody: Annotated[
        str | None,
        Field(
            default=None,
            max_length=MAX_UPLOAD_CHARS,
            description="A clip whose melody the music follows (its chroma), for the musicgen-melody models: WAV, "
            "FLAC, OGG or MP3 in base64 (a 'data:audio/wav;base64,' prefix is fine), at most 20 MB; or the "
            "'sha256:...' reference of one sent before, or 'output:ID', a clip in the history. A longer piece "
            "follows it on, from the start again when it ends.",
        ),
        Option(flags=("--melody",), label="Follow a melody", metavar="FILE", upload="audio", studio=False),
    ] = None


_SIZE_HELP = "Pixels, a multiple of 8; default the model's size."


class ImageRequest(BaseRequest):
    kind: Literal["image"] = "image"
    prompt: Annotated[
        Prompt,
        Field(description="What the picture should show."),
        Option(main=True, label="Describe the picture", placeholder="a red fox in snow, watercolor"),
    ]
    model: model_field("image") = None
    negative_prompt: Annotated[
        str,
        Field(default="", max_length=MAX_PROMPT_CHARS, description="What to keep out of the picture."),
        Option(flags=("--negative",), label="Negative prompt (what to keep out)", main=True),
    ] = ""
    width: Annotated[
        int | None, Field(default=None, ge=64, le=2048, multiple_of=8, description=_SIZE_HELP), Option(label="Width")
    ] = None
    height: Annotated[
        int | None, Field(default=None, ge=64, le=2048, multiple_of=8, description=_SIZE_HELP), Option(label="Height")
    ] = None
    steps: Annotated[
        int | None,
        Field(default=None, ge=1, le=150, description="Denoising steps; default per model (25, 1 for sd-turbo)."),
        Option(label="Steps (empty = model default)"),
    ] = None
    guidance: Annotated[
        float | None,
        Field(default=None, ge=0.0, le=30.0, description="CFG scale; default per model (7.5, 0 for sd-turbo)."),
        Option(label="Guidance (CFG; empty = model default)", step=0.5),
    ] = None
    scheduler: Annotated[
        SchedulerName | None,
        Field(default=None, description="DPM++ 2M Karras (default), DPM++ 2M, Euler a, Euler, DDIM, PNDM, LCM."),
        Option(label="Sampler"),
    ] = None
    num_images: Annotated[
        int,
        Field(default=1, ge=1, le=8, description="How many images; image i uses seed + i."),
        Option(flags=("--images", "-n"), label="Images", count=True, main=True),
    ] = 1
    speed: Annotated[Speed | None, speed_field(), Option(label="Speed", main=True, lead=True)] = None
    decoder: Annotated[
        Literal["full", "fast"] | None,
        Field(
            default=None,
            description="'fast' decodes with the tiny autoencoder (TAESD): much faster, slightly softer. "
            "Default: the speed tier's (fast and turbo: fast).",
        ),
        Option(
            flags=("--fast-decoder/--full-decoder",),
            label="Fast decoder (TAESD): much quicker, slightly softer",
            switch=("fast", "full"),
        ),
    ] = None
    decoder_model: Annotated[
        str | None,
        Field(
            default=None, max_length=500, description="Hub id or folder of the tiny autoencoder; default from settings."
        ),
        Option(label="Fast decoder model (empty = default)"),
        ModelOf("decoder"),
    ] = None
    lcm_lora_model: Annotated[
        str | None,
        Field(
            default=None,
            max_length=500,
            description="Hub id or folder of the fast tier's LCM-LoRA; default from settings "
            "(latent-consistency/lcm-lora-sdv1-5).",
        ),
        Option(label="LCM-LoRA (empty = default)", studio=False),
        ModelOf("lcm-lora"),
    ] = None
    loras: Annotated[
        list[str],
        Field(
            default_factory=list,
            max_length=MAX_LORAS,
            description="LoRAs from the LoRA folder, each NAME or NAME:WEIGHT (weight 1 if left out); "
            "<lora:NAME:WEIGHT> in the prompt adds one too, as in A1111.",
        ),
        Option(flags=("--lora",), label="LoRAs", studio=False, metavar="NAME[:WEIGHT]"),
    ]
    lora_hashes: Annotated[
        dict[str, str],
        Field(default_factory=dict, description="Filled in when the picture is made: each LoRA's A1111 hash."),
        Option(cli=False, studio=False),
    ]
    subseed: Annotated[
        int | None,
        Field(
            default=None,
            ge=0,
            le=MAX_SEED,
            description="A second seed to vary the picture with (A1111's variation seed): its starting "
            "noise is blended into the seed's by subseed_strength. Random if unset and a strength is given.",
        ),
        Option(label="Variation seed"),
    ] = None
    subseed_strength: Annotated[
        float,
        Field(
            default=0.0,
            ge=0.0,
            le=1.0,
            description="How much of the variation seed's noise (A1111's spherical blend): 0 is the seed's "
            "picture, 1 the variation seed's, small values explore near a picture you like.",
        ),
        Option(label="Variation strength", step=0.05),
    ] = 0.0
    init_image: Annotated[
        str | None,
        Field(
            default=None,
            max_length=MAX_UPLOAD_CHARS,
            description="A picture to start from (img2img): PNG, JPEG or WebP in base64 (a "
            "'data:image/png;base64,' prefix is fine), at most 20 MB and 16 megapixels; or the "
            "'sha256:...' reference of one sent before, or 'output:ID', a picture in the history. Kept by "
            "content hash; the recipe names it.",
        ),
        Option(flags=("--init",), label="Start from a picture", metavar="FILE", upload="image"),
    ] = None
    strength: Annotated[
        float | None,
        Field(
            default=None,
            ge=0.0,
            le=1.0,
            description="With a starting picture, or hires fix's second pass: how far to move from it "
            "(A1111's denoising strength), 0 keeps it, 1 ignores it; the steps run are steps x strength. "
            "Default 0.75.",
        ),
        Option(label="Strength (with a starting picture)", step=0.05),
    ] = None
    resize_mode: Annotated[
        ResizeMode | None,
        Field(
            default=None,
            description="With a starting picture of another shape than width x height: 'just resize' "
            "(default; stretches it), 'crop and resize' (fills the frame, cropping the overflow) or "
            "'resize and fill' (fits it whole, the margins filled with its stretched edges), as in A1111.",
        ),
        Option(label="Resize mode"),
    ] = None
    mask: Annotated[
        str | None,
        Field(
            default=None,
            max_length=MAX_UPLOAD_CHARS,
            description="Inpainting: a mask the size of the starting picture, white where it is repainted "
            "(black is kept); PNG, JPEG or WebP, sent as init_image is.",
        ),
        Option(label="Mask (white = repaint)", metavar="FILE", upload="image"),
    ] = None
    inpainting_mask_invert: Annotated[
        bool,
        Field(default=False, description="Inpainting: repaint the black of the mask instead (A1111's mask invert)."),
        Option(flags=("--invert-mask",), label="Repaint the black of the mask"),
    ] = False
    mask_blur: Annotated[
        int,
        Field(default=4, ge=0, le=64, description="Inpainting: pixels the mask's edge is blurred by (A1111's 4)."),
        Option(label="Mask blur"),
    ] = 4
    inpainting_fill: Annotated[
        InpaintingFill | None,
        Field(
            default=None,
            description="Inpainting: what the masked area starts from (A1111's masked content): 'original' "
            "(default), 'fill' (the picture's colours blurred in), 'latent noise' or 'latent nothing'.",
        ),
        Option(flags=("--masked-content",), label="Masked content"),
    ] = None
    inpaint_full_res: Annotated[
        bool,
        Field(
            default=False,
            description="Inpainting: repaint only the masked area, cropped around the mask and repainted at "
            "full size, then pasted back (A1111's 'only masked').",
        ),
        Option(flags=("--only-masked",), label="Only masked (repaint the area at full size)"),
    ] = False
    inpaint_full_res_padding: Annotated[
        int,
        Field(default=32, ge=0, le=256, description="Inpainting, only masked: pixels of context around the mask."),
        Option(flags=("--only-masked-padding",), label="Only masked padding (pixels)"),
    ] = 32
    outpaint: Annotated[
        int,
        Field(
            default=0,
            ge=0,
            le=1024,
            multiple_of=8,
            description="Outpainting: pixels to grow the starting picture by on each of outpaint_sides; "
            "the new area is painted to match (inpainting of the padded canvas).",
        ),
        Option(label="Outpaint (pixels)"),
    ] = 0
    outpaint_sides: Annotated[
        list[OutpaintSide],
        Field(
            default_factory=lambda: ["left", "right", "up", "down"],
            min_length=1,
            max_length=4,
            description="Outpainting: the sides to grow (left, right, up, down; default all four).",
        ),
        Option(flags=("--outpaint-side",), label="Outpaint sides"),
    ]
    enable_hr: Annotated[
        bool,
        Field(
            default=False,
            description="Hires fix: make the picture at width x height, upscale it by hr_scale, then "
            "denoise it again at the larger size (strength, hr_second_pass_steps), as A1111 does.",
        ),
        Option(flags=("--hires",), label="Hires fix"),
    ] = False
    hr_scale: Annotated[
        float,
        Field(default=2.0, ge=1.0, le=4.0, description="Hires fix: how much larger (each side; at most 2048)."),
        Option(label="Hires scale", step=0.25),
    ] = 2.0
    hr_upscaler: Annotated[
        HiresUpscaler,
        Field(
            default="Lanczos",
            description="Hires fix: 'Lanczos' upscales the picture, 'Latent' the latents (wants strength 0.5 or more).",
        ),
        Option(label="Hires upscaler"),
    ] = "Lanczos"
    hr_second_pass_steps: Annotated[
        int,
        Field(default=0, ge=0, le=150, description="Hires fix: the second pass's steps before strength (0 = steps)."),
        Option(flags=("--hires-steps",), label="Hires steps (0 = the same)"),
    ] = 0
    emphasis: Annotated[
        dict[str, list[tuple[str, float]]],
        Field(
            default_factory=dict,
            description="Filled in when the picture is made: the prompts' A1111 emphasis, as (text, weight) "
            "pieces, for each prompt that has any.",
        ),
        Option(cli=False, studio=False),
    ]

    @field_validator("loras", mode="before")
    @classmethod
    def _lora_choices(cls, value: Any) -> Any:
        """Each choice as NAME:WEIGHT, one per name (the last given wins)."""
        if not isinstance(value, list):
            return value
        chosen: dict[str, float] = {}
        for item in value:
            if not isinstance(item, str):
                raise ValueError("each LoRA is a string NAME or NAME:WEIGHT")
            name, weight = parse_choice(item)
            chosen.pop(name, None)
            chosen[name] = weight
        return [format_choice(name, weight) for name, weight in chosen.items()]


class SceneRequest(BaseRequest):
    """One prompt (optionally split) makes a picture and its soundtrack, exported together as MP4."""

    kind: Literal["scene"] = "scene"
    prompt: Annotated[
        Prompt,
        Field(description="One prompt for the picture and its soundtrack."),
        Option(main=True, label="Describe the scene", placeholder="a quiet harbour at dawn"),
    ]
    model: Annotated[
        str | None,
        Field(default=None, max_length=500, description="Not used: a scene names its two models below."),
        Option(cli=False, studio=False),
    ] = None
    image_prompt: Annotated[
        str | None,
        Field(default=None, max_length=MAX_PROMPT_CHARS, description="A separate prompt for the picture."),
        Option(label="Picture prompt (empty = the scene prompt)"),
    ] = None
    music_prompt: Annotated[
        str | None,
        Field(default=None, max_length=MAX_PROMPT_CHARS, description="A separate prompt for the soundtrack."),
        Option(label="Music prompt (empty = the scene prompt)"),
    ] = None
    negative_prompt: Annotated[
        str,
        Field(default="", max_length=MAX_PROMPT_CHARS, description="What to keep out of the picture."),
        Option(flags=("--negative",), label="Negative prompt (what to keep out of the picture)"),
    ] = ""
    duration: Annotated[
        float,
        Field(default=8.0, ge=1, le=30, description="Seconds of soundtrack (and video), 1-30."),
        Option(flags=("--duration", "-d"), label="Soundtrack length (seconds)", step=1.0, main=True),
    ] = 8.0
    width: Annotated[
        int | None,
        Field(default=None, ge=64, le=2048, multiple_of=8, description="Picture width, a multiple of 8."),
        Option(label="Width"),
    ] = None
    height: Annotated[
        int | None,
        Field(default=None, ge=64, le=2048, multiple_of=8, description="Picture height, a multiple of 8."),
        Option(label="Height"),
    ] = None
    steps: Annotated[
        int | None,
        Field(default=None, ge=1, le=150, description="Denoising steps for the picture."),
        Option(label="Steps (empty = model default)"),
    ] = None
    speed: Annotated[Speed | None, speed_field("The picture's speed tier. "), Option(label="Picture speed")] = None
    image_model: Annotated[
        str | None,
        Field(default=None, max_length=500, description="Hub id or folder of the image model; default from settings."),
        Option(label="Image model (empty = default)"),
        ModelOf("image"),
    ] = None
    music_model: Annotated[
        str | None,
        Field(default=None, max_length=500, description="Hub id or folder of the music model; default from settings."),
        Option(label="Music model (empty = default)"),
        ModelOf("music"),
    ] = None

    def image_request(self) -> ImageRequest:
        return ImageRequest(
            prompt=self.image_prompt or self.prompt,
            negative_prompt=self.negative_prompt,
            seed=self.seed,
            width=self.width,
            height=self.height,
            steps=self.steps,
            speed=self.speed,
            model=self.image_model,
        )

    def music_request(self) -> MusicRequest:
        return MusicRequest(
            prompt=self.music_prompt or self.prompt, seed=self.seed, duration=self.duration, model=self.music_model
        )


#: Any family's request (a family may add its own kind: see `muselab.families`).
Request = BaseRequest


class RequestError(ValueError):
    """A request the user must change; the message names each field and its allowed values."""


def parse_request(cls: type[BaseRequest], data: dict[str, Any]) -> Any:
    """Validate `data` into `cls`, turning pydantic's errors into one readable message."""
    try:
        return cls.model_validate(data)
    except ValidationError as exc:
        raise RequestError(explain_validation_error(cls, exc)) from None
