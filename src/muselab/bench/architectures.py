"""Full-size musicgen-small and Stable Diffusion 1.x architectures with random weights.

For `muselab bench` only (`muselab.bench`): the shapes are the published checkpoints'
(facebook/musicgen-small, CompVis/stable-diffusion-v1-4), so every matmul and convolution costs
exactly what it costs with the real weights, but nothing has to be downloaded. The output is
noise. The tokenizers are the tiny offline ones from `muselab.testing.tiny` (their ids all fall
inside the real vocabularies), so prompts are a few tokens longer than with the real BPE /
SentencePiece tokenizers; that changes the text encoders' cost by a negligible amount.

Parameter counts of what these functions build (printed by `describe`):

- musicgen-small: T5-base encoder 109.6M, decoder 419.6M (24 layers, 4 embedding tables and
  4 LM heads), EnCodec 32 kHz 56.9M; 586.9M in all (published: about 590M).
- SD 1.x: UNet 859.5M, KL VAE 83.7M, CLIP text encoder 123.1M (published: 860M, 84M, 123M).
- sd-turbo (SD 2.1 shapes): UNet 865.9M, the same VAE, OpenCLIP ViT-H text encoder 340.4M.
"""

from __future__ import annotations

import contextlib
import time
import zlib
from collections.abc import Iterator
from typing import Any

import torch

from muselab.engines.image.family import SD1_UNET, SD1_VAE
from muselab.engines.image.tiny import sd1_scheduler
from muselab.engines.music.tiny import build_musicgen_processor, randomize_codebooks, set_musicgen_generation_defaults
from muselab.testing.tiny import build_tiny_clip_tokenizer

FULL_SEED = 0

#: facebook/musicgen-small's sub-model configurations (config.json of the checkpoint).
MUSICGEN_SMALL_TEXT_ENCODER = {
    "model_type": "t5",
    "vocab_size": 32128,
    "d_model": 768,
    "d_ff": 3072,
    "num_layers": 12,
    "num_heads": 12,
    "d_kv": 64,
    "feed_forward_proj": "relu",
    "relative_attention_num_buckets": 32,
    "dropout_rate": 0.1,
}
MUSICGEN_SMALL_AUDIO_ENCODER = {
    "model_type": "encodec",
    "sampling_rate": 32000,
    "audio_channels": 1,
    "num_filters": 64,
    "upsampling_ratios": [8, 5, 4, 4],  # hop 640: 50 frames a second
    "codebook_size": 2048,
    "hidden_size": 128,
    "num_lstm_layers": 2,
    "num_residual_layers": 1,
    "target_bandwidths": [2.2],  # 4 codebooks
    "use_causal_conv": False,
    "use_conv_shortcut": False,
    "normalize": False,
    "norm_type": "weight_norm",
}
MUSICGEN_SMALL_DECODER = {
    "model_type": "musicgen_decoder",
    "vocab_size": 2048,
    "pad_token_id": 2048,
    "bos_token_id": 2048,
    "decoder_start_token_id": 2048,
    "hidden_size": 1024,
    "num_hidden_layers": 24,
    "num_attention_heads": 16,
    "ffn_dim": 4096,
    "num_codebooks": 4,
    "max_position_embeddings": 2048,
    "activation_function": "gelu",
}


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype) -> Iterator[None]:
    """Create parameters directly in `dtype`, as `from_pretrained(dtype=...)` does.

    Building in float32 and casting afterwards would hold both copies at once (about 2 GB more
    peak memory for SD 1.x in bf16), which would inflate the benchmark's peak-RSS figures.
    """
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def count_parameters(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _millions(count: int) -> str:
    return f"{count / 1e6:.1f}M"


def build_musicgen_small_random(dtype: torch.dtype = torch.float32, verbose: bool = True) -> tuple[Any, Any]:
    """musicgen-small's architecture with random weights: `(network, processor)`, cast to `dtype`.

    Mirrors `muselab.testing.tiny.build_tiny_musicgen` (same classes, same generation defaults:
    sampling, guidance 3.0, top-k 250) at the published sizes.
    """
    from transformers import (
        MusicgenConfig,
        MusicgenForConditionalGeneration,
    )

    started = time.perf_counter()
    torch.manual_seed(FULL_SEED)
    config = MusicgenConfig(
        text_encoder=dict(MUSICGEN_SMALL_TEXT_ENCODER),
        audio_encoder=dict(MUSICGEN_SMALL_AUDIO_ENCODER),
        decoder=dict(MUSICGEN_SMALL_DECODER),
    )
    with _default_dtype(dtype):
        network = MusicgenForConditionalGeneration(config).eval().to(dtype)
    randomize_codebooks(network)  # else any two clips would decode alike and compare as identical
    set_musicgen_generation_defaults(network, special_token_id=2048)
    processor = build_musicgen_processor()
    if verbose:
        print(
            f"built musicgen-small (random, {str(dtype).removeprefix('torch.')}) in "
            f"{time.perf_counter() - started:.1f} s: {describe_musicgen(network)}",
            flush=True,
        )
    return network, processor


def describe_musicgen(network: Any) -> str:
    parts = {
        "text encoder": count_parameters(network.text_encoder),
        "decoder": count_parameters(network.decoder),
        "audio encoder": count_parameters(network.audio_encoder),
    }
    listed = ", ".join(f"{name} {_millions(count)}" for name, count in parts.items())
    return f"{listed}; total {_millions(count_parameters(network))} parameters"


def build_sd1_random(dtype: torch.dtype = torch.float32, verbose: bool = True) -> Any:
    """A Stable Diffusion 1.x pipeline (UNet, KL VAE, CLIP ViT-L/14 text) with random weights.

    No safety checker. The scheduler is the checkpoints' PNDM configuration; muselab's image
    engine swaps it per request anyway.
    """
    return _build_sd_random("SD 1.x", SD1_UNET, SD1_TEXT_ENCODER, sd1_scheduler(), dtype, verbose)


def build_sd_turbo_random(dtype: torch.dtype = torch.float32, verbose: bool = True) -> Any:
    """stabilityai/sd-turbo's architecture (SD 2.1: UNet with linear projections and 1024-wide
    cross-attention, OpenCLIP ViT-H text encoder, the same KL VAE) with random weights, and its
    scheduler configuration (Euler, trailing timesteps: one step starts from pure noise)."""
    from diffusers import EulerDiscreteScheduler

    scheduler = EulerDiscreteScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        num_train_timesteps=1000,
        timestep_spacing="trailing",
        steps_offset=1,
    )
    return _build_sd_random("sd-turbo", SD_TURBO_UNET, SD_TURBO_TEXT_ENCODER, scheduler, dtype, verbose)


#: stabilityai/sd-turbo's UNet (SD 2.1 shapes, 865M parameters).
SD_TURBO_UNET: dict[str, Any] = {
    **SD1_UNET,
    "attention_head_dim": (5, 10, 20, 20),
    "cross_attention_dim": 1024,
    "use_linear_projection": True,
}
#: CLIP ViT-L/14's text model (SD 1.x, 123M parameters).
SD1_TEXT_ENCODER: dict[str, Any] = {
    "hidden_size": 768,
    "intermediate_size": 3072,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "hidden_act": "quick_gelu",
    "projection_dim": 768,
}
#: OpenCLIP ViT-H/14's text model as SD 2.x uses it (23 layers, 340M parameters).
SD_TURBO_TEXT_ENCODER: dict[str, Any] = {
    "hidden_size": 1024,
    "intermediate_size": 4096,
    "num_hidden_layers": 23,
    "num_attention_heads": 16,
    "hidden_act": "gelu",
    "projection_dim": 512,
}


def _build_sd_random(
    label: str, unet_config: dict, text_config: dict, scheduler: Any, dtype: torch.dtype, verbose: bool
) -> Any:
    from diffusers import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    started = time.perf_counter()
    torch.manual_seed(FULL_SEED)
    tokenizer = build_tiny_clip_tokenizer()
    from transformers.initialization import no_init_weights

    # Every weight is overwritten by fill_deterministically below: skip the default initialisers,
    # which cost more than half of the build (13 s of 21 for the SD 1.x UNet alone).
    with _default_dtype(dtype), no_init_weights():
        unet = UNet2DConditionModel(**unet_config)
        vae = AutoencoderKL(**SD1_VAE)
        text_encoder = CLIPTextModel(
            CLIPTextConfig(
                vocab_size=49408,
                max_position_embeddings=77,
                # The tiny byte-level tokenizer's special ids (start 0, end 1).
                bos_token_id=0,
                eos_token_id=1,
                pad_token_id=1,
                **text_config,
            )
        )
    for module in (unet, vae, text_encoder):
        fill_deterministically(module)
    pipe = StableDiffusionPipeline(
        unet=unet.eval(),
        vae=vae.eval(),
        text_encoder=text_encoder.eval(),
        tokenizer=tokenizer,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe = pipe.to(dtype=dtype)
    if verbose:
        print(
            f"built {label} (random, {str(dtype).removeprefix('torch.')}) in "
            f"{time.perf_counter() - started:.1f} s: {describe_sd(pipe)}",
            flush=True,
        )
    return pipe


def fill_deterministically(module: torch.nn.Module) -> None:
    """Overwrite every parameter with values drawn in float32 from a seed derived from its name.

    So the same architecture built in float32 and in bfloat16 holds the same weights (the bf16
    ones rounded), exactly as one checkpoint loaded in two dtypes would: the benchmark compares the
    output of its variants, built in separate processes, against float32's. One float32 tensor at a
    time is alive, so the build's peak memory stays that of the target dtype. Matrices and kernels
    get a 1/sqrt(fan-in) scale (activations keep their size through the layers); norm scales are
    ones; other vectors get small values. Nothing of the module's own initialisation survives, so
    it may be built without it.
    """
    with torch.no_grad():
        for name, parameter in module.named_parameters():
            generator = torch.Generator().manual_seed(zlib.crc32(name.encode()))
            if parameter.dim() >= 2:
                scale = parameter[0].numel() ** -0.5
            elif "norm" in name and name.endswith("weight"):
                parameter.fill_(1.0)
                continue
            else:
                scale = 0.02
            values = torch.randn(parameter.shape, generator=generator).mul_(scale)
            parameter.copy_(values.to(parameter.dtype))


def describe_sd(pipe: Any) -> str:
    parts = {
        "UNet": count_parameters(pipe.unet),
        "VAE": count_parameters(pipe.vae),
        "CLIP text": count_parameters(pipe.text_encoder),
    }
    return ", ".join(f"{name} {_millions(count)}" for name, count in parts.items()) + " parameters"


def build_taesd_random(dtype: torch.dtype = torch.float32) -> Any:
    """The tiny autoencoder (TAESD) architecture with random weights: diffusers' AutoencoderTiny
    defaults are TAESD's shapes (64 channels, 8x upsampling, about 2.4M parameters)."""
    from diffusers import AutoencoderTiny

    torch.manual_seed(FULL_SEED)
    with _default_dtype(dtype):
        return AutoencoderTiny().eval().to(dtype)
