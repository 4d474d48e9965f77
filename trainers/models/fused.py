"""Several projections of the same input in one matmul: q/k/v of attention, gate/up of SwiGLU.

Each layer i is a frozen nn.Linear (W_i, b_i), possibly wrapped by a LoRALinear
(A_i (r, in), B_i (out_i, r), scaling s_i). Their outputs stacked along features are

    [y_1 | y_2 | ...] = x W^T + b,    W = [W_1 + s_1 B_1 A_1; W_2 + s_2 B_2 A_2; ...]   (sum out_i, in)

(a layer without an adapter contributes W_i alone), so one (N, in) x (in, sum out_i)
matmul replaces one per layer, and in backward one matmul gives the input gradient
instead of one per layer plus the adds that sum them. The adapter gradients are
those of `lora.layers._FusedLoRA`, per layer, with the thin products of every
adapter done together (A stacked to (sum r, in)):

    dA_i = s_i (g_i B_i)^T x,   dB_i = s_i g_i^T (x A_i^T),   dx = g W.

Measured (stories260K, LoRA r=8 on every linear, batch 8 x 128, one thread): a forward
and backward ran 276 matmuls (mm/addmm/bmm) per-layer, 218 fused; the 25 adapted q/k/v
and gate/up layers are 10 autograd nodes instead of 25.

The module structure is untouched: q_proj, k_proj, v_proj (gate_proj, up_proj) stay
separate modules with their own names, state-dict keys and adapter files; this is only
how the model calls them. `project` falls back to calling each layer when anything
would make the fused result differ or skip behaviour: a layer of another type (a
quantized base, whose layer owns its low-bit matmul and would have to dequantize all
weights outside it; DoRA; named adapters; FSDP-wrapped layers), dropout, a trainable
base (full fine-tuning), hooks on a layer, autocast, mixed dtypes, or fewer rows than
`in_features` (then the per-layer thin path is cheaper, as in LoRALinear).
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from lora.layers import LoRALinear, _autocast_on


def project(x: Tensor, layers: tuple[nn.Module, ...]) -> list[Tensor]:
    """[layer(x) for layer in layers], with one matmul over the concatenated weights when
    `fusable(x, layers)`; each output (..., out_i)."""
    if not fusable(x, layers):
        return [layer(x) for layer in layers]
    terms = [_terms(layer) for layer in layers]
    flat = [t for term in terms for t in term[:4]]
    y = _FusedProjections.apply(x, tuple(term[4] for term in terms), *flat)   # (..., sum out_i)
    return list(y.split([term[0].shape[0] for term in terms], dim=-1))


def fusable(x: Tensor, layers: tuple[nn.Module, ...]) -> bool:
    """Whether `project` may compute `layers` together (see the module docstring)."""
    if _autocast_on(x.device.type) or x.numel() < x.shape[-1] * x.shape[-1]:
        return False
    for layer in layers:
        base = layer
        if type(layer) is LoRALinear:
            if layer.merged or layer.dropout_p != 0.0 or layer.lora_A.dtype != x.dtype or _hooked(layer):
                return False
            base = layer.base_layer
        if type(base) is not nn.Linear or _hooked(base) or base.weight.dtype != x.dtype:
            return False
        if base.weight.requires_grad or (base.bias is not None and base.bias.requires_grad):
            return False
    return True


def _hooked(module: nn.Module) -> bool:
    return bool(module._forward_hooks or module._forward_pre_hooks)


def _terms(layer: nn.Module) -> tuple:
    """(W, b, A, B, s) of a layer; A = B = None and s = 0 without an adapter."""
    if type(layer) is LoRALinear:
        A, B = layer._factors()
        return layer.base_layer.weight, layer.base_layer.bias, A, B, layer.scaling
    return layer.weight, layer.bias, None, None, 0.0


def _merged_weight(Ws, As, Bs, scalings) -> Tensor:
    """W = [W_i + s_i B_i A_i; ...] (sum out_i, in); differentiable (used under create_graph)."""
    return torch.cat([W if A is None else torch.addmm(W, B, A, alpha=s)
                      for W, A, B, s in zip(Ws, As, Bs, scalings)])


class _FusedProjections(torch.autograd.Function):
    """y = x W^T + b for the stacked W of the module docstring; inputs after x and the
    scalings are (W_i, b_i, A_i, B_i) per layer. W is rebuilt in backward rather than saved
    (activation memory as for the separate layers). Twice differentiable, as _FusedLoRA."""

    @staticmethod
    def forward(ctx, x, scalings, *flat):
        Ws, bs, As, Bs = flat[0::4], flat[1::4], flat[2::4], flat[3::4]
        x2 = x.reshape(-1, x.shape[-1])                                         # (N, in)
        lora = [i for i, A in enumerate(As) if A is not None]
        # All adapters' x A_i^T at once, laid out (sum r, N) as _FusedLoRA does (faster BLAS shapes).
        xa_t = torch.cat([As[i] for i in lora]).mm(x2.t()) if lora else None    # (sum r, N)
        b = None
        if any(bias is not None for bias in bs):
            b = torch.cat([bias if bias is not None else W.new_zeros(W.shape[0]) for W, bias in zip(Ws, bs)])
        y = F.linear(x, _merged_weight(Ws, As, Bs, scalings), b)               # (..., sum out_i)
        # x serves only the adapters' gradients (dx needs W alone): without adapters it is not kept
        ctx.save_for_backward(x if lora else None, xa_t, *Ws, *As, *Bs)
        ctx.scalings, ctx.lora, ctx.n, ctx.x_shape = scalings, lora, len(Ws), x.shape
        return y

    @staticmethod
    def backward(ctx, g):
        x, xa_t, *rest = ctx.saved_tensors
        n, lora, scalings = ctx.n, ctx.lora, ctx.scalings
        Ws, As, Bs = rest[:n], rest[n:2 * n], rest[2 * n:]
        g2 = g.reshape(-1, g.shape[-1])                                         # (N, sum out_i)
        grads = [None] * (4 * n)
        if lora and any(ctx.needs_input_grad[2 + 4 * i + 2] or ctx.needs_input_grad[2 + 4 * i + 3] for i in lora):
            x2 = x.reshape(-1, x.shape[-1])                                     # (N, in)
            if torch.is_grad_enabled():   # create_graph: recompute with history
                xa_t = torch.cat([As[i] for i in lora]).mm(x2.t())
            starts = [sum(W.shape[0] for W in Ws[:i]) for i in range(n)]
            ranks = [As[i].shape[0] for i in lora]
            gb_t = []                                                           # (r_i, N) = (g_i B_i)^T
            for j, (i, xa_i) in enumerate(zip(lora, xa_t.split(ranks))):
                g_i = g2[:, starts[i]:starts[i] + Ws[i].shape[0]]              # (N, out_i)
                grads[4 * i + 3] = (xa_i.mm(g_i) * scalings[i]).t().contiguous()   # dB_i (out_i, r)
                gb_t.append(Bs[i].t().mm(g_i.t()))
            dA = torch.cat(gb_t).mm(x2)                                         # (sum r, in)
            for i, dA_i in zip(lora, dA.split(ranks)):
                grads[4 * i + 2] = dA_i * scalings[i]                          # dA_i (r, in)
        grad_x = None
        if ctx.needs_input_grad[0]:
            grad_x = g2.mm(_merged_weight(Ws, As, Bs, scalings)).view(ctx.x_shape)   # (..., in)
        return (grad_x, None, *grads)
