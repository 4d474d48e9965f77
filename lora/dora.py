"""DoRA: weight-decomposed low-rank adaptation (Liu et al., "DoRA: Weight-Decomposed Low-Rank
Adaptation", ICML 2024, arXiv:2402.09353)."""
from __future__ import annotations

import torch
import torch.nn as nn
from torch import Tensor

from lora.base import LowRankAdapter
from lora.checks import check_base, check_dtype, check_finite
from lora.layout import base_weight
from lora.low_rank import work_dtype


@torch.no_grad()
def magnitude_init(base_layer: nn.Module, dtype: torch.dtype, who: str = "DoRALinear") -> Tensor:
    """m = ||W0|| per output row (out,), in `dtype`. Refuses a W0 with NaN or inf entries and
    a zero row: its direction W0_i / ||W0_i|| is 0 / 0, so the layer would output NaN."""
    W0 = base_weight(base_layer).to(dtype)                                  # (out, in)
    check_finite(W0, f"{who}: the base weight W0 (in {dtype}; DoRA's magnitude is its row norms)")
    norms = W0.float().norm(dim=1).to(dtype)                                # (out,)
    check_finite(norms, f"{who}: the row norms of W0 in {dtype} (DoRA's magnitude)")
    zero = (norms == 0).nonzero().flatten()
    if zero.numel():
        raise ValueError(f"{who}: W0 has {zero.numel()} all-zero rows (first: row {int(zero[0])}); DoRA "
                         f"divides each row by its norm, so such a row has no direction")
    return norms


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
        name = type(self).__name__
        self.check_arguments(name, rank, alpha, dropout, use_rslora)
        check_base(base_layer, name)
        check_dtype(dtype, name)
        norms = magnitude_init(base_layer, self._factory_kwargs(base_layer, dtype)["dtype"], name)
        super().__init__(base_layer, rank=rank, alpha=alpha, dropout=dropout, use_rslora=use_rslora,
                         dtype=dtype)
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
