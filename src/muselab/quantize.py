"""Weight-only int8: a quarter of float32's memory for every linear layer, close to the same output.

Each output channel of a weight matrix gets its own scale (absmax / 127), so a channel with small
weights keeps its precision. Two ways to multiply, chosen per call by the number of rows:

- few rows on a CPU (a token at a time: MusicGen's decoder) go through
  `torch._weight_int8pack_mm`, PyTorch's CPU kernel that reads the int8 weights directly. That
  step is bound by memory traffic, so reading a quarter of the bytes is where the speed comes from.
- many rows (a UNet layer sees 8192 at 512x512), and GPUs, dequantize the weight for that call and use the
  ordinary matmul: the work is then in the multiply, which int8 storage cannot make cheaper, and
  the dequantized copy of one layer is small next to the activations.

This is PyTorch's own kernel rather than torchao or optimum-quanto: on these CPUs torchao's eager
int8 weight-only path dequantizes every call (it is fast only under torch.compile), and the kernel
here needs no extra dependency. The int8 kernel is fast with bfloat16 activations and slow with
float32 ones on some CPUs, so the activation dtype for it is measured once (`int8_kernel_dtype`).
"""

from __future__ import annotations

import functools
import time
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

#: Up to this many rows per call, the int8 kernel; above it, dequantize and use the float matmul.
#: The kernel also needs the input width to be a multiple of 16 (other widths crash the process).
SMALL_BATCH_ROWS = 64


class Int8Linear(nn.Module):
    """A drop-in `nn.Linear` with int8 weights and one float scale per output channel.

    `dynamic=True` ("int8-dynamic") also quantizes the *activations* of small batches, per call,
    and multiplies int8 by int8 with fbgemm (x86, VNNI where the CPU has it): about twice the speed
    of the weight-only kernel for MusicGen's tokens, at a little more error. Large batches are the
    same in both modes.
    """

    def __init__(self, weight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None, dynamic: bool = False):
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.register_buffer("weight", weight, persistent=True)
        self.register_buffer("scale", scale, persistent=True)
        self.bias = nn.Parameter(bias, requires_grad=False) if bias is not None else None
        self.dynamic = dynamic and fbgemm_available()
        self._cast: dict[torch.dtype, tuple[torch.Tensor, torch.Tensor | None]] = {}
        self._packed: Any = None

    @classmethod
    def from_linear(cls, linear: nn.Linear, dynamic: bool = False) -> Int8Linear:
        weight = linear.weight.detach().float()
        scale = weight.abs().amax(dim=1).clamp(min=1e-12) / 127.0
        quantized = torch.round(weight / scale[:, None]).clamp(-127, 127).to(torch.int8)
        bias = linear.bias.detach() if linear.bias is not None else None
        return cls(quantized, scale.to(linear.weight.dtype), bias, dynamic=dynamic)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        rows = x.reshape(-1, self.in_features)
        small = rows.shape[0] <= SMALL_BATCH_ROWS and x.device.type == "cpu"
        if small and self.dynamic:
            out = torch.ops.quantized.linear_dynamic(rows.float(), self._packed_weight(), _REDUCE_RANGE)
            out = out.to(x.dtype)
        elif small and self.in_features % 16 == 0:
            kernel_dtype = int8_kernel_dtype(x.device.type, x.dtype)
            scale, bias = self._cast_to(kernel_dtype)
            out = torch._weight_int8pack_mm(rows.to(kernel_dtype).contiguous(), self.weight, scale)
            if bias is not None:
                out = out + bias
            out = out.to(x.dtype)
        else:
            scale, bias = self._cast_to(x.dtype)
            weight = self.weight.to(x.dtype).mul_(scale[:, None])
            out = nn.functional.linear(rows, weight, bias)
        return out.reshape(*shape[:-1], self.out_features)

    def _cast_to(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Scale and bias in `dtype`, converted once rather than at every token."""
        cached = self._cast.get(dtype)
        if cached is None or cached[0].device != self.scale.device:
            bias = self.bias.detach().to(dtype) if self.bias is not None else None
            cached = self._cast[dtype] = (self.scale.to(dtype), bias)
        return cached

    def _apply(self, fn: Any, recurse: bool = True) -> Any:
        self._cast, self._packed = {}, None  # .to() and friends: re-derive the cached copies
        return super()._apply(fn, recurse)

    def _packed_weight(self) -> Any:
        """fbgemm's packed int8 weight (its own copy, in its own layout), made on first use."""
        if self._packed is None:
            zero_points = torch.zeros(self.out_features, dtype=torch.long)
            quantized = torch._make_per_channel_quantized_tensor(self.weight, self.scale.double(), zero_points, 0)
            bias = self.bias.detach().float() if self.bias is not None else None
            self._packed = torch.ops.quantized.linear_prepack(quantized, bias)
        return self._packed

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8 weights"


class Int8Conv2d(nn.Module):
    """A drop-in `nn.Conv2d` with int8 weights (one scale per output channel), dequantized for
    each call: a UNet's convolutions hold over half its weights, and their work is in the multiply
    (thousands of pixels per weight), so one layer's float copy per call costs little time."""

    def __init__(self, conv: nn.Conv2d):
        super().__init__()
        weight = conv.weight.detach().float()
        scale = weight.flatten(1).abs().amax(dim=1).clamp(min=1e-12) / 127.0
        quantized = torch.round(weight / scale[:, None, None, None]).clamp(-127, 127).to(torch.int8)
        self.register_buffer("weight", quantized, persistent=True)
        self.register_buffer("scale", scale.to(conv.weight.dtype), persistent=True)
        self.bias = nn.Parameter(conv.bias.detach(), requires_grad=False) if conv.bias is not None else None
        self.in_channels, self.out_channels = conv.in_channels, conv.out_channels
        self.kernel_size, self.stride, self.padding = conv.kernel_size, conv.stride, conv.padding
        self.dilation, self.groups, self.padding_mode = conv.dilation, conv.groups, conv.padding_mode
        if conv.padding_mode != "zeros":
            raise ValueError("Int8Conv2d handles zero padding only")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.weight.to(x.dtype).mul_(self.scale.to(x.dtype)[:, None, None, None])
        bias = self.bias.to(x.dtype) if self.bias is not None else None
        return nn.functional.conv2d(x, weight, bias, self.stride, self.padding, self.dilation, self.groups)

    def extra_repr(self) -> str:
        return f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, int8 weights"


def quantize_linears(
    module: nn.Module, skip: Iterable[str] = (), convolutions: bool = False, dynamic: bool = False
) -> int:
    """Replace every `nn.Linear` (and with `convolutions`, every zero-padded `nn.Conv2d`) inside
    `module`, except names containing a `skip` part, with its int8 version, one layer at a time so
    that the float copy of only one layer is alive at once. Returns the number of layers replaced."""
    skip = tuple(skip)

    def wanted(name: str, child: nn.Module) -> bool:
        if any(part in name for part in skip):
            return False
        if isinstance(child, nn.Linear):
            return True
        return convolutions and isinstance(child, nn.Conv2d) and child.padding_mode == "zeros"

    names = [name for name, child in module.named_modules() if name and wanted(name, child)]
    for name in names:
        parent_name, _, attribute = name.rpartition(".")
        parent = module.get_submodule(parent_name) if parent_name else module
        layer = getattr(parent, attribute)
        if isinstance(layer, nn.Linear):
            setattr(parent, attribute, Int8Linear.from_linear(layer, dynamic=dynamic))
        else:
            setattr(parent, attribute, Int8Conv2d(layer))
    return_freed_memory()
    return len(names)


def return_freed_memory() -> None:
    """Hand memory freed by Python and PyTorch back to the operating system.

    glibc keeps freed heap memory for reuse, so after quantizing (the float weights freed layer by
    layer) the process would stay as large as before; `malloc_trim` releases it. Linux only; a
    no-op elsewhere."""
    import contextlib
    import ctypes
    import gc

    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def parameter_bytes(module: nn.Module) -> int:
    """Bytes held by a module's parameters and buffers (what its weights cost in memory)."""
    tensors = [*module.parameters(), *module.buffers()]
    return sum(t.numel() * t.element_size() for t in tensors)


@functools.cache
def fbgemm_available() -> bool:
    return "fbgemm" in torch.backends.quantized.supported_engines


def _cpu_has_vnni() -> bool:
    from muselab.devices import cpu_flags

    return bool({"avx512_vnni", "avx_vnni"} & cpu_flags())


#: Without VNNI, fbgemm's int8 products can overflow unless activations use 7 bits.
_REDUCE_RANGE = not _cpu_has_vnni()


@functools.cache
def int8_kernel_dtype(device: str, activation_dtype: torch.dtype) -> torch.dtype:
    """The activation dtype to run `_weight_int8pack_mm` in: the faster of bfloat16 and the model's.

    On CPUs the kernel's float32 path can be ten times slower than its bfloat16 path, and on
    others the reverse; a 4096x1024 product timed both ways (a few milliseconds) settles it.
    """
    if device != "cpu" or activation_dtype == torch.bfloat16:
        return activation_dtype
    weight = torch.randint(-127, 127, (4096, 1024), dtype=torch.int8)
    timings = {}
    for dtype in (activation_dtype, torch.bfloat16):
        x = torch.randn(2, 1024).to(dtype)
        scale = torch.rand(4096).to(dtype)
        torch._weight_int8pack_mm(x, weight, scale)
        started = time.perf_counter()
        for _ in range(5):
            torch._weight_int8pack_mm(x, weight, scale)
        timings[dtype] = time.perf_counter() - started
    return min(timings, key=timings.__getitem__)
