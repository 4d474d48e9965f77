"""Combining named adapters into a new one: PEFT's `add_weighted_adapter`, its three basic families.

Adapters i = 1..n with weights w_i; at a layer, factors A_i (r_i, in), B_i (out, r_i) and
scaling s_i, so delta W_i = s_i B_i A_i. The new adapter is a LoRALinear with alpha = r
(scaling 1), as PEFT makes it (`lora_alpha = new rank`):

linear (every r_i = r; new rank r):
    A = sum_i sgn(w_i s_i) sqrt|w_i s_i| A_i,    B = sum_i sqrt|w_i s_i| B_i
    B A = sum_i sum_j c_i c_j' B_i A_j: besides the wanted terms w_i delta W_i it holds the
    cross terms B_i A_j (i != j), so it is NOT the weighted sum of the updates (it is for one
    adapter). Cheap, and the rank stays r.
cat (new rank sum_i r_i):
    A = [w_1 s_1 A_1; ...; w_n s_n A_n] (stacked rows),   B = [B_1, ..., B_n] (side by side)
    B A = sum_i w_i s_i B_i A_i = sum_i w_i delta W_i, exactly.
svd (new rank k, by default the largest r_i):
    the best rank-k approximation (Eckart-Young) of sum_i w_i delta W_i = U S V^T:
    B = U_k sqrt(S_k), A = sqrt(S_k) V_k^T. For low-rank adapters it is taken from the cat
    factors by lora.base.resized_low_rank (a QR of each factor and an SVD of the small core,
    never the (out, in) sum); for the others (DoRA, HiRA, IA3: delta W is not s B A) from the
    SVD of the summed delta W. (PEFT puts all of S into B; the product, hence the function, is the same.)

An adapter that does not target a layer adds nothing there; the new adapter targets every
layer some source targets. PEFT's other families (ties, dare, magnitude_prune) are not here.
"""
from __future__ import annotations

import math
import numbers
import re
from typing import Sequence

import torch
import torch.nn as nn
from torch import Tensor

from lora.low_rank import resized_low_rank
from lora.config import LoraConfig
from lora.layers import LoRALinear
from lora.targets import adapter_names
from lora.multi import check_adapter_name, low_rank_factors
from lora.named import _check_unmerged, _layout, add_built_adapter

COMBINATIONS = ("linear", "cat", "svd")


def add_weighted_adapter(model: nn.Module, adapters: Sequence[str], weights: Sequence[float], adapter_name: str,
                         combination: str = "svd", svd_rank: int | None = None) -> nn.Module:
    """Add the adapter `adapter_name` combining `adapters` with `weights` (the module docstring
    gives each `combination`). The active adapter stays active. All-or-nothing: every new
    layer is computed and checked before the model changes."""
    names = adapter_names(model)
    check_adapter_name(adapter_name, "add_weighted_adapter")
    if adapter_name in names:
        raise ValueError(f"add_weighted_adapter: the model already has an adapter named {adapter_name!r}")
    adapters, weights = list(adapters), list(weights)
    if not adapters or len(adapters) != len(weights):
        raise ValueError(f"add_weighted_adapter: give one weight per adapter, got {len(adapters)} adapters "
                         f"and {len(weights)} weights")
    unknown = [a for a in adapters if a not in names]
    if unknown:
        raise ValueError(f"add_weighted_adapter: unknown adapters {unknown}; the model's adapters: {names}")
    for w in weights:
        if isinstance(w, bool) or not isinstance(w, numbers.Real) or not math.isfinite(w):
            raise ValueError(f"add_weighted_adapter: weights must be finite numbers, got {weights}")
    if combination not in COMBINATIONS:
        raise ValueError(f"add_weighted_adapter: combination must be one of {COMBINATIONS}, got {combination!r}")
    if svd_rank is not None and (isinstance(svd_rank, bool) or not isinstance(svd_rank, int) or svd_rank <= 0):
        raise ValueError(f"add_weighted_adapter: svd_rank must be a positive int or None, got {svd_rank!r}")
    _check_unmerged(model, "add_weighted_adapter")
    built = []
    for module, (base, layers) in _layout(model).items():
        sources = [(layers[a], w) for a, w in zip(adapters, weights) if a in layers]
        if sources:
            A, B = _combine(module, sources, combination, svd_rank)
            layer = LoRALinear(base, rank=A.shape[0], alpha=A.shape[0])           # scaling 1
            with torch.no_grad():
                layer.lora_A.copy_(A)
                layer.lora_B.copy_(B)
            built.append((module, layer))
    ranks = {module: layer.rank for module, layer in built}
    r = max(ranks.values())
    pattern = {re.escape(m): k for m, k in ranks.items() if k != r}
    config = LoraConfig(r=r, lora_alpha=r, target_modules=list(ranks), rank_pattern=pattern,
                        alpha_pattern=dict(pattern))
    return add_built_adapter(model, adapter_name, config, built)


def _combine(module: str, sources: list, combination: str, svd_rank: int | None) -> tuple[Tensor, Tensor]:
    """The new (A (k, in), B (out, k)) at one layer, in float32 (float64 for float64 adapters)."""
    factors = [low_rank_factors(layer) for layer, _ in sources]
    if combination in ("linear", "cat"):
        kinds = [type(layer).__name__ for (layer, _), f in zip(sources, factors) if f is None]
        if kinds:
            raise ValueError(f"add_weighted_adapter: combination {combination!r} needs low-rank adapters "
                             f"(delta W = s B A); {module!r} holds a {kinds[0]}; use combination='svd'")
    work = torch.promote_types(sources[0][0].get_delta_weight().dtype, torch.float32)
    if combination == "linear":
        ranks = {A.shape[0] for A, _, _ in factors}
        if len(ranks) != 1:
            raise ValueError(f"add_weighted_adapter: combination 'linear' needs one rank, {module!r} has ranks "
                             f"{sorted(ranks)}; use 'cat' or 'svd'")
        A = B = 0
        for (A_i, B_i, s), (_, w) in zip(factors, sources):
            c = math.sqrt(abs(w * s))
            A = A + math.copysign(c, w * s) * A_i.detach().to(work)
            B = B + c * B_i.detach().to(work)
        return A, B
    if all(f is not None for f in factors):
        A = torch.cat([w * s * A_i.detach().to(work) for (A_i, _, s), (_, w) in zip(factors, sources)])
        B = torch.cat([B_i.detach().to(work) for _, B_i, _ in factors], dim=1)
        if combination == "cat":
            return A, B
        k = svd_rank or max(f[0].shape[0] for f in factors)
        return resized_low_rank(A, B, k)
    # svd of adapters whose delta W is not a product: the summed update itself
    ranks = [getattr(layer, "rank", None) for layer, _ in sources]
    k = svd_rank or max((r for r in ranks if r), default=None)
    if k is None:
        raise ValueError(f"add_weighted_adapter: {module!r}: svd of adapters without a rank needs svd_rank=")
    with torch.no_grad():
        delta = sum(w * layer.get_delta_weight().to(work) for layer, w in sources)             # (out, in)
        U, S, Vh = torch.linalg.svd(delta, full_matrices=False)
    kept = min(k, S.numel())
    root = S[:kept].sqrt()
    A, B = root[:, None] * Vh[:kept], U[:, :kept] * root
    return (A, B) if kept == k else resized_low_rank(A, B, k)
