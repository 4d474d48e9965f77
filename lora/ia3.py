"""IA3: learned vectors that rescale activations (Liu et al. 2022, "Few-Shot Parameter-Efficient
Fine-Tuning is Better and Cheaper than In-Context Learning", arXiv:2205.05638)."""
from __future__ import annotations

import torch
import torch.nn as nn
from torch import Tensor

from lora.base import AdapterLayer
from lora.checks import check_finite, check_flag


class IA3Linear(AdapterLayer):
    """Output side (attention keys, values):  y = l ⊙ (W0 x + b),   l `ia3_l` (out, 1)
    Input side  (feed-forward, `feedforward`): y = W0 (l ⊙ x) + b,   l `ia3_l` (1, in)

    W0 (out, in), b (out,)   frozen base layer (nn.Linear, Conv1D, or an 8/4-bit Linear-like layer)
    l                        trainable, initialised to 1, so the layer starts as the base layer

    The paper's (IA)^3 rescales keys and values in attention and the inner activation of
    the feed-forward block: here the inner activation is the INPUT of the feed-forward
    output projection (PEFT's `feedforward_modules`, e.g. `down_proj`, `c_proj` of the MLP),
    and keys/values are the OUTPUTS of their projections. Shapes and the key `ia3_l` are
    PEFT's, so the files interoperate (lora/adapter_io.py).

    Merged: W = W0 ⊙ l^T (columns scaled) on the input side; W = l ⊙ W0 (rows) and
    b' = l ⊙ b on the output side. `unmerge()` restores the saved weight and bias bit for bit
    (PEFT divides by l, which is not exact). Only (out) or (in) numbers train per layer.
    """

    def __init__(self, base_layer: nn.Module, *, feedforward: bool = False, dtype: torch.dtype | None = None):
        check_flag(feedforward, f"{type(self).__name__}: feedforward")
        super().__init__(base_layer, dtype=dtype)                           # checks base, dtype; freezes
        self.feedforward = feedforward
        shape = (1, self.in_features) if feedforward else (self.out_features, 1)
        self.ia3_l = nn.Parameter(torch.ones(shape, **self._factory))
        self._original_bias: Tensor | None = None                          # set while merged

    def merged_weight(self) -> Tensor:
        W0 = self.frozen_weight()                                           # (out, in)
        return (W0.to(self.ia3_l.dtype) * self.ia3_l).to(W0.dtype)

    def get_delta_weight(self) -> Tensor:
        W0 = self.frozen_weight().to(self.ia3_l.dtype)
        return W0 * (self.ia3_l - 1)                                        # (out, in)

    def merged_bias(self) -> Tensor | None:
        bias = self._original_bias if self.merged else getattr(self.base_layer, "bias", None)
        if bias is None or self.feedforward:
            return bias
        return (bias.to(self.ia3_l.dtype) * self.ia3_l.flatten()).to(bias.dtype)

    def forward(self, x: Tensor) -> Tensor:
        if self.merged:
            return self.base_layer(x)
        l = self.ia3_l.flatten()
        if self.feedforward:
            return self.base_layer((x.to(l.dtype) * l).to(x.dtype))       # (..., in) rescaled
        out = self.base_layer(x)                                            # (..., out)
        return (out.to(l.dtype) * l).to(out.dtype)

    @torch.no_grad()
    def merge(self) -> None:
        """Write l into the base weight (and, output side, its bias); forward then runs the base alone."""
        if self.merged:
            return
        bias = getattr(self.base_layer, "bias", None)
        new_bias = None if bias is None or self.feedforward else self.merged_bias()
        if new_bias is not None:
            check_finite(new_bias, "IA3Linear.merge: the merged bias l ⊙ b")
        super().merge()                                                     # checks, then writes the weight
        if new_bias is not None:
            self._original_bias = bias.detach().clone()
            bias.copy_(new_bias)

    @torch.no_grad()
    def unmerge(self) -> None:
        if not self.merged:
            return
        if self._original_bias is not None:
            self.base_layer.bias.copy_(self._original_bias)
            self._original_bias = None
        super().unmerge()

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"feedforward={self.feedforward}, merged={self.merged}")
