"""The base layer as adapters see it: which layers can be wrapped, and W0 as (out, in).

An adapter's base may be an `nn.Linear`, a quantized Linear-like layer (anything with
`in_features`, `out_features` and `dequantize()`) or a transformers `Conv1D` (Hugging
Face GPT-2's projections: y = x W + b with W stored (in, out)); the adapter only
calls `base_layer(x)` and, when it needs W0, `base_weight(base_layer)`.

Weight layout, in one place: every adapter works with W0 as (out, in), whatever the
base stores. `weight_layout(base)` tells "out_in" (nn.Linear, dequantize()) from
"in_out" (Conv1D, PEFT's `fan_in_fan_out=True`), and `base_weight` returns, for the
latter, the transposed VIEW `weight.t()`: no copy, and an in-place write into it
(merge, unmerge, PiSSA's residual) lands in the base's own (in, out) storage. The
factors keep their shapes, `lora_A` (r, in) and `lora_B` (out, r), as in PEFT.
"""
from __future__ import annotations

import torch
import torch.nn as nn
from torch import Tensor


def is_conv1d(module: nn.Module) -> bool:
    """A transformers-style `Conv1D` (GPT-2): int `nx` (in) and `nf` (out) and a weight (nx, nf).

    Duck typing, so lora never imports transformers (quantization.layers has the same rule)."""
    nx, nf, weight = getattr(module, "nx", None), getattr(module, "nf", None), getattr(module, "weight", None)
    return (not isinstance(module, nn.Linear) and isinstance(nx, int) and isinstance(nf, int)
            and isinstance(weight, Tensor) and tuple(weight.shape) == (nx, nf))


def is_linear_like(module: nn.Module) -> bool:
    """An `nn.Linear`, a Conv1D (see `is_conv1d`), or a quantized stand-in
    (in_features, out_features, dequantize())."""
    if isinstance(module, nn.Linear) or is_conv1d(module):
        return True
    return (hasattr(module, "in_features") and hasattr(module, "out_features")
            and callable(getattr(module, "dequantize", None)))


def is_quantized(module: nn.Module) -> bool:
    return not isinstance(module, nn.Linear) and callable(getattr(module, "dequantize", None))


def weight_layout(base: nn.Module) -> str:
    """"in_out" for a Conv1D (weight stored (in, out), PEFT's fan_in_fan_out), else "out_in"."""
    return "in_out" if is_conv1d(base) else "out_in"


def in_out_features(base: nn.Module) -> tuple[int, int]:
    """(in_features, out_features) of a Linear-like base (a Conv1D's nx, nf)."""
    if is_conv1d(base):
        return int(base.nx), int(base.nf)
    return int(base.in_features), int(base.out_features)


def base_weight(base: nn.Module) -> Tensor:
    """The (out, in) weight of a base layer: `base.dequantize()` for quantized layers, a
    Conv1D's `weight.t()` (a view of its (in, out) storage, no copy), else `base.weight`."""
    if is_quantized(base):
        return base.dequantize()
    weight = getattr(base, "weight", None)
    if not isinstance(weight, Tensor):
        raise TypeError(f"base_weight: expected an nn.Linear, a Conv1D or a layer with dequantize(), "
                        f"got {type(base).__name__} without a weight tensor")
    return weight.t() if weight_layout(base) == "in_out" else weight


def module_device(module: nn.Module) -> torch.device:
    """Where a module lives: its first parameter's device, else its first buffer's (a fully
    quantized model can hold only buffers), else the CPU for a module with no tensors."""
    for tensor in module.parameters():
        return tensor.device
    for tensor in module.buffers():
        return tensor.device
    return torch.device("cpu")
