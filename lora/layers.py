"""LoRA: a frozen Linear plus a trainable low-rank update (Hu et al. 2021, arXiv:2106.09685)."""
from __future__ import annotations

import torch
import torch.nn as nn
from torch import Tensor

from lora.base import LowRankAdapter, check_rank, lora_scaling

LORA_INITS = ("kaiming", "gaussian", "pissa")


class LoRALinear(LowRankAdapter):
    """y = W0 x + b + s * B A dropout(x)

    W0 (out, in), b (out,)  frozen base layer (nn.Linear, or an 8/4-bit Linear-like layer)
    A  (r, in)              `lora_A`, kaiming-uniform(a=sqrt 5)   (init="kaiming", default)
                            or N(0, (1/r)^2) as PEFT              (init="gaussian")
    B  (out, r)             `lora_B`, zeros, so the layer starts as the base layer
    s                       `scaling` = alpha / r, or alpha / sqrt(r) with use_rslora (rsLoRA)

    init="pissa" (PiSSA, Meng et al. 2024, arXiv:2404.02948): with W0 = U S V^T,
    s B A = U_r S_r V_r^T (the top-r singular directions, B = U_r sqrt(S_r/s),
    A = sqrt(S_r/s) V_r^T) and the residual W0 - s B A is written into the base,
    so the output is unchanged at init. Needs an nn.Linear base.

    Built around a base layer, `LoRALinear(nn.Linear(768, 768), rank=8)`, or from
    scratch, `LoRALinear(768, 768, rank=8, alpha=16, pretrained_weight=W, bias=b)`.
    """

    def __init__(self, base_layer: nn.Module | int, out_features: int | None = None, *,
                 rank: int = 8, alpha: float = 16, dropout: float = 0.0, use_rslora: bool = False,
                 init: str = "kaiming", pretrained_weight: Tensor | None = None, bias: Tensor | None = None,
                 dtype: torch.dtype | None = None):
        if isinstance(base_layer, int) and not isinstance(base_layer, bool):
            base_layer = _linear_from_weights(base_layer, out_features, pretrained_weight, bias)
        elif out_features is not None or pretrained_weight is not None or bias is not None:
            raise TypeError("LoRALinear: give either a base layer, or in_features, out_features "
                            "(with optional pretrained_weight=, bias=), not both")
        if init not in LORA_INITS:
            raise ValueError(f"LoRALinear: init must be one of {LORA_INITS}, got {init!r}")
        check_rank(rank, "LoRALinear")
        if init == "pissa" and not isinstance(base_layer, nn.Linear):
            raise TypeError(f"LoRALinear: init='pissa' rewrites the base weight, so it needs an nn.Linear "
                            f"base, got {type(base_layer).__name__}")
        super().__init__(base_layer, rank=rank, alpha=alpha, dropout=dropout, use_rslora=use_rslora,
                         dtype=dtype)
        self.init = init
        # Plain nn.Linear base: its backward never reads its output, so the delta may be added in place.
        self._inplace_ok = type(self.base_layer) is nn.Linear
        if init == "gaussian":
            with torch.no_grad():
                nn.init.normal_(self.lora_A, std=1.0 / rank)
        elif init == "pissa":
            self._pissa_init()

    @torch.no_grad()
    def _pissa_init(self) -> None:
        W = self.base_layer.weight                                          # (out, in)
        r = self.rank
        if r > min(W.shape):
            raise ValueError(f"LoRALinear: init='pissa' needs rank <= min(out, in) = {min(W.shape)}, got {r}")
        U, S, Vh = torch.linalg.svd(W.float(), full_matrices=False)
        root = (S[:r] / self.scaling).sqrt()                                # s * B A = U_r S_r V_r^T
        self.lora_B.copy_(U[:, :r] * root)                                  # (out, r)
        self.lora_A.copy_(root[:, None] * Vh[:r])                           # (r, in)
        W.copy_(W.float() - self.get_delta_weight().float())

    def get_delta_weight(self) -> Tensor:
        return (self.lora_B @ self.lora_A) * self.scaling                  # (out, in)

    def forward(self, x: Tensor) -> Tensor:
        out = self.base_layer(x)                                            # (..., out)
        if self.merged:
            return out
        A, B = self.lora_A, self.lora_B
        if self.dropout_p > 0.0:
            x = self.lora_dropout(x)
        if x.dtype != A.dtype:
            x = x.to(A.dtype)
        # Two thin matmuls, with s folded into the small (N, r) intermediate: never (out, in).
        delta = (x @ A.t()).mul_(self.scaling) @ B.t()                      # (..., r) -> (..., out)
        if delta.dtype != out.dtype:
            delta = delta.to(out.dtype)
        if self._inplace_ok and not torch.is_grad_enabled() or self._inplace_ok and out.shape == delta.shape:
            return out.add_(delta)
        return out + delta


def _linear_from_weights(in_features: int, out_features: int | None, weight: Tensor | None,
                         bias: Tensor | None) -> nn.Linear:
    """An nn.Linear holding the given (out, in) weight and (out,) bias (bias=None: no bias)."""
    if out_features is None:
        raise TypeError("LoRALinear(in_features, out_features, ...): out_features is missing")
    ref = weight if weight is not None else bias
    kwargs = {"device": ref.device, "dtype": ref.dtype} if ref is not None else {}
    linear = nn.Linear(in_features, out_features, bias=bias is not None, **kwargs)
    with torch.no_grad():
        if weight is not None:
            if tuple(weight.shape) != (out_features, in_features):
                raise ValueError(f"LoRALinear: pretrained_weight must be (out_features, in_features) = "
                                 f"({out_features}, {in_features}), got {tuple(weight.shape)}")
            linear.weight.copy_(weight)
        if bias is not None:
            if tuple(bias.shape) != (out_features,):
                raise ValueError(f"LoRALinear: bias must be ({out_features},), got {tuple(bias.shape)}")
            linear.bias.copy_(bias)
    return linear
