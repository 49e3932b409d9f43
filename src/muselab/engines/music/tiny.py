"""The tiny random-weight MusicGen (T5 encoder, 2-layer decoder, EnCodec at 32 kHz), built offline."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from muselab.testing.tiny import TINY_SEED, build_tiny_t5_tokenizer, save_atomically


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
    return save_atomically(path, lambda tmp: (model.save_pretrained(tmp), processor.save_pretrained(tmp)), replace)


def randomize_codebooks(model: Any) -> None:
    """EnCodec's codebooks start as zeros (they are learnt by k-means), which would make every code
    decode to the same sound; random codebooks make the audio depend on the tokens. The encoder's
    last layer is then rescaled so what it outputs spreads as the codebooks do (k-means puts a
    trained model's codes where its encoder's outputs fall): else every clip would encode to the
    same codes, and a clip to continue would tell the model nothing."""
    encoder = model.audio_encoder
    with torch.no_grad():
        for layer in encoder.quantizer.layers:
            layer.codebook.embed.normal_()
        sound = torch.randn(1, encoder.config.audio_channels, encoder.config.sampling_rate // 4)
        output = encoder.encoder(sound)  # (1, dimension, frames)
        centre, spread = output.mean(dim=2)[0], output.std(dim=2)[0]
        last = encoder.encoder.layers[-1].conv
        # Weight-normed: its weight is magnitude (original0) times direction; scale the magnitude.
        scale = last.parametrizations.weight.original0 if hasattr(last, "parametrizations") else last.weight
        scale.div_(spread.reshape(-1, *[1] * (scale.dim() - 1)))
        last.bias.sub_(centre).div_(spread)


def tiny_musicgen_network(stereo: bool = False) -> Any:
    """The tiny MusicGen in memory; `stereo` gives it 8 interleaved codebooks (left, right), as the
    musicgen-stereo checkpoints have."""
    from transformers import MusicgenConfig, MusicgenForConditionalGeneration

    torch.manual_seed(TINY_SEED)
    model = MusicgenForConditionalGeneration(MusicgenConfig(**tiny_parts(stereo, "musicgen_decoder"))).eval()
    return trained_looking(model)


def tiny_musicgen_melody_network(stereo: bool = False) -> Any:
    """The tiny MusicGen Melody in memory: MusicGen's tiny parts, the chroma (12 classes, 235
    frames for 30 s, as the real model's) projected in front of the text as the decoder's prefix;
    `stereo` as musicgen-stereo-melody."""
    from transformers import MusicgenMelodyConfig, MusicgenMelodyForConditionalGeneration

    torch.manual_seed(TINY_SEED)
    config = MusicgenMelodyConfig(**tiny_parts(stereo, "musicgen_melody_decoder"), num_chroma=12, chroma_length=235)
    model = MusicgenMelodyForConditionalGeneration(config).eval()
    with torch.no_grad():
        # A random projection of a one-hot chroma is small beside the position embeddings; a trained
        # model's melody prefix steers it, so make this one count too.
        model.audio_enc_to_dec_proj.weight.mul_(30.0)
    return trained_looking(model)


def build_tiny_musicgen_melody(path: str | Path, replace: bool = True) -> Path:
    """Write a tiny MusicGen Melody to `path`: the model, its tokenizer, and the chroma settings
    of transformers' melody feature extractor (which needs torchaudio, so is not built here)."""
    model = tiny_musicgen_melody_network()
    tokenizer = build_tiny_t5_tokenizer()
    features = {
        "feature_extractor_type": "MusicgenMelodyFeatureExtractor",
        "feature_size": 12,
        "sampling_rate": 32000,
        "hop_length": 4096,
        "chunk_length": 30,
        "n_fft": 16384,
        "num_chroma": 12,
        "padding_value": 0.0,
        "return_attention_mask": False,
        "stem_indices": [3, 2],
    }

    def save(folder: Path) -> None:
        model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        (folder / "preprocessor_config.json").write_text(json.dumps(features, indent=2))

    return save_atomically(path, save, replace)


def tiny_parts(stereo: bool, decoder_type: str) -> dict[str, dict[str, Any]]:
    """The tiny text encoder, EnCodec and decoder configs, MusicGen's and MusicGen Melody's."""
    return {
        "text_encoder": {
            "model_type": "t5",
            "vocab_size": 100,
            "d_model": 32,
            "d_ff": 37,
            "num_layers": 2,
            "num_heads": 2,
            "d_kv": 16,
        },
        "audio_encoder": {
            "model_type": "encodec",
            "sampling_rate": 32000,
            "num_filters": 4,
            "hidden_size": 16,
            "upsampling_ratios": [8, 5, 4, 4],  # hop 640 at 32 kHz: 50 frames/s, as in the real model
            "codebook_size": 64,
            # 4 codebooks of 6 bits at 50 frames/s: the decoder's 4 (a side), as the real model's
            # 2.2 kbit/s gives its 4 codebooks of 10 bits, so a clip encodes to what it decodes.
            "target_bandwidths": [1.2],
            "audio_channels": 1,
        },
        "decoder": {
            "model_type": decoder_type,
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
    }


def trained_looking(model: Any) -> Any:
    """Random weights nudged to behave like a trained model's where tests need it to."""
    randomize_codebooks(model)
    with torch.no_grad():
        # Random heads give near-uniform logits, where sampling settings barely matter; a trained
        # model's logits are peaked, so widen them.
        for head in model.decoder.lm_heads:
            head.weight.mul_(30.0)
        # Random token embeddings (std 0.02) are drowned by the position embeddings (about 0.7):
        # the tokens so far would barely sway the next, where a trained model follows them.
        for embedding in model.decoder.model.decoder.embed_tokens:
            embedding.weight.mul_(30.0)
    set_musicgen_generation_defaults(model, special_token_id=64)
    return model
