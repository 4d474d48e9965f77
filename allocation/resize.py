"""Resizing an adapter layer mid-training: carry the optimizer state, and undo a resize exactly.

`resize_with_state` is `layer.resize` (lora/base.py) plus the AdamW state of lora_A /
lora_B; `snapshot_layer` / `restore_layer` put a layer (and its optimizer state) back as
it was, which the rank controller (allocation/controller.py) uses to roll back.

Optimizer state is carried over, never reset. With the product s B A the
gradients are g_A = s B^T G and g_B = s G A^T, where G = dL/d(ΔW) (out, in),
whichever way the layer uses B A (LoRA, HiRA, DoRA). Let r = s'/s be the
change of scaling (PEFT's s = alpha / rank changes with the rank; the layer
rescales B to keep s B A fixed).

  grow   A'[:r_old] = A, B'[:, :r_old] = B / r. So g_A'[:r_old] = g_A and
         g_B'[:, :r_old] = r g_B: A's moments are copied, B's first moment is
         multiplied by r and its second by r^2; the new slots start at zero.
  shrink A' and B' are new factors (the balanced truncated SVD), not slices, but
         they live in the old spans: B' = B P with P = B^+ B' (r_old, k) and
         A' = T A with T = A' A^+ (k, r_old). Then, at the same G (exact when the
         shrink keeps the function), g_A' = r P^T g_A and g_B' = r g_B T^T. Adam's
         first moment is an average of gradients, so it is mapped the same way;
         the second moment (an average of squares) is mapped with the squared
         entries of the same matrices, which is exact when only components are
         dropped (P, T are then selections, up to sign) and the diagonal
         approximation otherwise. When the factors already are in balanced SVD
         form this keeps exactly the surviving slices.

After a resize the controller re-registers lora_A / lora_B as fresh Parameter
objects (same tensors) and swaps them into the optimizer's param groups and
state: PyTorch caches a leaf's shape in its gradient accumulator while any old
graph lives, so a shape change through `.data` alone breaks the next backward.
Code that keeps its own list of parameters must re-read it after a resize.

The `step` entries are kept as they were (A and B of a layer share one count):
Adam's bias correction stays that of a long run, so the zero moments of new
slots are not inflated. Other state entries of the parameter's shape follow the
first-moment rule (`momentum_buffer`) or the second-moment rule (names with "sq").
"""
from __future__ import annotations

import torch
import torch.nn as nn


def _moment_kind(key: str) -> str:
    return "second" if "sq" in key else "first"


@torch.no_grad()
def _map_state(state: dict, shape: torch.Size, fn_first, fn_second) -> dict:
    out = {}
    for key, value in state.items():
        if torch.is_tensor(value) and value.dim() > 0 and value.shape == shape:
            value = (fn_second if _moment_kind(key) == "second" else fn_first)(value)
        out[key] = value
    return out


def _move_param(optimizer, old: nn.Parameter, new: nn.Parameter) -> None:
    """Put Parameter `new` where `old` was in the optimizer (param groups and state)."""
    if old is new or optimizer is None:
        return
    for group in optimizer.param_groups:
        group["params"] = [new if p is old else p for p in group["params"]]
    if old in optimizer.state:
        optimizer.state[new] = optimizer.state.pop(old)


RANKED = ("lora_A", "lora_B")
PLAIN = (bool, int, float, str, type(None))


def _renew_parameters(layer: nn.Module, optimizer) -> None:
    """Re-register lora_A / lora_B as fresh Parameter objects holding the same tensors.

    Why: PyTorch caches a leaf's shape in its gradient accumulator, which lives as
    long as any graph that used the leaf (e.g. last step's `loss`); a backward
    through a Parameter whose `.data` changed shape then fails ("invalid gradient
    ... expected shape compatible with [r_old, in]"). A new leaf has no stale cache.
    """
    for name in RANKED:
        old = getattr(layer, name)
        new = nn.Parameter(old.data, requires_grad=old.requires_grad)
        setattr(layer, name, new)
        _move_param(optimizer, old, new)


@torch.no_grad()
def resize_with_state(layer: nn.Module, new_rank: int, optimizer=None, keep_scaling: bool = False) -> None:
    """layer.resize(new_rank, keep_scaling=...) and carry the AdamW state of lora_A / lora_B (see the
    module docstring; with keep_scaling the scaling ratio r is 1)."""
    if hasattr(layer, "lora_E"):
        raise TypeError(f"resize_with_state: {type(layer).__name__} is in SVD form; its ranks are set by "
                        f"masking (AdaLoRAAllocator), not by the rank controller")
    old_rank, s_old = layer.rank, float(layer.scaling)
    if new_rank == old_rank:
        return
    pA, pB = layer.lora_A, layer.lora_B
    work = torch.promote_types(pA.dtype, torch.float32)                         # fp32, or fp64 if given
    A0, B0 = pA.detach().to(work).clone(), pB.detach().to(work).clone()         # (r, in), (out, r)
    layer.resize(new_rank, keep_scaling=keep_scaling)   # same Parameter objects, new shapes
    _renew_parameters(layer, optimizer)
    pA, pB = layer.lora_A, layer.lora_B
    if optimizer is None:
        return
    ratio = float(layer.scaling) / s_old
    stA, stB = optimizer.state.get(pA), optimizer.state.get(pB)
    k = new_rank
    if new_rank > old_rank:
        def grow_rows(m, c):                                                    # (r, in) -> (k, in)
            return torch.cat([m * c, m.new_zeros(k - old_rank, m.shape[1])], dim=0)

        def grow_cols(m, c):                                                    # (out, r) -> (out, k)
            return torch.cat([m * c, m.new_zeros(m.shape[0], k - old_rank)], dim=1)
        if stA:
            optimizer.state[pA] = _map_state(stA, A0.shape, lambda m: grow_rows(m, 1.0),
                                             lambda v: grow_rows(v, 1.0))
        if stB:
            optimizer.state[pB] = _map_state(stB, B0.shape, lambda m: grow_cols(m, ratio),
                                             lambda v: grow_cols(v, ratio ** 2))
        return
    P = torch.linalg.pinv(B0, rtol=1e-5) @ pB.detach().to(work)                 # (r, k): B' = B P
    T = pA.detach().to(work) @ torch.linalg.pinv(A0, rtol=1e-5)                 # (k, r): A' = T A
    Pt, Tt = P.t(), T.t()
    if stA:
        optimizer.state[pA] = _map_state(
            stA, A0.shape, lambda m: (ratio * (Pt @ m.to(work))).to(m.dtype),   # (k, in)
            lambda v: (ratio ** 2 * (Pt.square() @ v.to(work))).to(v.dtype))
    if stB:
        optimizer.state[pB] = _map_state(
            stB, B0.shape, lambda m: (ratio * (m.to(work) @ Tt)).to(m.dtype),   # (out, k)
            lambda v: (ratio ** 2 * (v.to(work) @ Tt.square())).to(v.dtype))


def snapshot_layer(layer: nn.Module, optimizer=None) -> dict:
    """All a resize may change: each Parameter / buffer outside the base (the object itself,
    a copy of its values and of its gradient), the plain attributes (scaling) and the
    optimizer state of the Parameters."""
    entries = []
    for key, t in list(layer.named_parameters()) + list(layer.named_buffers()):
        if not key.startswith("base_layer."):
            grad = t.grad.detach().clone() if isinstance(t, nn.Parameter) and t.grad is not None else None
            entries.append((key, t, t.detach().clone(), grad))
    opt = {}
    if optimizer is not None:
        for _, t, _, _ in entries:
            if isinstance(t, nn.Parameter) and t in optimizer.state:
                opt[t] = {k: v.clone() if torch.is_tensor(v) else v for k, v in optimizer.state[t].items()}
    attrs = {k: v for k, v in vars(layer).items() if not k.startswith("_") and isinstance(v, PLAIN)}
    return {"entries": entries, "attrs": attrs, "opt": opt}


@torch.no_grad()
def restore_layer(layer: nn.Module, snap: dict, optimizer=None) -> None:
    """Put the snapshot's own objects back, holding their old values, gradients and optimizer
    state (no SVD on the way: a resize back could not restore values). The old Parameter
    objects keep their old shapes, so a graph still holding them stays consistent."""
    for key, obj, data, grad in snap["entries"]:
        owner_name, _, attr = key.rpartition(".")
        owner = layer.get_submodule(owner_name) if owner_name else layer
        current = getattr(owner, attr)
        obj.data = data
        if isinstance(obj, nn.Parameter):
            obj.grad = grad
            if current is not obj:
                setattr(owner, attr, obj)
                _move_param(optimizer, current, obj)
            if optimizer is not None:
                optimizer.state.pop(obj, None)
                if obj in snap["opt"]:
                    optimizer.state[obj] = snap["opt"][obj]
        elif current is not obj:
            owner._buffers[attr] = obj
    for key, value in snap["attrs"].items():
        setattr(layer, key, value)
