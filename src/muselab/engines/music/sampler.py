"""MusicGen's sampling loop, lean: a preallocated KV cache and nothing but the maths per token.

`MusicgenForConditionalGeneration.generate` (transformers 5) spends on a CPU about as long on
bookkeeping as on the matmuls: it grows its KV cache with `torch.cat` at every token (quadratic
copying over a 30 s clip), rebuilds attention masks, re-applies the delay pattern to the whole
sequence and recomputes the cross-attention of the unconditional half, which is always zero.
This loop runs the same network weights through the same operations in the same order, and
samples exactly as `generate` does (classifier-free guidance, then temperature, top-k, top-p,
with transformers' own logits processors and one `torch.multinomial` per step), so the same seed
draws the same tokens (`tests/test_music_engine.py` checks this against `generate`).

The clips of one request sample as one batch (`sample` with one generator per clip): a token's
step reads every decoder weight once for all of them, and that reading is most of a step's time
on a CPU. Each clip draws from its own generator, so it gets the tokens it would get alone.

On a CUDA GPU the loop is bound by launches, not by the GPU: one token is about 600 small kernels,
each queued from Python. There the step runs as a CUDA graph (`CudaGraphStep`): captured once per
batch of clips, replayed with one launch per token. A graph needs fixed shapes and addresses, so that step
writes the KV cache at a position held in a device tensor and attends over the whole cache with
a mask (`static_step`), the same maths as the growing slice the CPU loop attends over.

A clip to continue (`prompt_codes`) runs through the same steps first; so does the end of the
piece so far, in each window of a long piece (`longform.py`). What it does not do: beam search.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch.nn import functional as F

from muselab.engines.music.longform import DECODE_CONTEXT, DECODE_FADE, decode_chunks


class MusicgenSampler:
    """Generates audio codes with a `MusicgenForConditionalGeneration`'s weights, then decodes them."""

    #: Whether the conditioning is a prefix in the KV cache (the melody model) rather than
    #: cross-attention: the OpenVINO conversion traces another step for it.
    conditions_by_prefix = False

    def __init__(self, network: Any, cuda_graphs: bool = True):
        self.network = network
        #: An `OpenVinoMusicDecoder` that runs the decoder steps instead of PyTorch, when set
        #: (`openvino_music.load_music_decoder`).
        self.compiled: Any = None
        #: Replay the step as a CUDA graph when on a CUDA GPU (`CudaGraphStep`); False runs it eagerly.
        self.cuda_graphs = cuda_graphs
        lm = network.decoder  # MusicgenForCausalLM
        self.decoder = lm.model.decoder
        self.lm_heads = lm.lm_heads
        self.num_codebooks = int(self.decoder.num_codebooks)
        config = lm.config
        self.num_heads = int(config.num_attention_heads)
        self.head_dim = int(config.hidden_size) // self.num_heads
        self.pad_token_id = int(network.generation_config.pad_token_id)
        self.start_token_id = int(network.generation_config.decoder_start_token_id)
        self.project_encoder = (
            network.text_encoder.config.hidden_size != config.hidden_size
            and getattr(config, "cross_attention_hidden_size", None) is None
        )

    @property
    def dtype(self) -> torch.dtype:
        """The decoder's float dtype: its final layer norm's (int8 linear layers keep their norms float)."""
        return self.decoder.layer_norm.weight.dtype

    @torch.inference_mode()
    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, **sampling: Any) -> torch.Tensor:
        """Audio (batch, channels, samples) for a batch of tokenized prompts: `sample` (which
        takes `sampling`'s keywords), then each clip decoded."""
        tokens = self.sample(input_ids, attention_mask, **sampling)
        return torch.cat([self.decode(tokens, clip) for clip in range(self.clips(tokens))])

    @torch.inference_mode()
    def sample(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        *,
        max_new_tokens: int,
        guidance_scale: float,
        temperature: float,
        top_k: int,
        top_p: float,
        on_token: Callable[[], None] | None = None,
        generators: Sequence[torch.Generator] | None = None,
        prompt_codes: torch.Tensor | None = None,
        chroma: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Audio codes (clips * codebooks, 1 + prompt frames + max_new_tokens), delay pattern
        included, for `decode`. `prompt_codes` (codebooks, frames), a clip to continue, or
        (clips * codebooks, frames), one for each clip: its codes are the clip's first tokens,
        run through the decoder one position at a time (nothing drawn
        for them, so the first draw is generation's first), and the codes returned begin with them.

        Without `generators`, one clip per prompt, drawn from the global RNG (as `generate` in
        transformers draws them). With them, one clip per generator, all in one batch: each token
        then reads the decoder's weights once for every clip. One prompt is shared by all the clips
        (or there is one prompt per generator), and clip i draws its tokens from `generators[i]`
        alone: the same tokens as that clip sampled by itself, whatever else is in the batch."""
        batch = input_ids.shape[0] if generators is None else len(generators)
        guided = guidance_scale is not None and guidance_scale > 1
        processors = _logits_processors(guidance_scale if guided else None, temperature, top_k, top_p)
        if input_ids.shape[0] not in (1, batch):
            raise ValueError(f"{input_ids.shape[0]} prompts for {batch} generators: give one, or one each")
        conditioning = self._condition(input_ids, attention_mask, batch, guided, chroma)
        start = torch.full((batch * self.num_codebooks, 1), self.start_token_id, dtype=torch.long)
        start = start.to(input_ids.device)
        if prompt_codes is not None:  # generate's decoder_input_ids: the start token, then the clip
            given = prompt_codes.to(start)
            if given.shape[0] != start.shape[0]:  # one clip's codes, every clip's prompt
                given = given.repeat(batch, 1)
            start = torch.cat([start, given], dim=1)
        max_length = start.shape[1] + max_new_tokens
        # build_delay_pattern_mask lives on MusicgenForCausalLM and knows mono from stereo. The
        # pattern is (batch * codebooks, max_length): -1 where a sampled token goes, else the pad
        # id or the clip's code; `known` is how many positions hold no -1 yet (generate's prefill).
        known, pattern = self.network.decoder.build_delay_pattern_mask(
            start, pad_token_id=self.start_token_id, max_length=max_length
        )
        first_drawn = known.shape[1]
        tokens = pattern.clone()
        # Guided, the rows are every clip's conditional row, then every clip's unconditional one:
        # the split `ClassifierFreeGuidanceLogitsProcessor` makes (first half, second half).
        rows = 2 * batch if guided else batch
        step = self._stepper(rows, max_length, conditioning)
        on_gpu = tokens.device.type == "cuda"
        previous_done: Any = None
        nonfinite = torch.zeros((), dtype=torch.bool, device=tokens.device)
        for position in range(max_length - 1):
            step_tokens = tokens[:, position].reshape(batch, self.num_codebooks)
            if guided:
                step_tokens = step_tokens.repeat(2, 1)
            logits = step(step_tokens, position)
            if position + 1 < first_drawn:  # the clip's own next codes: its step fills the KV cache only
                if on_token is not None:
                    on_token()
                continue
            scores = processors(tokens[:, : position + 1], logits.float())
            probs = F.softmax(scores, dim=-1)
            # NaN or inf scores (an overflow in float16, say) would fail `multinomial`, and on a GPU
            # that failure is a device-side assert that ends the whole process's use of the GPU,
            # every later job included. Such rows draw uniformly instead; the clip is refused below.
            finite = torch.isfinite(probs).all(dim=-1, keepdim=True)
            nonfinite |= ~finite.all()
            probs = torch.where(finite, probs, 1.0 / probs.shape[-1])
            sampled = self._draw(probs, generators)
            column = pattern[:, position + 1]
            tokens[:, position + 1] = torch.where(column == -1, sampled, column)
            if on_gpu:
                # A GPU runs behind the Python that queues its work. Waiting for the token before
                # this one keeps one token queued (no idle gap) and the progress honest within a token.
                if previous_done is not None:
                    previous_done.synchronize()
                previous_done = torch.cuda.Event()
                previous_done.record()
            if on_token is not None:
                on_token()
        if bool(nonfinite):
            dtype = str(self.dtype).removeprefix("torch.")
            raise NonFiniteScores(
                f"MusicGen produced NaN or infinite scores while sampling ({tokens.device.type}, {dtype}): "
                "its numbers overflowed. Try --dtype float32" + (", or MUSELAB_CUDA_GRAPHS=0." if on_gpu else ".")
            )
        return tokens

    def _draw(self, probs: torch.Tensor, generators: Sequence[torch.Generator] | None) -> torch.Tensor:
        """One token per row of `probs` (clips * codebooks, vocab). With generators, each clip's
        codebook rows are one `multinomial` call on that clip's generator: the very call, on the
        very numbers, that the clip makes when it is sampled alone."""
        if generators is None:
            return torch.multinomial(probs, num_samples=1).squeeze(1)
        per_clip = probs.view(len(generators), self.num_codebooks, -1)
        pairs = zip(per_clip, generators, strict=True)
        draws = [torch.multinomial(rows, num_samples=1, generator=generator) for rows, generator in pairs]
        return torch.cat(draws).squeeze(1)

    def clips(self, tokens: torch.Tensor) -> int:
        """How many clips `sample`'s codes hold."""
        return tokens.shape[0] // self.num_codebooks

    def _condition(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, batch: int, guided: bool, chroma: Any
    ) -> tuple[list, list, torch.Tensor]:
        """What `_stepper` conditions on: the text's cross-attention keys and values, for `batch` clips."""
        if chroma is not None:
            raise ValueError("this model cannot follow a melody")
        cross_keys, cross_values, cross_mask = self._encode_text(input_ids, attention_mask)
        if input_ids.shape[0] != batch:
            # One prompt for every clip: encoded once, so each row attends to bit-identical keys.
            cross_keys = [keys.repeat(batch, 1, 1, 1) for keys in cross_keys]
            cross_values = [values.repeat(batch, 1, 1, 1) for values in cross_values]
            cross_mask = cross_mask.repeat(batch, 1, 1, 1)
        return cross_keys, cross_values, cross_mask

    def _encode_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[list, list, torch.Tensor]:
        """Cross-attention keys and values of every layer, for the conditional half only: the
        unconditional half's encoder states are zeros (masked), so its cross-attention adds zero."""
        network = self.network
        hidden = network.text_encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        if self.project_encoder:
            hidden = network.enc_to_dec_proj(hidden)
        hidden = hidden * attention_mask[..., None]
        keys, values = [], []
        for layer in self.decoder.layers:
            attention = layer.encoder_attn
            keys.append(self._heads(attention.k_proj(hidden)))
            values.append(self._heads(attention.v_proj(hidden)))
        mask = attention_mask.bool()[:, None, None, :]  # (batch, 1, 1, text length)
        return keys, values, mask

    def _heads(self, states: torch.Tensor) -> torch.Tensor:
        batch, length, _ = states.shape
        return states.view(batch, length, self.num_heads, self.head_dim).transpose(1, 2)

    def _stepper(self, rows: int, max_length: int, cross: tuple) -> Callable[[torch.Tensor, int], torch.Tensor]:
        """The function that turns one position's tokens into the next logits, holding the KV cache:
        PyTorch with a preallocated cache, or the compiled OpenVINO decoder when there is one."""
        if self.compiled is not None:
            return self.compiled.start(*cross, rows=rows)
        if self.cuda_graphs and cross[2].device.type == "cuda":
            graph = CudaGraphStep.capture(self, rows, max_length, cross)
            if graph is not None:
                return graph
        keys, values = self._kv_cache(rows, max_length, cross[2].device, torch.empty)
        return self._eager_step(keys, values, 0, cross)

    def _eager_step(
        self, keys: torch.Tensor, values: torch.Tensor, start: int, cross: tuple
    ) -> Callable[[torch.Tensor, int], torch.Tensor]:
        """PyTorch's step over a preallocated cache whose first `start` positions are filled (a
        melody model's prefix): the tokens of step `position` go in at cache position `start +
        position`, and attend over the cache up to there."""

        def step(step_tokens: torch.Tensor, position: int) -> torch.Tensor:
            at = start + position

            def attend_self(index: int, attention: Any, normed: torch.Tensor) -> torch.Tensor:
                keys[index, :, :, at] = self._heads(attention.k_proj(normed))[:, :, 0]
                values[index, :, :, at] = self._heads(attention.v_proj(normed))[:, :, 0]
                query = self._heads(attention.q_proj(normed))
                return F.scaled_dot_product_attention(query, keys[index, :, :, : at + 1], values[index, :, :, : at + 1])

            return self.logits(step_tokens, self.decoder.embed_positions.weights[at], attend_self, *cross)

        return step

    def _kv_cache(
        self, rows: int, max_length: int, device: torch.device, make: Callable[..., torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of every layer, (layers, rows, heads, max_length, head dim), made by
        `make` (`torch.empty`, or `torch.zeros` where masked slots get read)."""
        shape = (len(self.decoder.layers), rows, self.num_heads, max_length, self.head_dim)
        return make(shape, dtype=self.dtype, device=device), make(shape, dtype=self.dtype, device=device)

    def static_step(
        self, rows: int, max_length: int, cross: tuple
    ) -> tuple[Callable[[], torch.Tensor], torch.Tensor, torch.Tensor]:
        """The step with fixed shapes and addresses, as a CUDA graph needs: returns `run()` and the
        two inputs it reads, `step_tokens` (rows, codebooks) and `position` (1,), to fill in place.

        The KV cache is written at `position` (a device tensor, not a Python int) and attention
        covers the whole cache, masked beyond `position`: the same result as attending over the
        filled part. The cache starts at zero, since a masked entry still gets multiplied by its
        weight of zero, and uninitialised memory may hold NaN."""
        device = cross[2].device
        keys, values = self._kv_cache(rows, max_length, device, torch.zeros)
        step_tokens = torch.zeros(rows, self.num_codebooks, dtype=torch.long, device=device)
        position = torch.zeros(1, dtype=torch.long, device=device)
        slots = torch.arange(max_length, device=device)
        positions = self.decoder.embed_positions.weights

        def run() -> torch.Tensor:
            filled = (slots <= position)[None, None, None, :]  # (1, 1, 1, max_length)

            def attend_self(index: int, attention: Any, normed: torch.Tensor) -> torch.Tensor:
                keys[index].index_copy_(2, position, self._heads(attention.k_proj(normed)))
                values[index].index_copy_(2, position, self._heads(attention.v_proj(normed)))
                query = self._heads(attention.q_proj(normed))
                return F.scaled_dot_product_attention(query, keys[index], values[index], attn_mask=filled)

            return self.logits(step_tokens, positions.index_select(0, position)[0], attend_self, *cross)

        return run, step_tokens, position

    def logits(
        self,
        step_tokens: torch.Tensor,
        position_embedding: torch.Tensor,
        attend_self: Callable[[int, Any, torch.Tensor], torch.Tensor],
        cross_keys: Any,
        cross_values: Any,
        cross_mask: torch.Tensor,
    ) -> torch.Tensor:
        """Logits (rows * codebooks, vocab) for the next position, given the tokens at this one.
        `attend_self(layer index, attention module, normed states)` does the self-attention with
        whatever KV cache the caller keeps. The first rows, as many as the cross-attention keys
        have, are conditional; only they get cross-attention (the unconditional half's is exactly
        zero). `openvino_music` traces this very function: bump its MUSIC_CONVERSION_VERSION when
        the maths here changes, or cached conversions would keep the old graph."""
        decoder = self.decoder
        hidden = (self.embed(step_tokens) + position_embedding).unsqueeze(1)  # (rows, 1, hidden)
        rows = hidden.shape[0]
        for index, layer in enumerate(decoder.layers):
            attention = layer.self_attn
            context = attend_self(index, attention, layer.self_attn_layer_norm(hidden))
            hidden = hidden + attention.out_proj(context.transpose(1, 2).reshape(rows, 1, -1))

            if cross_keys is not None:  # the melody model has no cross-attention (its conditioning is a prefix)
                cross = layer.encoder_attn
                batch = cross_keys[index].shape[0]
                conditional = hidden[:batch]
                query = self._heads(cross.q_proj(layer.encoder_attn_layer_norm(conditional)))
                context = F.scaled_dot_product_attention(
                    query, cross_keys[index], cross_values[index], attn_mask=cross_mask
                )
                added = cross.out_proj(context.transpose(1, 2).reshape(batch, 1, -1))
                hidden = torch.cat([conditional + added, hidden[batch:]])

            normed = layer.final_layer_norm(hidden)
            hidden = hidden + layer.fc2(layer.activation_fn(layer.fc1(normed)))
        hidden = decoder.layer_norm(hidden)
        logits = torch.stack([head(hidden[:, 0]) for head in self.lm_heads], dim=1)  # (rows, codebooks, vocab)
        return logits.reshape(rows * self.num_codebooks, -1)

    def embed(self, step_tokens: torch.Tensor) -> torch.Tensor:
        """One position's tokens (rows, codebooks) as the decoder's input: their codebooks' embeddings, summed."""
        return sum(self.decoder.embed_tokens[k](step_tokens[:, k]) for k in range(self.num_codebooks))

    @torch.inference_mode()
    def teacher_forced_logits(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, codes: torch.Tensor
    ) -> torch.Tensor:
        """Logits (codebooks, positions, vocab) for fixed codes (codebooks, positions) of one
        unguided prompt, through the same steps generation uses: how far a backend's numbers move,
        free of the divergence sampling adds."""
        cross = self._encode_text(input_ids, attention_mask)
        step = self._stepper(input_ids.shape[0], codes.shape[1], cross)
        rows = [step(codes[:, position][None], position) for position in range(codes.shape[1])]
        return torch.stack(rows, dim=1)

    @torch.inference_mode()
    def decode(self, tokens: torch.Tensor, clip: int) -> torch.Tensor:
        """Clip `clip` of `sample`'s codes -> waveform (1, channels, samples), as `generate` in
        transformers does it: drop the delay pattern's pads, run EnCodec. One clip at a time: it
        decodes to the same samples alone or from a batch, and EnCodec's activations for a long
        clip are large (tens of MB a second of audio), so a batch of them would add up."""
        return self.decode_codes(self.codes(tokens[clip * self.num_codebooks : (clip + 1) * self.num_codebooks]))

    def codes(self, tokens: torch.Tensor) -> torch.Tensor:
        """`sample`'s codes (rows, positions) without the delay pattern: (rows, frames). Every row
        holds the same number of pads (the start token and the pattern's), and no code is a pad."""
        return tokens[tokens != self.pad_token_id].reshape(tokens.shape[0], -1)

    @torch.inference_mode()
    def decode_codes(self, frames: torch.Tensor, on_chunk: Callable[[int], None] | None = None) -> torch.Tensor:
        """One clip's codes (codebooks, frames) -> waveform (1, channels, samples). A long piece
        decodes in chunks (`longform.decode_chunks`), each with context on both sides, cross-faded
        where they meet; `on_chunk(frames)` runs after each (report progress, stop on cancel)."""
        chunks = decode_chunks(frames.shape[1])
        if len(chunks) == 1:
            return self._decode_at_once(frames)
        total = frames.shape[1]
        audio: torch.Tensor | None = None
        for start, end in chunks:
            low, high = max(0, start - DECODE_CONTEXT), min(total, end + DECODE_CONTEXT)
            decoded = self._decode_at_once(frames[:, low:high])
            hop = decoded.shape[-1] // (high - low)
            if audio is None:
                audio = decoded.new_zeros((*decoded.shape[:-1], total * hop))
            first, last = max(0, start - DECODE_FADE), min(total, end + DECODE_FADE)
            part = decoded[..., (first - low) * hop : (last - low) * hop]
            weights = torch.ones(part.shape[-1], dtype=part.dtype, device=part.device)
            fade = (torch.arange(2 * DECODE_FADE * hop, dtype=part.dtype, device=part.device) + 0.5) / (
                2 * DECODE_FADE * hop
            )
            if start > 0:
                weights[: fade.shape[0]] *= fade
            if end < total:
                weights[-fade.shape[0] :] *= 1 - fade
            audio[..., first * hop : last * hop] += part * weights
            if on_chunk is not None:
                on_chunk(end - start)
        assert audio is not None
        return audio

    def _decode_at_once(self, frames: torch.Tensor) -> torch.Tensor:
        codes = frames[None, None]
        audio_encoder = self.network.audio_encoder
        if self.network.decoder.config.audio_channels == 1:
            return audio_encoder.decode(codes, audio_scales=[None]).audio_values
        left = audio_encoder.decode(codes[:, :, ::2, :], audio_scales=[None]).audio_values
        right = audio_encoder.decode(codes[:, :, 1::2, :], audio_scales=[None]).audio_values
        return torch.cat([left, right], dim=1)

    def cache_bytes(self, rows: int, max_length: int) -> int:
        """The KV cache PyTorch's loop holds for `rows` rows of `max_length` positions."""
        elements = 2 * len(self.decoder.layers) * rows * self.num_heads * max_length * self.head_dim
        return elements * self.dtype.itemsize


class NonFiniteScores(RuntimeError):
    """The decoder's scores held NaN or infinity: the clip would be noise, so none is made."""


class CudaGraphStep:
    """`MusicgenSampler.static_step` captured as a CUDA graph: each token is then one graph
    launch instead of about 600 kernel launches from Python, which is what bounds eager decoding
    on a fast GPU. Captured once per batch (a few eager steps' time); its memory is freed with it."""

    def __init__(
        self,
        graph: Any,
        run: Callable[[], torch.Tensor],
        step_tokens: torch.Tensor,
        position: torch.Tensor,
        logits: torch.Tensor,
    ):
        self.graph, self.step_tokens, self.position, self.logits = graph, step_tokens, position, logits
        # The graph reads and writes the KV cache and the other tensors `run` holds at fixed
        # addresses: freed, their memory would go to the next allocation, and every replay would
        # then read (and write) someone else's data.
        self.run = run

    @classmethod
    def capture(cls, sampler: MusicgenSampler, rows: int, max_length: int, cross: tuple) -> CudaGraphStep | None:
        """The captured step, or None (with a warning) where capture fails: the eager step then runs."""
        run, step_tokens, position = sampler.static_step(rows, max_length, cross)
        try:
            # Warm-up on a side stream, as capture requires: kernels chosen, workspaces allocated.
            # It writes cache slot 0, which the first real step overwrites.
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                for _ in range(2):
                    run()
            torch.cuda.current_stream().wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            # thread_local: jobs running on the GPU in other threads meanwhile (the job service
            # runs music and images side by side) neither break the capture nor fail because of it.
            with torch.cuda.graph(graph, capture_error_mode="thread_local"):
                logits = run()
        except RuntimeError as exc:
            logging.getLogger(__name__).warning("CUDA graph capture failed (%s); music decodes eagerly", exc)
            return None
        return cls(graph, run, step_tokens, position, logits)

    def __call__(self, step_tokens: torch.Tensor, position: int) -> torch.Tensor:
        self.step_tokens.copy_(step_tokens)
        self.position.fill_(position)
        self.graph.replay()
        return self.logits.clone()  # the next replay overwrites the graph's output


def _logits_processors(guidance: float | None, temperature: float, top_k: int, top_p: float) -> Any:
    """transformers' own processors, in the order `generate` applies them."""
    from transformers import LogitsProcessorList, TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper
    from transformers.generation.logits_process import ClassifierFreeGuidanceLogitsProcessor

    processors = LogitsProcessorList()
    if guidance is not None:
        processors.append(ClassifierFreeGuidanceLogitsProcessor(guidance))
    if temperature != 1.0:
        processors.append(TemperatureLogitsWarper(temperature))
    if top_k:
        processors.append(TopKLogitsWarper(top_k=top_k, min_tokens_to_keep=1))
    if top_p < 1.0:
        processors.append(TopPLogitsWarper(top_p=top_p, min_tokens_to_keep=1))
    return processors
