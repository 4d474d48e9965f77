"""DoRA: weight-decomposed low-rank adaptation (Liu et al., "DoRA: Weight-Decomposed Low-Rank
Adaptation", ICML 2024, arXiv:2402.09353)."""
from __future__ import annotations

import torch
import torch.nn as nn
from torch import Tensor

from lora.base import LowRankAdapter, work_dtype


class DoRALinear(LowRankAdapter):
    """W' = m ⊙ (W0 + s B A) / ||W0 + s B A||,   y = W' x + b   (norms and m per output row)

    W0 (out, in), b   frozen base weight (dequantized for an 8/4-bit base) and bias
    A (r, in)         `lora_A`, kaiming-uniform(a=sqrt 5);  B (out, r) `lora_B`, zeros
    m (out,)          `lora_magnitude`, trainable, initialised to the row norms ||W0||,
                      so W' = W0 at init
    s                 `scaling` = alpha / r

    The norm ||W0 + s B A|| is treated as a constant in backward (detached), as the
    paper does to save memory (section 4.3). With c = m / ||V|| (out,), forward is
        y = base(x) + (c - 1) ⊙ (W0 x) + c ⊙ s B A dropout(x),    W0 x = base(x) - b,
    and ||V||^2 = ||W0||^2 + 2 s rowsum(B ⊙ (W0 A^T)) + s^2 rowsum((B A A^T) ⊙ B),
    which needs only (out, r) and (r, r) products: delta W (out, in) is never formed.
    """

    def __init__(self, base_layer: nn.Module, *, rank: int = 8, alpha: float = 16, dropout: float = 0.0,
                 use_rslora: bool = False, dtype=None):
        super().__init__(base_layer, rank=rank, alpha=alpha, dropout=dropout, use_rslora=use_rslora,
                         dtype=dtype)
        with torch.no_grad():
            W0 = self.frozen_weight().to(self.lora_A.dtype)
            norms = W0.float().norm(dim=1).to(W0.dtype)                     # (out,)
        self.lora_magnitude = nn.Parameter(norms)

    @torch.no_grad()
    def weight_norm(self) -> Tensor:
        """||W0 + s B A|| per output row (out,), detached, in float32 (float64 for a float64
        adapter), without forming B A."""
        work = work_dtype(self.lora_A)
        A, B, s = self.lora_A.to(work), self.lora_B.to(work), self.scaling
        W0 = self.frozen_weight().to(work)                                  # (out, in)
        sq = W0.square().sum(dim=1)                                         # ||W0_i||^2
        sq += 2 * s * (B * (W0 @ A.t())).sum(dim=1)                         # 2 s <W0_i, (BA)_i>
        sq += s * s * ((B @ (A @ A.t())) * B).sum(dim=1)                    # s^2 ||(BA)_i||^2
        return sq.clamp_min(0).sqrt()

    def _column_scale(self) -> Tensor:
        """c = m / ||V|| (out,), gradient through m only."""
        return self.lora_magnitude / self.weight_norm().to(self.lora_magnitude.dtype)

    def merged_weight(self) -> Tensor:
        W0 = self.frozen_weight()
        A = self.lora_A
        V = W0.to(A.dtype) + (self.lora_B @ A) * self.scaling              # (out, in)
        W = self._column_scale()[:, None] * V
        return W.to(W0.dtype)

    def get_delta_weight(self) -> Tensor:
        W0 = self.frozen_weight()
        return self.merged_weight().to(self.lora_A.dtype) - W0.to(self.lora_A.dtype)

    def forward(self, x: Tensor) -> Tensor:
        out = self.base_layer(x)                                            # (..., out)
        if self.merged:
            return out
        A, B = self.lora_A, self.lora_B
        bias = getattr(self.base_layer, "bias", None)
        w0x = out if bias is None else out - bias                           # (..., out) = W0 x
        c = self._column_scale()                                            # (out,)
        xd = self.lora_dropout(x) if self.dropout_p > 0.0 else x
        lora = (xd.to(A.dtype) @ A.t()).mul_(self.scaling) @ B.t()          # (..., out) = s B A x
        delta = (c - 1) * w0x.to(A.dtype) + c * lora
        return out + delta.to(out.dtype)
