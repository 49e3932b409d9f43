"""The OpenVINO path for MusicGen's decoder on CPUs.

A MusicGen token costs reading every decoder weight once (0.35 G parameters a token) plus some
six hundred small operations. OpenVINO runs the whole step as one compiled graph, with int8
weights (NNCF) and the KV cache kept *inside* the runtime as state: its fused attention appends
each token's keys and values in place, stored as u8, so a long clip reads a quarter of the bytes
PyTorch's float32 cache does. Measured on 2-core machines (docs/PERFORMANCE.md): 25-28 ms a token
against PyTorch int8-dynamic's 35-48 ms, at the same distance from float32 (logits SNR 31-32 dB).

The step is traced from the same code the PyTorch loop runs (`MusicgenSampler.logits`); the text
encoder, the cross-attention keys and values (once per clip), sampling and EnCodec stay in PyTorch.
"""

from __future__ import annotations

import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.nn import functional as F

from muselab.engines.base import ProgressCallback
from muselab.engines.openvino import (
    ConversionProgress,
    cache_key,
    compress_int8,
    precision_hint,
    save_atomically,
)

_INPUTS = ("step_tokens", "position", "cross_keys", "cross_values", "cross_mask")


def _past(layer: int, kind: str) -> str:
    return f"past_{kind}_{layer}"


def _present(layer: int, kind: str) -> str:
    return f"present_{kind}_{layer}"


class _DecoderStepForExport(torch.nn.Module):
    """One decoder step with the KV cache as explicit tensors: past keys/values in, past plus this
    token's out (made into runtime state after conversion)."""

    def __init__(self, sampler: Any):
        super().__init__()
        self.sampler = sampler
        self.decoder = sampler.decoder  # registered, so the tracer sees the weights as parameters
        self.lm_heads = sampler.lm_heads

    def forward(
        self,
        step_tokens: torch.Tensor,
        position: torch.Tensor,
        cross_keys: torch.Tensor,
        cross_values: torch.Tensor,
        cross_mask: torch.Tensor,
        *past: torch.Tensor,
    ) -> tuple[torch.Tensor, ...]:
        sampler = self.sampler
        presents: list[torch.Tensor] = []
        # Inputs and logits are float32 whatever the weights are (numpy has no bfloat16).
        dtype = self.decoder.layer_norm.weight.dtype
        cross_keys, cross_values = cross_keys.to(dtype), cross_values.to(dtype)

        def attend_self(index: int, attention: Any, normed: torch.Tensor) -> torch.Tensor:
            key = torch.cat([past[2 * index], sampler._heads(attention.k_proj(normed))], dim=2)
            value = torch.cat([past[2 * index + 1], sampler._heads(attention.v_proj(normed))], dim=2)
            presents.extend((key, value))
            return F.scaled_dot_product_attention(sampler._heads(attention.q_proj(normed)), key, value)

        position_embedding = self.decoder.embed_positions.weights.index_select(0, position)
        logits = sampler.logits(step_tokens, position_embedding, attend_self, cross_keys, cross_values, cross_mask)
        return (logits.float(), *presents)


def _example(sampler: Any, text_length: int = 5, past_length: int = 3) -> tuple[torch.Tensor, ...]:
    layers, heads, head_dim = len(sampler.decoder.layers), sampler.num_heads, sampler.head_dim
    dtype = sampler.decoder.layer_norm.weight.dtype
    cross = torch.randn(layers, 1, heads, text_length, head_dim)
    past = [torch.randn(2, heads, past_length, head_dim, dtype=dtype) for _ in range(2 * layers)]
    return (
        torch.zeros(2, sampler.num_codebooks, dtype=torch.long),
        torch.tensor([past_length]),
        cross,
        cross.clone(),
        torch.ones(1, 1, 1, text_length, dtype=torch.bool),
        *past,
    )


def convert_decoder(sampler: Any, quantize: str) -> Any:
    """The decoder step as a stateful OpenVINO model: KV cache as state, dynamic rows and lengths."""
    import openvino as ov
    import openvino.opset13 as ops
    from openvino._offline_transformations import apply_make_stateful_transformation

    layers, heads, head_dim = len(sampler.decoder.layers), sampler.num_heads, sampler.head_dim
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer warnings about shape checks baked in as constants
        model = ov.convert_model(_DecoderStepForExport(sampler).eval(), example_input=_example(sampler))
    past_names = [_past(layer, kind) for layer in range(layers) for kind in ("key", "value")]
    for port, name in zip(model.inputs, [*_INPUTS, *past_names], strict=True):
        port.get_tensor().set_names({name})
    present_names = [_present(layer, kind) for layer in range(layers) for kind in ("key", "value")]
    for port, name in zip(model.outputs, ["logits", *present_names], strict=True):
        port.get_tensor().set_names({name})
    dynamic = {
        "step_tokens": [-1, sampler.num_codebooks],
        "position": [1],
        "cross_keys": [layers, -1, heads, -1, head_dim],
        "cross_values": [layers, -1, heads, -1, head_dim],
        "cross_mask": [-1, 1, 1, -1],
        **{name: [-1, heads, -1, head_dim] for name in past_names},
    }
    model.reshape({name: ov.PartialShape(shape) for name, shape in dynamic.items()})
    if quantize != "none":
        model = compress_int8(model)
    apply_make_stateful_transformation(model, dict(zip(past_names, present_names, strict=True)))
    # Each state starts empty (rows x heads x 0 x head_dim) and is read through a Gather on
    # `beam_idx`: the pattern the CPU plugin fuses into its in-place KV-cache attention.
    rows = ops.gather(ops.shape_of(model.input("step_tokens"), output_type="i64"), ops.constant([0]), ops.constant(0))
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
    """The compiled decoder step; `start` begins a clip and returns its step function."""

    def __init__(self, compiled: Any):
        self.compiled = compiled
        self.request = compiled.create_infer_request()
        self._inputs: list[np.ndarray] = []

    def start(self, cross_keys: list, cross_values: list, cross_mask: torch.Tensor, rows: int) -> Any:
        import openvino as ov

        request = self.request
        request.reset_state()
        # Set once per clip; the step function below only sets what changes per token.
        self._inputs = [
            np.ascontiguousarray(torch.stack(cross_keys).float().numpy()),
            np.ascontiguousarray(torch.stack(cross_values).float().numpy()),
            np.ascontiguousarray(cross_mask.numpy()),
            np.arange(rows, dtype=np.int32),
        ]
        for name, array in zip(("cross_keys", "cross_values", "cross_mask", "beam_idx"), self._inputs, strict=True):
            request.set_tensor(name, ov.Tensor(array, shared_memory=True))
        position_tensor = np.zeros(1, dtype=np.int64)
        request.set_tensor("position", ov.Tensor(position_tensor, shared_memory=True))

        def step(step_tokens: torch.Tensor, position: int) -> torch.Tensor:
            position_tensor[0] = position
            request.set_tensor("step_tokens", ov.Tensor(np.ascontiguousarray(step_tokens.numpy())))
            request.infer()
            # The request reuses its output buffer on the next call: copy before handing it out.
            return torch.from_numpy(np.array(request.get_tensor("logits").data, copy=True))

        return step


def compile_options(quantize: str, dtype: torch.dtype) -> dict[str, Any]:
    options: dict[str, Any] = {"INFERENCE_PRECISION_HINT": precision_hint(dtype), "PERFORMANCE_HINT": "LATENCY"}
    if quantize != "int8-dynamic":
        # OpenVINO quantizes activations per token by default wherever weights are int8; that is
        # muselab's "int8-dynamic", so plain "int8" keeps float activations.
        options["DYNAMIC_QUANTIZATION_GROUP_SIZE"] = 0
    if quantize == "none":
        # The u8 KV cache is the runtime's default; unquantized weights keep float32 keys and values
        # too, so "none" matches PyTorch to float rounding.
        options["KV_CACHE_PRECISION"] = "f32"
    return options


def load_music_decoder(
    sampler: Any,
    quantize: str,
    dtype: torch.dtype,
    source: Path | None,
    cache_dir: Path | None,
    on_progress: ProgressCallback | None = None,
) -> tuple[OpenVinoMusicDecoder, dict[str, float]]:
    """The decoder step compiled by OpenVINO: read from the cache, or converted now (and cached when
    the model came from a folder). Returns it and the seconds spent converting and compiling."""
    import openvino as ov

    weights = "none" if quantize == "none" else "int8"  # int8 and int8-dynamic share the converted model
    folder = None
    if source is not None and cache_dir is not None:
        folder = cache_dir / f"musicgen-decoder-{cache_key(source, weights, dtype)}"
    timings = {"convert_s": 0.0, "compile_s": 0.0}
    started = time.perf_counter()
    if folder is not None and (folder / "model.xml").exists():
        model: Any = folder / "model.xml"
    else:
        where = f"cached in {cache_dir}" if folder is not None else "not cached: the model has no folder"
        say = ConversionProgress(4, on_progress)
        say(f"Converting the music decoder to OpenVINO (one time; {where})")
        model = convert_decoder(sampler, weights)
        say("Converted" if weights == "none" else "Converted, with int8 weights (NNCF)")
        if folder is not None:
            say("Saving the converted music decoder")
            save_atomically(model, folder)
        else:
            say.step += 1
        say("Compiling the music decoder", advance=False)
    timings["convert_s"] = time.perf_counter() - started
    started = time.perf_counter()
    compiled = ov.Core().compile_model(model, "CPU", compile_options(quantize, dtype))
    timings["compile_s"] = time.perf_counter() - started
    return OpenVinoMusicDecoder(compiled), timings


def drop_torch_decoder_weights(sampler: Any) -> None:
    """Free the PyTorch decoder weights the OpenVINO step replaced. Kept: each layer's cross-attention
    key and value projections, which run once per clip in `MusicgenSampler._encode_text`."""
    from muselab.quantize import return_freed_memory

    gone = torch.nn.Identity()
    for layer in sampler.decoder.layers:
        for name in ("self_attn", "self_attn_layer_norm", "encoder_attn_layer_norm", "fc1", "fc2", "final_layer_norm"):
            setattr(layer, name, gone)
        layer.encoder_attn.q_proj = gone
        layer.encoder_attn.out_proj = gone
    sampler.decoder.embed_tokens = torch.nn.ModuleList()
    sampler.lm_heads = torch.nn.ModuleList()
    sampler.network.decoder.lm_heads = sampler.lm_heads
    return_freed_memory()
