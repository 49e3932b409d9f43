"""MusicGen Melody (`facebook/musicgen-melody`, transformers' `MusicgenMelodyForConditionalGeneration`):
music that follows a melody clip. Its conditioning is not cross-attention: the melody's chroma (12
pitch classes, one-hot, 235 frames for 30 s) and the text's states, each projected to the decoder's
width, go in front of the audio tokens as a prefix the decoder attends to causally. Here the
prefix runs through the decoder once per window (`MelodySampler.prefill`), its keys and values go
into the KV cache, and the tokens after it run through the same token loop as MusicGen's.

The chroma is computed as transformers' `MusicgenMelodyFeatureExtractor` computes it (a 16384-point
STFT every 4096 samples, librosa's chroma filter bank, the loudest class set to one), without the
torchaudio that extractor needs. audiocraft separates out drums and bass with Demucs first; that
step is left out here, as it is in transformers unless given Demucs' output.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.nn import functional as F

from muselab.engines.music.engine import MusicEngine
from muselab.engines.music.sampler import MusicgenSampler

#: The text's positions in the prefix, as a batch's cache is sized (a long prompt's tokens).
PROMPT_POSITIONS = 128


class MelodyProcessor:
    """The tokenizer, and the chroma transformers' melody feature extractor makes."""

    def __init__(
        self,
        tokenizer: Any,
        sampling_rate: int = 32000,
        n_fft: int = 16384,
        hop_length: int = 4096,
        chunk_length: int = 30,
        num_chroma: int = 12,
    ):
        from transformers.audio_utils import chroma_filter_bank

        self.tokenizer = tokenizer
        self.sampling_rate, self.n_fft, self.hop_length = sampling_rate, n_fft, hop_length
        self.samples = chunk_length * sampling_rate
        bank = chroma_filter_bank(
            sampling_rate=sampling_rate, num_frequency_bins=n_fft, tuning=0, num_chroma=num_chroma
        )
        self.filters = torch.from_numpy(bank).float()

    @classmethod
    def from_folder(cls, folder: Path) -> MelodyProcessor:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
        config_file = Path(folder) / "preprocessor_config.json"
        config = json.loads(config_file.read_text()) if config_file.is_file() else {}
        keys = ("sampling_rate", "n_fft", "hop_length", "chunk_length", "num_chroma")
        return cls(tokenizer, **{key: config[key] for key in keys if key in config})

    def __call__(self, text: list[str], **options: Any) -> Any:
        return self.tokenizer(text, **options)

    def chroma(self, audio: np.ndarray) -> torch.Tensor:
        """(1, frames, 12) one-hot chroma of mono `audio` at `sampling_rate`, its first 30 s."""
        waveform = torch.as_tensor(audio[: self.samples], dtype=torch.float32)[None]
        if waveform.shape[-1] < self.n_fft:
            pad = self.n_fft - waveform.shape[-1]
            waveform = F.pad(waveform, (pad // 2, pad - pad // 2))
        window = torch.hann_window(self.n_fft)
        spectrum = torch.stft(
            waveform, self.n_fft, self.hop_length, window=window, center=True, pad_mode="reflect", return_complex=True
        )
        power = (spectrum / window.pow(2).sum().sqrt()).abs().pow(2)  # torchaudio's normalized=True, power 2
        raw = torch.einsum("cf,...ft->...ct", self.filters, power)
        normed = F.normalize(raw, p=float("inf"), dim=-2, eps=1e-6).transpose(1, 2)
        return torch.zeros_like(normed).scatter_(-1, normed.argmax(-1, keepdim=True), 1.0)


class MelodySampler(MusicgenSampler):
    """MusicGen's token loop for the melody model: the conditioning is a prefix in the KV cache."""

    conditions_by_prefix = True

    def __init__(self, network: Any, cuda_graphs: bool = True):
        super().__init__(network, cuda_graphs=False)  # the captured step knows no prefix
        self.project_encoder = network.text_encoder.config.hidden_size != network.decoder.config.hidden_size
        self.chroma_length = int(network.config.chroma_length)
        self.num_chroma = int(network.config.num_chroma)

    def cache_bytes(self, rows: int, max_length: int) -> int:
        """The cache holds the prefix too: the chroma's positions and the text's (a prompt's worth)."""
        return super().cache_bytes(rows, max_length + self.chroma_length + PROMPT_POSITIONS)

    def _condition(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        batch: int,
        guided: bool,
        chroma: torch.Tensor | None,
    ) -> torch.Tensor:
        """The prefix (rows, chroma_length + text length, hidden) every clip's rows start with:
        chroma, then text, as `MusicgenMelodyForConditionalGeneration` puts them; guided, the
        unconditional rows get zero text and the "no melody" chroma (class 0 everywhere)."""
        network = self.network
        text = network.text_encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        if self.project_encoder:
            text = network.enc_to_dec_proj(text)
        text = text * attention_mask[..., None]
        if chroma is None:
            chroma = torch.zeros((1, 1, self.num_chroma), device=text.device, dtype=text.dtype)
            chroma[:, :, 0] = 1
        chroma = chroma.to(text.device, text.dtype)
        nothing = torch.zeros_like(chroma)
        nothing[:, :, 0] = 1
        texts, chromas = [text.repeat(batch, 1, 1)], [chroma.repeat(batch, 1, 1)]
        if guided:
            texts.append(torch.zeros_like(texts[0]))
            chromas.append(nothing.repeat(batch, 1, 1))
        audio = torch.cat(chromas)
        if self.num_chroma != network.decoder.config.hidden_size:
            audio = network.audio_enc_to_dec_proj(audio)
        audio = audio.repeat(1, -(-self.chroma_length // audio.shape[1]), 1)[:, : self.chroma_length]
        return torch.cat([audio, torch.cat(texts)], dim=1)

    def _stepper(self, rows: int, max_length: int, prefix: torch.Tensor) -> Any:
        if self.compiled is not None:  # OpenVINO: the prefix in one call, then a token a call
            return self.compiled.start(prefix, rows)
        keys, values = self._kv_cache(rows, prefix.shape[1] + max_length, prefix.device, torch.empty)
        self.prefill(prefix, keys, values)
        return self._eager_step(keys, values, prefix.shape[1], (None, None, None))

    def prefill(self, prefix: torch.Tensor, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Run the prefix through the decoder (causal self-attention, as the first step of
        transformers' `generate` runs it) and keep every layer's keys and values in the cache."""
        length = prefix.shape[1]
        self.decoder.embed_positions.make_weights(
            max(keys.shape[3], self.decoder.embed_positions.weights.shape[0]),
            self.decoder.embed_positions.embedding_dim,
        )

        def attend_self(index: int, attention: Any, normed: torch.Tensor) -> torch.Tensor:
            key, value = self._heads(attention.k_proj(normed)), self._heads(attention.v_proj(normed))
            keys[index, :, :, :length], values[index, :, :, :length] = key, value
            return F.scaled_dot_product_attention(self._heads(attention.q_proj(normed)), key, value, is_causal=True)

        self.through_layers((prefix + self.decoder.embed_positions.weights[:length]).to(self.dtype), attend_self)

    def through_layers(self, states: torch.Tensor, attend_self: Any) -> torch.Tensor:
        """States (rows, positions, width) through every decoder layer (self-attention, as
        `attend_self(layer index, attention, normed states)` does it over its cache, then the
        feed-forward), before the final norm: the prefill's maths, and the OpenVINO step's."""
        rows, length, _ = states.shape
        for index, layer in enumerate(self.decoder.layers):
            attention = layer.self_attn
            context = attend_self(index, attention, layer.self_attn_layer_norm(states))
            states = states + attention.out_proj(context.transpose(1, 2).reshape(rows, length, -1))
            states = states + layer.fc2(layer.activation_fn(layer.fc1(layer.final_layer_norm(states))))
        return states


class MelodyEngine(MusicEngine):
    """MusicEngine for the melody models: the melody clip's chroma conditions each window."""

    sampler_class = MelodySampler
    follows_melody = True

    @classmethod
    def load_parts(cls, source: str, dtype: torch.dtype) -> tuple[Any, Any]:
        from transformers import MusicgenMelodyForConditionalGeneration

        processor = MelodyProcessor.from_folder(Path(source))
        network = MusicgenMelodyForConditionalGeneration.from_pretrained(
            source, dtype=dtype, use_safetensors=True, local_files_only=True
        )
        return processor, network

    def melody_chroma(self, mono: np.ndarray, offset: float) -> torch.Tensor:
        """The chroma of the melody (`load_melody`'s: mono, at the model's rate) for its 30 s from
        `offset` seconds on, from its start again where it ends (audiocraft's long-form rule), or
        of the whole melody when the piece starts there."""
        if offset > 0:
            first = round(offset * self.sample_rate)
            mono = mono[(first + np.arange(self.processor.samples)) % mono.shape[0]]
        return self.processor.chroma(mono)
