"""Weight-only int8: close to the float layer on both multiply paths, a quarter of the bytes."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from muselab.quantize import SMALL_BATCH_ROWS, Int8Linear, int8_kernel_dtype, parameter_bytes, quantize_linears


def relative_error(reference: torch.Tensor, other: torch.Tensor) -> float:
    return float((reference - other).norm() / reference.norm())


@pytest.mark.parametrize(
    ("rows", "in_features"),
    [
        (2, 64),  # a token at a time: the int8 kernel
        (SMALL_BATCH_ROWS + 1, 64),  # many rows: dequantize, then the float matmul
        (2, 37),  # a width the kernel cannot take: dequantize
    ],
)
def test_int8_linear_stays_close_to_the_float_layer(rows, in_features):
    torch.manual_seed(0)
    linear = nn.Linear(in_features, 48)
    x = torch.randn(rows, in_features)
    quantized = Int8Linear.from_linear(linear)
    with torch.inference_mode():
        reference, ours = linear(x), quantized(x)
    assert ours.shape == reference.shape and ours.dtype == reference.dtype
    assert 0 < relative_error(reference, ours) < 0.02
    # Keeps the batch dimensions of its input.
    assert quantized(torch.randn(3, 5, in_features)).shape == (3, 5, 48)


def test_each_output_channel_has_its_own_scale():
    linear = nn.Linear(32, 2, bias=False)
    with torch.no_grad():
        linear.weight[0] = torch.linspace(-1, 1, 32)
        linear.weight[1] = torch.linspace(-1e-3, 1e-3, 32)  # tiny channel: must not round to zero
    quantized = Int8Linear.from_linear(linear)
    assert quantized.weight.dtype == torch.int8
    assert quantized.weight[1].abs().max() == 127
    out = quantized(torch.ones(1, 32))
    assert torch.allclose(out, linear(torch.ones(1, 32)), atol=1e-4)


def test_quantize_linears_replaces_every_layer_but_skipped_ones_and_quarters_the_bytes():
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Sequential(nn.Linear(64, 64), nn.Linear(64, 64)))
    before = parameter_bytes(model)
    x = torch.randn(4, 64)
    reference = model(x)
    assert quantize_linears(model, skip=("2.1",)) == 2
    kinds = [type(m).__name__ for m in (model[0], model[2][0], model[2][1])]
    assert kinds == ["Int8Linear", "Int8Linear", "Linear"]
    assert relative_error(reference, model(x)) < 0.02
    all_int8 = nn.Sequential(nn.Linear(256, 256, bias=False), nn.Linear(256, 256, bias=False))
    full = parameter_bytes(all_int8)
    quantize_linears(all_int8)
    assert parameter_bytes(all_int8) < 0.26 * full
    assert parameter_bytes(model) < before


def test_the_kernel_dtype_is_measured_and_is_a_float_dtype():
    assert int8_kernel_dtype("cpu", torch.float32) in (torch.float32, torch.bfloat16)
    assert int8_kernel_dtype("cpu", torch.bfloat16) == torch.bfloat16


def test_int8_convolutions_stay_close_and_keep_their_geometry():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(8, 16, 3, padding=1), nn.SiLU(), nn.Conv2d(16, 8, 3, stride=2, padding=1))
    x = torch.randn(2, 8, 16, 16)
    reference = model(x)
    assert quantize_linears(model) == 0  # convolutions only when asked
    assert quantize_linears(model, convolutions=True) == 2
    assert type(model[0]).__name__ == "Int8Conv2d" and model[0].weight.dtype == torch.int8
    with torch.inference_mode():
        ours = model(x)
    assert ours.shape == reference.shape == (2, 8, 8, 8)
    assert 0 < relative_error(reference, ours) < 0.02
