"""Tiny random-weight MusicGen and Stable Diffusion models, built offline.

They have the same *structure* as the real checkpoints (same classes, same
folder layout, tokenizers and processors included) but only a few hundred
thousand parameters, so the product's real loading path
(`from_pretrained` on a folder) can be exercised in tests and demos on a
machine that cannot download weights. Their output is noise, by design.
"""

from __future__ import annotations

import shutil
import string
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

TINY_SEED = 0
#: Characters the tiny tokenizers know; anything else maps to an unknown token.
_TINY_CHARS = string.ascii_lowercase + string.digits + ",.-'!?"


def build_tiny_t5_tokenizer():
    """A character-level T5 tokenizer (Unigram) that fits a 100-token vocabulary."""
    from transformers import T5Tokenizer

    vocab: list[tuple[str, float]] = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    vocab += [(f"\u2581{c}", -3.0) for c in string.ascii_lowercase]
    vocab += [(c, -4.0) for c in _TINY_CHARS]
    return T5Tokenizer(vocab=vocab, extra_ids=0)


def build_tiny_clip_tokenizer():
    """A byte-level CLIP tokenizer with no merges: every prompt tokenizes, one byte a token."""
    from transformers import CLIPTokenizer

    chars = list(_bytes_to_unicode().values())
    tokens = ["<|startoftext|>", "<|endoftext|>", *chars, *(c + "</w>" for c in chars)]
    return CLIPTokenizer(vocab={t: i for i, t in enumerate(tokens)}, merges=[], model_max_length=77)


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible map from bytes to printable characters."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    codes = printable[:]
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            codes.append(256 + extra)
            extra += 1
    return dict(zip(printable, map(chr, codes), strict=True))


def set_musicgen_generation_defaults(model: Any, special_token_id: int) -> None:
    """The real checkpoints' sampling defaults, so random-weight models take the same code path."""
    gen = model.generation_config
    gen.decoder_start_token_id = gen.pad_token_id = gen.bos_token_id = special_token_id
    gen.do_sample, gen.guidance_scale, gen.top_k, gen.max_length = True, 3.0, 250, 1500


def build_musicgen_processor() -> Any:
    """MusicGen's processor (EnCodec feature extractor at 32 kHz) with the tiny T5 tokenizer."""
    from transformers import EncodecFeatureExtractor, MusicgenProcessor

    return MusicgenProcessor(
        feature_extractor=EncodecFeatureExtractor(feature_size=1, sampling_rate=32000),
        tokenizer=build_tiny_t5_tokenizer(),
    )


def build_tiny_musicgen(path: str | Path, replace: bool = True) -> Path:
    """Write a tiny MusicGen (T5 encoder, 2-layer decoder, EnCodec at 32 kHz) to `path`."""
    model = tiny_musicgen_network()
    processor = build_musicgen_processor()
    return _save_atomically(path, lambda tmp: (model.save_pretrained(tmp), processor.save_pretrained(tmp)), replace)


def randomize_codebooks(model: Any) -> None:
    """EnCodec's codebooks start as zeros (they are learnt by k-means), which would make every code
    decode to the same sound; random codebooks make the audio depend on the tokens."""
    with torch.no_grad():
        for layer in model.audio_encoder.quantizer.layers:
            layer.codebook.embed.normal_()


def tiny_musicgen_network(stereo: bool = False) -> Any:
    """The tiny MusicGen in memory; `stereo` gives it 8 interleaved codebooks (left, right), as the
    musicgen-stereo checkpoints have."""
    from transformers import (
        MusicgenConfig,
        MusicgenForConditionalGeneration,
    )

    torch.manual_seed(TINY_SEED)
    config = MusicgenConfig(
        text_encoder={
            "model_type": "t5",
            "vocab_size": 100,
            "d_model": 32,
            "d_ff": 37,
            "num_layers": 2,
            "num_heads": 2,
            "d_kv": 16,
        },
        audio_encoder={
            "model_type": "encodec",
            "sampling_rate": 32000,
            "num_filters": 4,
            "hidden_size": 16,
            "upsampling_ratios": [8, 5, 4, 4],  # hop 640 at 32 kHz: 50 frames/s, as in the real model
            "codebook_size": 64,
            "target_bandwidths": [2.2],
            "audio_channels": 1,
        },
        decoder={
            "model_type": "musicgen_decoder",
            "vocab_size": 64,
            "pad_token_id": 64,
            "bos_token_id": 64,
            "decoder_start_token_id": 64,
            "hidden_size": 32,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "ffn_dim": 64,
            "num_codebooks": 8 if stereo else 4,
            "audio_channels": 2 if stereo else 1,
            "max_position_embeddings": 2048,
        },
    )
    model = MusicgenForConditionalGeneration(config).eval()
    randomize_codebooks(model)
    with torch.no_grad():
        # Random heads give near-uniform logits, where sampling settings barely matter; a trained
        # model's logits are peaked, so widen them.
        for head in model.decoder.lm_heads:
            head.weight.mul_(30.0)
    set_musicgen_generation_defaults(model, special_token_id=64)
    return model


def sd1_scheduler() -> Any:
    """The SD 1.x checkpoints' own scheduler: PNDM with scaled-linear betas."""
    from diffusers import PNDMScheduler

    return PNDMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        num_train_timesteps=1000,
        skip_prk_steps=True,
        steps_offset=1,
        set_alpha_to_one=False,
    )


def build_tiny_stable_diffusion(path: str | Path, replace: bool = True) -> Path:
    """Write a tiny SD 1.x-shaped pipeline (UNet, KL VAE, CLIP text, safety checker) to `path`."""
    from diffusers import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel
    from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPTextConfig, CLIPTextModel

    torch.manual_seed(TINY_SEED)
    tokenizer = build_tiny_clip_tokenizer()
    unet = UNet2DConditionModel(
        block_out_channels=(32, 64),
        layers_per_block=2,
        sample_size=32,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=8,
        norm_num_groups=32,
    )
    vae = AutoencoderKL(
        block_out_channels=[32, 64],
        in_channels=3,
        out_channels=3,
        down_block_types=["DownEncoderBlock2D", "DownEncoderBlock2D"],
        up_block_types=["UpDecoderBlock2D", "UpDecoderBlock2D"],
        latent_channels=4,
        norm_num_groups=32,
        sample_size=64,
    )
    text_config = CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=37,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=77,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=1,
        projection_dim=32,
    )
    text_encoder = CLIPTextModel(text_config)
    safety_config = CLIPConfig(
        text_config=text_config.to_dict(),
        vision_config={
            "hidden_size": 32,
            "intermediate_size": 37,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "image_size": 32,
            "patch_size": 8,
            "projection_dim": 32,
        },
        projection_dim=32,
    )
    safety_checker = StableDiffusionSafetyChecker(safety_config)
    feature_extractor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    pipe = StableDiffusionPipeline(
        unet=unet,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        scheduler=sd1_scheduler(),
        safety_checker=safety_checker,
        feature_extractor=feature_extractor,
        requires_safety_checker=True,
    )
    return _save_atomically(path, lambda tmp: pipe.save_pretrained(tmp, safe_serialization=True), replace)


def _save_atomically(path: str | Path, save: Callable[[Path], object], replace: bool) -> Path:
    """Save into a temporary sibling folder, then rename, so a half-built model is never loaded.

    With `replace=False` a folder that appeared meanwhile (another process built it) is kept.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}-", dir=path.parent))
    try:
        save(tmp)
        if path.exists() and replace:
            shutil.rmtree(path)
        try:
            tmp.rename(path)
        except OSError:
            if replace or not path.is_dir():
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return path


def build_tiny_taesd(path: str | Path, replace: bool = True) -> Path:
    """Write a tiny TAESD-shaped autoencoder (AutoencoderTiny) matching the tiny SD's 2x latents."""
    from diffusers import AutoencoderTiny

    torch.manual_seed(TINY_SEED)
    decoder = AutoencoderTiny(
        encoder_block_out_channels=(16, 16),
        decoder_block_out_channels=(16, 16),
        num_encoder_blocks=(1, 1),
        num_decoder_blocks=(1, 1),
        latent_channels=4,
    )
    return _save_atomically(path, lambda tmp: decoder.save_pretrained(tmp, safe_serialization=True), replace)


TINY_FOLDERS = {"music": "tiny-musicgen", "image": "tiny-stable-diffusion", "decoder": "tiny-taesd"}
_BUILDERS = {"music": build_tiny_musicgen, "image": build_tiny_stable_diffusion, "decoder": build_tiny_taesd}


def build_tiny_models(directory: str | Path, replace: bool = True) -> dict[str, Path]:
    """Write the tiny models under `directory` (tiny-musicgen/, tiny-stable-diffusion/, tiny-taesd/)."""
    directory = Path(directory)
    return {kind: _BUILDERS[kind](directory / name, replace) for kind, name in TINY_FOLDERS.items()}


def ensure_tiny_model(directory: str | Path, kind: str) -> Path:
    """The tiny model of `kind` under `directory`, built first if it is not there yet."""
    path = Path(directory) / TINY_FOLDERS[kind]
    if not (path / "config.json").exists() and not (path / "model_index.json").exists():
        _BUILDERS[kind](path, replace=False)
    return path
