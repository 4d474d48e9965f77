"""LoRA: a frozen Linear plus a trainable low-rank update (Hu et al. 2021, arXiv:2106.09685)."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from lora.base import LowRankAdapter
from lora.checks import check_base, check_finite
from lora.layout import base_weight, is_quantized
from lora.low_rank import lora_scaling

LORA_INITS = ("kaiming", "gaussian", "pissa")


class LoRALinear(LowRankAdapter):
    """y = W0 x + b + s * B A dropout(x)

    W0 (out, in), b (out,)  frozen base layer (nn.Linear, a Conv1D seen through its transposed
                            weight, or an 8/4-bit Linear-like layer; see lora.base)
    A  (r, in)              `lora_A`, kaiming-uniform(a=sqrt 5)   (init="kaiming", default)
                            or N(0, (1/r)^2) as PEFT              (init="gaussian")
    B  (out, r)             `lora_B`, zeros, so the layer starts as the base layer
    s                       `scaling` = alpha / r, or alpha / sqrt(r) with use_rslora (rsLoRA)

    init="pissa" (PiSSA, Meng et al. 2024, arXiv:2404.02948): with W0 = U S V^T,
    s B A = U_r S_r V_r^T (the top-r singular directions, B = U_r sqrt(S_r/s),
    A = sqrt(S_r/s) V_r^T) and the residual W0 - s B A is written into the base,
    so the output is unchanged at init. Needs a float base (nn.Linear or Conv1D).

    Built around a base layer, `LoRALinear(nn.Linear(768, 768), rank=8)`, or from
    scratch, `LoRALinear(768, 768, rank=8, alpha=16, pretrained_weight=W, bias=b)`
    (also `LoRALinear(in_features=768, out_features=768, ...)`).

    Speed: the textbook forward, base(x) + s (x A^T) B^T, costs the base matmul plus
    a full-size add (and a second input gradient to sum in backward). For a plain
    frozen nn.Linear and no dropout, forward instead runs F.linear(x, W0 + s B A, b)
    when there are at least `in_features` rows (`_FusedLoRA`: one big matmul each
    way), and with fewer rows the thin products added into the base matmul's output
    by the matmul itself (`_ThinLoRA`), so training costs barely more than the
    frozen layer alone.
    """

    def __init__(self, base_layer: nn.Module | int | None = None, out_features: int | None = None, *,
                 in_features: int | None = None, rank: int = 8, alpha: float = 16, dropout: float = 0.0,
                 use_rslora: bool = False, init: str = "kaiming", pretrained_weight: Tensor | None = None,
                 bias: Tensor | None = None, dtype: torch.dtype | None = None):
        if in_features is not None:       # the keyword form, LoRALinear(in_features=..., out_features=...)
            if base_layer is not None:
                raise TypeError("LoRALinear: give either a base layer or in_features=, not both")
            base_layer = in_features
        if isinstance(base_layer, int) and not isinstance(base_layer, bool):
            base_layer = _linear_from_weights(base_layer, out_features, pretrained_weight, bias)
        elif base_layer is None:
            raise TypeError("LoRALinear: give a base layer, or in_features and out_features "
                            "(with optional pretrained_weight=, bias=)")
        elif out_features is not None or pretrained_weight is not None or bias is not None:
            raise TypeError("LoRALinear: give either a base layer, or in_features, out_features "
                            "(with optional pretrained_weight=, bias=), not both")
        name = type(self).__name__
        if init not in LORA_INITS:
            raise ValueError(f"{name}: init must be one of {LORA_INITS}, got {init!r}")
        self.check_arguments(name, rank, alpha, dropout, use_rslora)
        pissa = None
        if init == "pissa":   # the SVD of W0 is taken before anything changes
            check_base(base_layer, name)
            if is_quantized(base_layer):
                raise TypeError(f"{name}: init='pissa' rewrites the base weight, so it needs an nn.Linear "
                                f"base or a Conv1D (a float weight), got {type(base_layer).__name__}")
            pissa = pissa_factors(base_weight(base_layer), rank, lora_scaling(alpha, rank, use_rslora), name)
        super().__init__(base_layer, rank=rank, alpha=alpha, dropout=dropout, use_rslora=use_rslora,
                         dtype=dtype)
        self.init = init
        # A plain nn.Linear base (not a subclass with its own forward) allows the fused path.
        self._plain_linear = type(self.base_layer) is nn.Linear
        if init == "gaussian":
            with torch.no_grad():
                nn.init.normal_(self.lora_A, std=1.0 / rank)
        elif init == "pissa":
            self._pissa_init(*pissa)

    @torch.no_grad()
    def _pissa_init(self, A: Tensor, B: Tensor) -> None:
        """Set the factors to PiSSA's and write the residual W0 - s B A into the base (last step)."""
        self.lora_A.copy_(A)                                                # (r, in)
        self.lora_B.copy_(B)                                                # (out, r)
        W = base_weight(self.base_layer)                                    # (out, in), a view for Conv1D
        residual = W.float() - ((self.lora_B @ self.lora_A) * self.scaling).float()   # (masks not yet built)
        W.copy_(residual)

    def _factors(self) -> tuple[Tensor, Tensor]:
        """The (A, B) the layer computes with (SparseLoRALinear returns them masked)."""
        return self.lora_A, self.lora_B

    def get_delta_weight(self) -> Tensor:
        A, B = self._factors()
        return (B @ A) * self.scaling                                       # (out, in)

    def forward(self, x: Tensor) -> Tensor:
        if self.merged:
            return self.base_layer(x)
        if self._plain(x):
            base = self.base_layer
            A, B = self._factors()
            if not self._many_rows(x):
                return _ThinLoRA.apply(x, base.weight, base.bias, A, B, self.scaling)
            if not torch.is_grad_enabled():   # inference: nothing to save for backward
                return F.linear(x, torch.addmm(base.weight, B, A, alpha=self.scaling), base.bias)
            return _FusedLoRA.apply(x, base.weight, base.bias, A, B, self.scaling)
        out = self.base_layer(x)                                            # (..., out)
        A, B = self._factors()
        if self.dropout_p > 0.0:
            x = self.lora_dropout(x)
        if x.dtype != A.dtype:
            x = x.to(A.dtype)
        # Two thin matmuls, with s folded into the small (N, r) intermediate: never (out, in).
        delta = (x @ A.t()).mul_(self.scaling) @ B.t()                      # (..., r) -> (..., out)
        return out + delta.to(out.dtype)

    def _plain(self, x: Tensor) -> bool:
        """Whether one of the two autograd Functions below may compute the layer: a plain frozen
        nn.Linear base without hooks (they call F.linear with its tensors, so hooks on base_layer
        would not fire), no dropout, one dtype, no autocast."""
        base = self.base_layer
        return (self._plain_linear and self.dropout_p == 0.0
                and x.dtype == base.weight.dtype == self.lora_A.dtype
                and not base.weight.requires_grad and (base.bias is None or not base.bias.requires_grad)
                and not (base._forward_hooks or base._forward_pre_hooks)
                and not _autocast_on(x.device.type))

    def _many_rows(self, x: Tensor) -> bool:
        """At least `in_features` rows: building W + s B A (in x out) costs less than the thin
        products then, and `_FusedLoRA` wins; with fewer rows `_ThinLoRA` does."""
        return x.numel() >= self.in_features * self.in_features

    def _can_fuse(self, x: Tensor) -> bool:
        """Whether forward takes the one-matmul path (`_FusedLoRA`)."""
        return self._plain(x) and self._many_rows(x)


@torch.no_grad()
def pissa_factors(W: Tensor, rank: int, scaling: float, who: str = "LoRALinear") -> tuple[Tensor, Tensor]:
    """PiSSA's factors (A (r, in), B (out, r), float32) with s B A = U_r S_r V_r^T, the top-r
    singular directions of W (out, in) (Meng et al. 2024). Refuses a rank above min(out, in)
    and a W holding NaN or inf (the SVD would fail or spread it); changes nothing."""
    if rank > min(W.shape):
        raise ValueError(f"{who}: init='pissa' needs rank <= min(out, in) = {min(W.shape)}, got {rank}")
    check_finite(W, f"{who}: init='pissa' takes the SVD of the base weight W0, which")
    U, S, Vh = torch.linalg.svd(W.float(), full_matrices=False)
    root = (S[:rank] / scaling).sqrt()                                      # s * B A = U_r S_r V_r^T
    return root[:, None] * Vh[:rank], U[:, :rank] * root                    # (r, in), (out, r)


class _FusedLoRA(torch.autograd.Function):
    """y = x (W + s B A)^T + b, the same function as W x + b + s B (A x), computed with one big matmul.

    Forward and the input gradient each cost one (N, in) x (in, out) matmul, as
    for the frozen base alone, instead of the base matmul plus a full-size add
    (forward) and a second gradient to sum (backward). W + s B A is rebuilt in
    backward rather than saved, so activation memory is as for the thin path.
    Gradients: dA = s (g B)^T x, dB = s g^T (x A^T), dx = g (W + s B A); W, b frozen.

    Twice differentiable: under `create_graph=True` (Hessian-vector products, e.g.
    allocation.hessian_traces probing a layer upstream of this one) backward computes
    the same formulas with recorded ops from the saved inputs, so a second backward
    sees every term. (A once-differentiable backward silently dropped them: a probed
    trace of 0.087 came out as -0.53.)
    """

    @staticmethod
    def forward(ctx, x, W, b, A, B, s):
        x2 = x.reshape(-1, x.shape[-1])                                     # (N, in)
        # Thin products are laid out (r, N): BLAS runs these shapes several times faster here.
        # Each is computed next to the big matmul that reads the same operand, while it is in cache.
        xa_t = A.mm(x2.t())                                                 # (r, N) = (x A^T)^T
        y = F.linear(x, torch.addmm(W, B, A, alpha=s), b)                   # (..., out), W + s B A
        # x itself (not the view x2) is saved, so under create_graph it carries its history.
        ctx.save_for_backward(x, W if ctx.needs_input_grad[0] else None, A, B, xa_t)
        ctx.s = s
        return y

    @staticmethod
    def backward(ctx, g):
        return _lora_backward(ctx, g, lambda g2, W, A, B, gb_t, s: g2.mm(torch.addmm(W, B, A, alpha=s)))


class _ThinLoRA(torch.autograd.Function):
    """y = x W^T + b + s (x A^T) B^T for fewer rows than `in_features`, where the thin products
    beat building W + s B A. The same terms as the textbook path, with two savings:

    * the adapter's term is added into the base matmul's output by the second matmul itself
      (`addmm_`), instead of a separate (N, out) add; in backward, likewise
      dx = g W + s (g B) A is one matmul plus an `addmm_`, not two input gradients summed;
    * the thin products are laid out (r, N), as in `_FusedLoRA`: dB = s (x A^T)^T g computed as
      (r, N) x (N, out) ran ~4x faster here than autograd's g^T (x A^T), (out, N) x (N, r).

    Measured (GPT-2 small's shapes, 512 rows, fwd + bwd, one thread, time / the frozen layer's):
    768 -> 3072 went from 1.21 to 1.03, 768 -> 2304 from 1.21 to 1.10, 3072 -> 768 from 1.13 to 1.08.
    Twice differentiable, as `_FusedLoRA`. Gradients: dA = s (g B)^T x, dB = s g^T (x A^T).
    """

    @staticmethod
    def forward(ctx, x, W, b, A, B, s):
        x2 = x.reshape(-1, x.shape[-1])                                     # (N, in)
        xa_t = A.mm(x2.t())                                                 # (r, N) = (x A^T)^T
        y = F.linear(x2, W, b).addmm_(xa_t.t(), B.t(), alpha=s)             # (N, out)
        ctx.save_for_backward(x, W if ctx.needs_input_grad[0] else None, A, B, xa_t)
        ctx.s = s
        return y.view(*x.shape[:-1], W.shape[0])

    @staticmethod
    def backward(ctx, g):
        return _lora_backward(ctx, g, lambda g2, W, A, B, gb_t, s: g2.mm(W).addmm_(gb_t.t(), A, alpha=s))


def _lora_backward(ctx, g: Tensor, input_grad) -> tuple:
    """The backward of `_FusedLoRA` and `_ThinLoRA`, which differ only in how they form the input
    gradient g (W + s B A): `input_grad(g2, W, A, B, gb_t, s)`, with gb_t = (g B)^T (r, N)."""
    x, W, A, B, xa_t = ctx.saved_tensors
    s = ctx.s
    x2 = x.reshape(-1, x.shape[-1])                                         # (N, in)
    g2 = g.reshape(-1, g.shape[-1])                                         # (N, out)
    if torch.is_grad_enabled():   # create_graph: differentiable ops, xa_t recomputed with history
        xa_t = A.mm(x2.t())
    grad_x = grad_A = grad_B = None
    if ctx.needs_input_grad[4]:
        grad_B = (xa_t.mm(g2) * s).t().contiguous()                         # (out, r)
    if ctx.needs_input_grad[0] or ctx.needs_input_grad[3]:
        gb_t = B.t().mm(g2.t())                                             # (r, N) = (g B)^T
        if ctx.needs_input_grad[0]:
            grad_x = input_grad(g2, W, A, B, gb_t, s).view(x.shape)         # (..., in)
        if ctx.needs_input_grad[3]:
            grad_A = gb_t.mm(x2) * s                                        # (r, in)
    return grad_x, None, None, grad_A, grad_B, None


def _autocast_on(device_type: str) -> bool:
    try:
        return torch.is_autocast_enabled(device_type)
    except TypeError:  # torch < 2.4
        return torch.is_autocast_enabled() if device_type == "cuda" else torch.is_autocast_cpu_enabled()


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
