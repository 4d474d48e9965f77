"""Argument checks shared by the adapter layers and configs.

Each names who asks, the argument, what is expected and what was given, and runs
before anything is changed (STYLE.md rule 13: validate, then mutate).
"""
from __future__ import annotations

import math
import numbers

import torch
import torch.nn as nn
from torch import Tensor

from lora.layout import is_linear_like


def check_rank(rank, who: str = "adapter") -> int:
    if isinstance(rank, bool) or not isinstance(rank, int) or rank <= 0:
        raise ValueError(f"{who}: rank must be a positive int, got {rank!r}")
    return rank


def check_alpha(alpha, what: str):
    """`what` ("LoRALinear: alpha", "LoraConfig.lora_alpha") must be a finite number > 0."""
    if isinstance(alpha, bool) or not isinstance(alpha, numbers.Real) or not math.isfinite(alpha) or alpha <= 0:
        raise ValueError(f"{what} must be a finite number > 0, got {alpha!r}")
    return alpha


def check_dropout(p, what: str) -> float:
    if isinstance(p, bool) or not isinstance(p, numbers.Real) or not 0.0 <= float(p) < 1.0:
        raise ValueError(f"{what} must be in [0, 1), got {p!r}")
    return float(p)


def check_flag(value, what: str) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{what} must be True or False, got {value!r}")
    return value


def check_dtype(dtype, who: str) -> None:
    if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise TypeError(f"{who}: dtype must be None or a floating-point torch.dtype, got {dtype!r}")


def check_finite(t: Tensor, what: str) -> None:
    """Refuse a tensor holding NaN or +-inf, naming it, how many and the first position."""
    bad = ~torch.isfinite(t.detach())
    if bad.any():
        first = tuple(int(i) for i in bad.nonzero()[0])
        raise ValueError(f"{what} has {int(bad.sum())} non-finite entries of {t.numel()} "
                         f"(first at index {first}: {t[first].item()})")


def check_base(base_layer, who: str) -> None:
    if not isinstance(base_layer, nn.Module) or not is_linear_like(base_layer):
        raise TypeError(f"{who}: base_layer must be an nn.Linear, a Conv1D (nx, nf, weight (nx, nf)) or a "
                        f"Linear-like quantized layer (in_features, out_features, dequantize()), "
                        f"got {type(base_layer).__name__}")
