"""Several named adapters over one frozen base layer: the container, and its mixed-batch forward.

    y = base(x) + delta_a(x)          a = the active adapter (no delta if this layer has none named a)

DESIGN. The single-adapter layers (lora/layers.py, dora.py, ...) stay single: a
reader learns LoRA from `LoRALinear` without meeting dictionaries of adapters, and a
model with one adapter holds exactly those layers, with PEFT-compatible names
(`q_proj.lora_A`, `q_proj.base_layer.weight`). Only when a SECOND adapter is added
(lora.named.add_adapter) does each adapted layer become a `MultiAdapterLinear`:

    q_proj                   MultiAdapterLinear
      .base_layer            the one frozen base (registered here, once)
      .adapters[name]        an ordinary LoRALinear / DoRALinear / ... per adapter, built
                             around that same base object (never a copy)

Each inner adapter keeps a plain, unregistered reference to the shared base
(`share_base`), so `state_dict()` holds W0 once (`q_proj.base_layer.weight`, then
`q_proj.adapters.<name>.lora_A`, ...) and `.to()` / deepcopy move or copy it once.
The inner layers keep working unchanged: forward, merge (into the shared base),
resize, prune, the allocators, all through `layer.base_layer`. Deleting back to one
adapter restores the plain layers (`own_base`). In files nothing changes: each named
adapter is saved as PEFT saves it, a single-adapter file per folder (lora/adapter_io.py).

Mixed batches (Punica, Chen et al. 2023, arXiv:2310.18547; S-LoRA, Sheng et al. 2023,
arXiv:2311.03285): with per-example names n_b, y_b = base(x_b) + s_{n_b} B_{n_b} A_{n_b} x_b.
For LoRA-form adapters (delta = s B A x) the factors of the K adapters are stacked,
padded to the largest rank r with zeros (which add nothing), with s folded into B:

    A_all (K+1, r, in), B_all (K+1, out, r)      row K: zeros, for "__base__"
    A_b = A_all[idx_b], B_b = B_all[idx_b]       gathered per example (idx (batch,))
    delta = bmm(bmm(x, A_b^T), B_b^T)            (batch, T, in) -> (batch, T, r) -> (batch, T, out)

two batched matmuls for the whole batch, however many adapters it mixes, instead of a
Python loop over examples. Other methods (DoRA, HiRA: their delta needs W0 per adapter)
run one group of examples per adapter present (`_grouped`). Measured on one CPU thread
(batch 32, T 32, a 768 -> 2304 layer, r 8): the gathered delta takes 11 ms for K = 4
adapters and 14 ms for K = 16, the grouped path 96 / 121 ms (it reruns the base per
group), the base matmul itself 66 / 88 ms; whole-model rows: trainers/bench/multi_adapter.py.
"""
from __future__ import annotations

import re

import torch
import torch.nn as nn
from torch import Tensor

from lora.base import AdapterLayer
from lora.layers import LoRALinear
from lora.svd import SVDLoRALinear

BASE_NAME = "__base__"   # PEFT's name for "no adapter" in a mixed batch
NAME_RE = re.compile(r"[A-Za-z0-9_\-]+")


def check_adapter_name(name, who: str) -> str:
    """A usable adapter name: a ModuleDict key and a folder name (letters, digits, _ and -)."""
    if not isinstance(name, str) or not NAME_RE.fullmatch(name) or name == BASE_NAME:
        raise ValueError(f"{who}: an adapter name must be a non-empty str of letters, digits, '_' or '-', "
                         f"and not {BASE_NAME!r}; got {name!r}")
    return name


def share_base(layer: AdapterLayer) -> None:
    """Keep `layer.base_layer` as a plain attribute, no longer a registered submodule (the container
    registers the base once). Undone exactly by `own_base`."""
    if "base_layer" not in layer._modules:   # already shared (it sits in another container too)
        return
    base = layer._modules.pop("base_layer")
    object.__setattr__(layer, "base_layer", base)   # nn.Module.__setattr__ would register it again


def is_shared(layer: AdapterLayer) -> bool:
    return "base_layer" in layer.__dict__


def own_base(layer: AdapterLayer) -> None:
    """Register `layer.base_layer` in the layer again (the layer leaves its container)."""
    if "base_layer" in layer.__dict__:
        others = list(layer._modules.items())       # registered first again, as the constructor did,
        layer._modules.clear()                      # so state_dict keys come in their usual order
        layer.base_layer = layer.__dict__.pop("base_layer")
        layer._modules.update(others)


def low_rank_factors(layer: nn.Module) -> tuple[Tensor, Tensor, float] | None:
    """(A (r, in), B (out, r), s) with delta W = s B A, for the adapters whose update is a plain
    low-rank product (LoRA, Sparse LoRA with its masks applied, AdaLoRA's P (Q Λ)); else None."""
    if isinstance(layer, LoRALinear):
        A, B = layer._factors()
        return A, B, layer.scaling
    if isinstance(layer, SVDLoRALinear):
        return layer._masked_A(), layer.lora_B, layer.scaling
    return None


class MultiAdapterLinear(nn.Module):
    """y = base(x) + delta_active(x): named adapters over one shared frozen base, one active.

    base_layer          the frozen base layer, shared by every adapter (registered here only)
    adapters[name]      an AdapterLayer built around `base_layer` (see the module docstring)
    active              the name of the adapter that computes; a name this layer lacks means
                        "base only here" (adapters may target different layers)
    batch_adapters      None, or one adapter name per example for a mixed batch
                        (set by lora.named.mixed_batch)
    """

    def __init__(self, base_layer: nn.Module, adapters: dict[str, AdapterLayer], active: str):
        super().__init__()
        for name, layer in adapters.items():
            check_adapter_name(name, "MultiAdapterLinear")
            if layer.base_layer is not base_layer:
                raise ValueError(f"MultiAdapterLinear: adapter {name!r} wraps another base layer than the "
                                 f"one given (the adapters must share one base object)")
        self.base_layer = base_layer
        self.adapters = nn.ModuleDict()
        self.active = active
        self.batch_adapters: tuple[str, ...] | None = None
        for name, layer in adapters.items():
            share_base(layer)
            self.adapters[name] = layer

    @property
    def merged(self) -> bool:
        return any(layer.merged for layer in self.adapters.values())

    def forward(self, x: Tensor) -> Tensor:
        if self.batch_adapters is not None:
            return self.mixed_forward(x, self.batch_adapters)
        layer = self.adapters[self.active] if self.active in self.adapters else None
        return self.base_layer(x) if layer is None else layer(x)

    # --- mixed batches ------------------------------------------------------------------------
    def mixed_forward(self, x: Tensor, names: tuple[str, ...]) -> Tensor:
        """Example b (x[b], first dim) through adapter names[b] ("__base__" or a name this layer
        lacks: the base alone)."""
        if x.shape[0] != len(names):
            raise ValueError(f"MultiAdapterLinear: the batch has {x.shape[0]} examples but {len(names)} "
                             f"adapter names were given")
        if self.merged:
            raise RuntimeError("MultiAdapterLinear: an adapter is merged into the shared base; unmerge "
                               "before serving a mixed batch")
        present = [n for n in dict.fromkeys(names) if n in self.adapters]
        out = self.base_layer(x)                                            # (batch, ..., out)
        if not present:
            return out
        factors = [low_rank_factors(self.adapters[n]) for n in present]
        dropout = any(getattr(self.adapters[n], "dropout_p", 0) > 0 for n in present) and self.training
        if dropout or any(f is None for f in factors):
            return self._grouped(x, out, names, present)
        return out + self._gathered(x, names, present, factors).to(out.dtype)

    def _gathered(self, x: Tensor, names, present: list[str], factors) -> Tensor:
        """The stacked-factor path of the module docstring: two bmm for the whole batch."""
        A0 = factors[0][0]
        r = max(A.shape[0] for A, _, _ in factors)
        K = len(present)
        A_all = A0.new_zeros(K + 1, r, A0.shape[1])                         # (K+1, r, in)
        B_all = A0.new_zeros(K + 1, factors[0][1].shape[0], r)              # (K+1, out, r)
        for k, (A, B, s) in enumerate(factors):
            A_all[k, :A.shape[0]] = A
            B_all[k, :, :B.shape[1]] = B * s
        where = {n: k for k, n in enumerate(present)}
        idx = torch.tensor([where.get(n, K) for n in names], device=x.device)   # (batch,)
        x3 = x.reshape(x.shape[0], -1, x.shape[-1]).to(A0.dtype)           # (batch, T, in)
        h = torch.bmm(x3, A_all[idx].transpose(1, 2))                       # (batch, T, r)
        delta = torch.bmm(h, B_all[idx].transpose(1, 2))                    # (batch, T, out)
        return delta.reshape(*x.shape[:-1], delta.shape[-1])

    def _grouped(self, x: Tensor, out: Tensor, names, present: list[str]) -> Tensor:
        """One call per adapter present, on its examples (for adapters that are not s B A)."""
        out = out.clone()
        for n in present:
            rows = torch.tensor([i for i, m in enumerate(names) if m == n], device=x.device)
            out[rows] = self.adapters[n](x[rows]).to(out.dtype)
        return out

    def extra_repr(self) -> str:
        return f"active={self.active!r}"
