"""HiRA: a Hadamard high-rank update (Huang et al., "HiRA: Parameter-Efficient Hadamard High-Rank
Adaptation for Large Language Models", ICLR 2025)."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from lora.base import LowRankAdapter
from lora.checks import check_base, check_finite
from lora.layout import base_weight


class HiRALinear(LowRankAdapter):
    """y = W0 x + b + (s W0 ⊙ (B A)) dropout(x)

    W0 (out, in), b   frozen base weight (dequantized for an 8/4-bit base) and bias
    A (r, in)         `lora_A`, kaiming-uniform(a=sqrt 5)
    B (out, r)        `lora_B`, zeros, so delta W = 0 at init
    s                 `scaling` = alpha / r (alpha / sqrt r with use_rslora)

    delta W = s W0 ⊙ (B A): the Hadamard product with the full-rank W0 lets
    rank(delta W) reach rank(W0) * r while training only r (in + out) numbers.
    The update needs W0 entry by entry, so forward forms delta W (out, in) once
    per call (in the adapter's dtype) and applies it with one matmul.
    merge() adds delta W and unmerge() puts back the saved original weight, so
    the base is restored bit-for-bit (no division by 1 + s B A, which is not exact).
    """

    def __init__(self, base_layer: nn.Module, *, rank: int = 8, alpha: float = 16, dropout: float = 0.0,
                 use_rslora: bool = False, dtype=None):
        name = type(self).__name__
        self.check_arguments(name, rank, alpha, dropout, use_rslora)
        check_base(base_layer, name)
        with torch.no_grad():  # inf in W0 would give inf * 0 = NaN in delta W even at B = 0
            check_finite(base_weight(base_layer), f"{name}: the base weight W0 (HiRA's update is s W0 ⊙ (B A))")
        super().__init__(base_layer, rank=rank, alpha=alpha, dropout=dropout, use_rslora=use_rslora,
                         dtype=dtype)

    def get_delta_weight(self) -> Tensor:
        A, B = self.lora_A, self.lora_B
        W0 = self.frozen_weight().to(A.dtype)                               # (out, in)
        return W0 * (B @ A) * self.scaling                                  # (out, in)

    def forward(self, x: Tensor) -> Tensor:
        out = self.base_layer(x)                                            # (..., out)
        if self.merged:
            return out
        if self.dropout_p > 0.0:
            x = self.lora_dropout(x)
        delta_w = self.get_delta_weight()                                   # (out, in)
        delta = F.linear(x.to(delta_w.dtype), delta_w)                      # (..., out)
        return out + delta.to(out.dtype)
