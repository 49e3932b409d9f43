"""The OpenVINO path for MusicGen's decoder on CPUs.

A MusicGen token costs reading every decoder weight once (0.35 G parameters a token) plus some
six hundred small operations. OpenVINO runs the whole step as one compiled graph, with int8
weights (NNCF) and the KV cache kept *inside* the runtime as state: its fused attention appends
each token's keys and values in place, stored as u8, so a long clip reads a quarter of the bytes
PyTorch's float32 cache does. Measured on a 2-core Xeon (docs/PERFORMANCE.md), alternated with
PyTorch int8-dynamic in one process: 1.3-1.4x faster tokens, at the same distance from float32
(logits SNR about 31 dB for both).

The step is traced from the same code the PyTorch loop runs (`MusicgenSampler.logits`); the text
encoder, the cross-attention keys and values (once per request), sampling and EnCodec stay in PyTorch.
"""

from __future__ import annotations

import logging
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.nn import functional as F

from muselab.engines.base import ProgressCallback
from muselab.engines.openvino_runtime import (
    TRACING_LOCK,
    ConversionProgress,
    cache_key,
    compile_ir,
    compress_int8,
    save_atomically,
)

#: Bump when the traced step (here or `MusicgenSampler.logits`) changes: cached conversions are keyed on it.
#: 2: each layer's cross-attention keys and values are inputs of their own (see `_DecoderStepForExport`).
MUSIC_CONVERSION_VERSION = 2

_INPUTS = ("step_tokens", "position", "cross_mask")


def _cross(layer: int, kind: str) -> str:
    return f"cross_{kind}_{layer}"


def _past(layer: int, kind: str) -> str:
    return f"past_{kind}_{layer}"


def _present(layer: int, kind: str) -> str:
    return f"present_{kind}_{layer}"


class _DecoderStepForExport(torch.nn.Module):
    """One decoder step with the KV cache as explicit tensors: past keys/values in, past plus this
    token's out (made into runtime state after conversion).

    Each layer's cross-attention keys and values come in as inputs of their own (key, value, layer
    by layer), not as one tensor of all layers indexed per layer: with one tensor, OpenVINO moved
    the attention's scaling of the keys up through that indexing, and so every layer scaled every
    layer's keys, 24 times the work a token needs (a few ms a token, growing with clips and prompt)."""

    def __init__(self, sampler: Any):
        super().__init__()
        self.sampler = sampler
        self.decoder = sampler.decoder  # registered, so the tracer sees the weights as parameters
        self.lm_heads = sampler.lm_heads
        self.layers = len(sampler.decoder.layers)

    def forward(
        self,
        step_tokens: torch.Tensor,
        position: torch.Tensor,
        cross_mask: torch.Tensor,
        *tensors: torch.Tensor,
    ) -> tuple[torch.Tensor, ...]:
        sampler = self.sampler
        presents: list[torch.Tensor] = []
        cross, past = tensors[: 2 * self.layers], tensors[2 * self.layers :]
        # Inputs and logits are float32 whatever the weights are (numpy has no bfloat16).
        cross_keys = [keys.to(sampler.dtype) for keys in cross[0::2]]
        cross_values = [values.to(sampler.dtype) for values in cross[1::2]]

        def attend_self(index: int, attention: Any, normed: torch.Tensor) -> torch.Tensor:
            key = torch.cat([past[2 * index], sampler._heads(attention.k_proj(normed))], dim=2)
            value = torch.cat([past[2 * index + 1], sampler._heads(attention.v_proj(normed))], dim=2)
            presents.extend((key, value))
            return F.scaled_dot_product_attention(sampler._heads(attention.q_proj(normed)), key, value)

        position_embedding = self.decoder.embed_positions.weights.index_select(0, position)
        logits = sampler.logits(step_tokens, position_embedding, attend_self, cross_keys, cross_values, cross_mask)
        return (logits.float(), *presents)


class _PrefixStepForExport(torch.nn.Module):
    """The melody model's step: `hidden` (rows, positions, width) in, its token embeddings or its
    conditioning prefix (chroma and text states), at cache positions from `position` on, with
    causal attention over the past and themselves; the logits of the last position out. The
    prefix is one call (all its positions at once), each token one more."""

    def __init__(self, sampler: Any):
        super().__init__()
        self.sampler = sampler
        self.decoder = sampler.decoder
        self.lm_heads = sampler.lm_heads

    def forward(self, hidden: torch.Tensor, position: torch.Tensor, *past: torch.Tensor) -> tuple[torch.Tensor, ...]:
        sampler, decoder = self.sampler, self.decoder
        presents: list[torch.Tensor] = []
        length = torch.arange(hidden.shape[1]) + position  # the positions these states take
        states = (hidden + decoder.embed_positions.weights.index_select(0, length)).to(sampler.dtype)

        def attend_self(index: int, attention: Any, normed: torch.Tensor) -> torch.Tensor:
            key = torch.cat([past[2 * index], sampler._heads(attention.k_proj(normed))], dim=2)
            value = torch.cat([past[2 * index + 1], sampler._heads(attention.v_proj(normed))], dim=2)
            presents.extend((key, value))
            causal = torch.arange(key.shape[2])[None, :] <= length[:, None]  # (positions, cache)
            return F.scaled_dot_product_attention(
                sampler._heads(attention.q_proj(normed)), key, value, attn_mask=causal
            )

        last = decoder.layer_norm(sampler.through_layers(states, attend_self)[:, -1])
        logits = torch.stack([head(last) for head in self.lm_heads], dim=1)
        return (logits.reshape(states.shape[0] * sampler.num_codebooks, -1).float(), *presents)


def _example(sampler: Any, text_length: int = 5, past_length: int = 3) -> tuple[torch.Tensor, ...]:
    layers, heads, head_dim = len(sampler.decoder.layers), sampler.num_heads, sampler.head_dim
    dtype = sampler.dtype
    cross = [torch.randn(1, heads, text_length, head_dim) for _ in range(2 * layers)]
    past = [torch.randn(2, heads, past_length, head_dim, dtype=dtype) for _ in range(2 * layers)]
    return (
        torch.zeros(2, sampler.num_codebooks, dtype=torch.long),
        torch.tensor([past_length]),
        torch.ones(1, 1, 1, text_length, dtype=torch.bool),
        *cross,
        *past,
    )


def convert_decoder(sampler: Any, quantize: str, share_weights: bool = True) -> Any:
    """The decoder step as a stateful OpenVINO model: KV cache as state, dynamic rows and lengths.
    With `share_weights` its constants may be the PyTorch tensors themselves (no copy): it must
    then be saved and read back before those are freed."""
    import openvino as ov
    import openvino.opset13 as ops
    from openvino._offline_transformations import apply_make_stateful_transformation

    layers, heads, head_dim = len(sampler.decoder.layers), sampler.num_heads, sampler.head_dim
    prefixed = sampler.conditions_by_prefix
    past_names = [_past(layer, kind) for layer in range(layers) for kind in ("key", "value")]
    cross_names = [] if prefixed else [_cross(layer, kind) for layer in range(layers) for kind in ("key", "value")]
    if prefixed:
        width = sampler.decoder.config.hidden_size
        step: Any = _PrefixStepForExport(sampler).eval()
        past = [torch.randn(2, heads, 3, head_dim, dtype=sampler.dtype) for _ in range(2 * layers)]
        example: tuple[torch.Tensor, ...] = (torch.randn(2, 4, width), torch.tensor([3]), *past)
        inputs: list[str] = ["hidden", "position"]
        rows_input, dynamic = "hidden", {"hidden": [-1, -1, width], "position": [1]}
    else:
        step, example, inputs = _DecoderStepForExport(sampler).eval(), _example(sampler), list(_INPUTS)
        rows_input = "step_tokens"
        dynamic = {"step_tokens": [-1, sampler.num_codebooks], "position": [1], "cross_mask": [-1, 1, 1, -1]}
    with TRACING_LOCK, torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer warnings about shape checks baked in as constants
        model = ov.convert_model(step, example_input=example, share_weights=share_weights)
    for port, name in zip(model.inputs, [*inputs, *cross_names, *past_names], strict=True):
        port.get_tensor().set_names({name})
    present_names = [_present(layer, kind) for layer in range(layers) for kind in ("key", "value")]
    for port, name in zip(model.outputs, ["logits", *present_names], strict=True):
        port.get_tensor().set_names({name})
    dynamic.update({name: [-1, heads, -1, head_dim] for name in [*cross_names, *past_names]})
    model.reshape({name: ov.PartialShape(shape) for name, shape in dynamic.items()})
    if quantize != "none":
        model = compress_int8(model)
    apply_make_stateful_transformation(model, dict(zip(past_names, present_names, strict=True)))
    # Each state starts empty (rows x heads x 0 x head_dim) and is read through a Gather on
    # `beam_idx`: the pattern the CPU plugin fuses into its in-place KV-cache attention.
    rows = ops.gather(ops.shape_of(model.input(rows_input), output_type="i64"), ops.constant([0]), ops.constant(0))
    empty = ops.concat([rows, ops.constant(np.array([heads, 0, head_dim], dtype=np.int64))], axis=0)
    beam_idx = ops.parameter([-1], ov.Type.i32, name="beam_idx")
    beam_idx.output(0).get_tensor().set_names({"beam_idx"})
    for op in model.get_ops():
        if op.get_type_name() == "ReadValue":
            op.set_arguments([ops.broadcast(ops.constant(0.0, dtype=op.get_output_element_type(0)), empty)])
            for consumer in list(op.output(0).get_target_inputs()):
                consumer.replace_source_output(ops.gather(op.output(0), beam_idx, ops.constant(0)).output(0))
    model.add_parameters([beam_idx])
    model.validate_nodes_and_infer_types()
    return model


class OpenVinoMusicDecoder:
    """The compiled decoder step; `start` begins a batch of clips (any number of rows: the shapes
    are dynamic) and returns its step function. A batch's infer request holds its KV cache, so one
    batch at a time per decoder (the job service runs one job per loaded model at a time)."""

    def __init__(self, compiled: Any):
        self.compiled = compiled
        self.request: Any = None
        self._inputs: list[np.ndarray] = []  # kept alive: the request reads them in place

    def start(self, cross_keys: list, cross_values: list, cross_mask: torch.Tensor, rows: int) -> Any:
        import openvino as ov

        # A fresh request (and so fresh KV-cache state) per batch of clips: reset_state() on a request whose
        # previous clip had another number of rows (guided 2, unguided 1) left the CPU plugin's
        # u8 cache reading stale memory, and the logits came out NaN now and then.
        self.request = request = self.compiled.create_infer_request()
        # Set once per batch; the step function below only sets what changes per token.
        position = np.zeros(1, dtype=np.int64)
        inputs = {
            "cross_mask": np.ascontiguousarray(cross_mask.numpy()),
            "beam_idx": np.arange(rows, dtype=np.int32),
            "position": position,
        }
        for layer, (keys, values) in enumerate(zip(cross_keys, cross_values, strict=True)):
            inputs[_cross(layer, "key")] = np.ascontiguousarray(keys.float().numpy())
            inputs[_cross(layer, "value")] = np.ascontiguousarray(values.float().numpy())
        self._inputs = list(inputs.values())
        for name, array in inputs.items():
            request.set_tensor(name, ov.Tensor(array, shared_memory=True))

        def step(step_tokens: torch.Tensor, index: int) -> torch.Tensor:
            position[0] = index
            request.set_tensor("step_tokens", ov.Tensor(np.ascontiguousarray(step_tokens.numpy())))
            request.infer()
            # The request reuses its output buffer on the next call: copy before handing it out.
            return torch.from_numpy(np.array(request.get_tensor("logits").data, copy=True))

        return step


class OpenVinoPrefixDecoder:
    """The compiled step of a prefix-conditioned decoder (the melody model): `start` runs the
    prefix into a fresh KV cache in one call and returns the step function for the tokens after
    it, whose embeddings are looked up here (the tables stay in PyTorch)."""

    def __init__(self, compiled: Any, sampler: Any):
        self.compiled, self.sampler = compiled, sampler
        self.request: Any = None

    def start(self, prefix: torch.Tensor, rows: int) -> Any:
        import openvino as ov

        self.request = request = self.compiled.create_infer_request()
        request.set_tensor("beam_idx", ov.Tensor(np.arange(rows, dtype=np.int32)))

        def run(hidden: torch.Tensor, position: int) -> torch.Tensor:
            request.set_tensor("hidden", ov.Tensor(np.ascontiguousarray(hidden.float().numpy())))
            request.set_tensor("position", ov.Tensor(np.array([position], dtype=np.int64)))
            request.infer()
            return torch.from_numpy(np.array(request.get_tensor("logits").data, copy=True))

        run(prefix, 0)
        start, embed = prefix.shape[1], self.sampler.embed

        def step(step_tokens: torch.Tensor, index: int) -> torch.Tensor:
            return run(embed(step_tokens)[:, None], start + index)

        return step


def compile_options(quantize: str) -> dict[str, Any]:
    """Plugin properties for the decoder step, beyond `compile_ir`'s dtype and latency ones."""
    options: dict[str, Any] = {}
    if quantize != "int8-dynamic":
        # Wherever weights are int8, OpenVINO quantizes activations on the fly by default (in
        # groups of 32): that is muselab's "int8-dynamic", so plain "int8" turns it off.
        options["DYNAMIC_QUANTIZATION_GROUP_SIZE"] = 0
    if quantize == "none":
        # The runtime stores the KV cache as u8 by default (a quarter of the bytes to read on long
        # clips); unquantized weights keep it float32 too, so "none" matches PyTorch to rounding.
        options["KV_CACHE_PRECISION"] = "f32"
    return options


def load_music_decoder(
    sampler: Any,
    quantize: str,
    dtype: torch.dtype,
    source: Path | None,
    cache_dir: Path | None,
    on_progress: ProgressCallback | None = None,
) -> dict[str, float]:
    """Give `sampler` the decoder step compiled by OpenVINO, read from the cache or converted now
    (and cached when the model came from a folder), then free the PyTorch weights it replaces.
    Returns the seconds spent converting and compiling. A failure leaves `sampler` as it was."""
    weights = "none" if quantize == "none" else "int8"  # int8 and int8-dynamic share the converted model
    folder = None
    if source is not None and cache_dir is not None:
        key = cache_key(source, weights, dtype, conversion=MUSIC_CONVERSION_VERSION)
        folder = cache_dir / f"{'musicgen-melody' if sampler.conditions_by_prefix else 'musicgen'}-decoder-{key}"
    timings = {"convert_s": 0.0, "compile_s": 0.0}
    started = time.perf_counter()
    say = None
    if folder is not None and (folder / "model.xml").exists():
        model: Any = folder
    else:
        where = "one time" if folder is not None else "not cached: the model was built in memory"
        say = ConversionProgress(4, on_progress)
        say(f"Converting the music decoder to OpenVINO ({where})")
        # Converted without copying the weights when it is saved and read back (the compiled model
        # then owns its weights, so the PyTorch ones can go); copied when it stays in memory.
        model = convert_decoder(sampler, weights, share_weights=folder is not None)
        say("Converted" if weights == "none" else "Converted, with int8 weights (NNCF)")
        if folder is not None:
            say("Saving the converted music decoder")
            try:
                save_atomically(model, folder)
            except OSError as exc:  # a read-only or full cache: convert again, with copied weights
                logging.getLogger(__name__).warning("could not cache the converted music decoder: %s", exc)
                model = convert_decoder(sampler, weights, share_weights=False)
            else:
                model = folder
        else:
            say.step += 1
    timings["convert_s"] = time.perf_counter() - started
    if say is not None:
        say("Compiling the music decoder")
    started = time.perf_counter()
    compiled = compile_ir(model, dtype, **compile_options(quantize))
    timings["compile_s"] = time.perf_counter() - started
    if sampler.conditions_by_prefix:
        sampler.compiled = OpenVinoPrefixDecoder(compiled, sampler)
    else:
        sampler.compiled = OpenVinoMusicDecoder(compiled)
    drop_torch_decoder_weights(sampler)
    if say is not None:
        say("Music decoder ready", advance=False)
    return timings


def drop_torch_decoder_weights(sampler: Any) -> None:
    """Free the PyTorch decoder weights the OpenVINO step replaced (the compiled model owns its own:
    see `load_music_decoder`). Kept: each layer's cross-attention key and value projections, which
    run once per request in `MusicgenSampler._encode_text`."""
    from muselab.quantize import return_freed_memory

    gone = torch.nn.Identity()
    for layer in sampler.decoder.layers:
        for name in ("self_attn", "self_attn_layer_norm", "encoder_attn_layer_norm", "fc1", "fc2", "final_layer_norm"):
            setattr(layer, name, gone)
        if not sampler.conditions_by_prefix:
            layer.encoder_attn.q_proj = gone
            layer.encoder_attn.out_proj = gone
    if not sampler.conditions_by_prefix:  # the prefix decoder looks its token embeddings up in PyTorch
        sampler.decoder.embed_tokens = torch.nn.ModuleList()
    sampler.lm_heads = torch.nn.ModuleList()
    sampler.network.decoder.lm_heads = sampler.lm_heads
    return_freed_memory()
