"""Sparse LoRA's training-time schedule as an allocator (lora/sparse.py holds the layer).

Every step the loss gets an L1 penalty on the factors (Tibshirani 1996's lasso, which
pushes entries to exactly zero), and after every optimizer step the factors are pruned
by magnitude to the cubic sparsity ramp of Zhu & Gupta 2017 ("To prune, or not to
prune"), from 10 % to 70 % of the run (the magnitudes are first passed through `reduce`,
the all-reduce mean across processes when there are several, so every rank prunes the
same entries); re-applying the masks after the step keeps pruned
entries at zero even though Adam's momentum would move them.
"""
from __future__ import annotations

import math
import numbers

import torch
import torch.nn as nn

from allocation.allocator import check_stepped, no_reduce
from lora.targets import adapter_layers
from lora.sparse import SparseLoRALinear, cubic_sparsity


class SparsityAllocator:
    """Sparse LoRA's training-time schedule, in the allocator protocol: an L1 penalty on the
    factors (added to the loss) and magnitude pruning to the cubic sparsity ramp of
    Zhu & Gupta 2017 (from 10 % to 70 % of the steps), masks re-applied after every step."""

    name = "sparse"

    def __init__(self, model: nn.Module, total_steps: int, final_sparsity: float = 0.5, l1: float = 1e-4):
        self.layers = [m for _, m in adapter_layers(model) if isinstance(m, SparseLoRALinear)]
        if not self.layers:
            raise ValueError("SparsityAllocator: the model has no SparseLoRALinear layers")
        # Refused here, by name, rather than by the pruning schedule many steps into the run.
        if isinstance(total_steps, bool) or not isinstance(total_steps, numbers.Integral) or total_steps < 1:
            raise ValueError(f"SparsityAllocator: total_steps must be a positive int, got {total_steps!r}")
        if isinstance(final_sparsity, bool) or not isinstance(final_sparsity, numbers.Real) \
                or not 0.0 <= final_sparsity < 1.0:
            raise ValueError(f"SparsityAllocator: final_sparsity must be in [0, 1) (1 would prune every entry), "
                             f"got {final_sparsity!r}")
        if isinstance(l1, bool) or not isinstance(l1, numbers.Real) or not (math.isfinite(l1) and l1 >= 0):
            raise ValueError(f"SparsityAllocator: l1 must be a finite number >= 0, got {l1!r}")
        self.total_steps, self.final_sparsity, self.l1 = total_steps, final_sparsity, l1
        self.start, self.end = total_steps // 10, max(total_steps // 10 + 1, (7 * total_steps) // 10)
        self.n_steps, self.rank_history = 0, []
        self.reduce = no_reduce

    def regularization(self, model: nn.Module):
        if self.l1 == 0:
            return 0.0
        return self.l1 * sum(layer.l1_penalty() for layer in self.layers)

    def on_step(self, step: int, model: nn.Module, optimizer) -> None:
        self.n_steps += 1

    def after_step(self, step: int, model: nn.Module, optimizer) -> None:
        target = cubic_sparsity(step, self.start, self.end, self.final_sparsity)
        if target > 0 and self.reduce is not no_reduce:
            with torch.no_grad():          # identical factors on every rank: the mean changes no bit
                for layer in self.layers:
                    for p in (layer.lora_A, layer.lora_B):
                        p.copy_(self.reduce(p.detach()))
        for layer in self.layers:
            if target > 0:
                layer.prune_to(target)       # also re-zeros what was pruned before
            else:
                layer.apply_masks_()

    def finish(self, total_steps: int) -> None:
        check_stepped(self.name, self.n_steps, total_steps)

    def state_dict(self) -> dict:
        return {"n_steps": self.n_steps}       # the masks are adapter buffers: the checkpoint has them

    def load_state_dict(self, state: dict) -> None:
        n = state.get("n_steps") if isinstance(state, dict) else None
        if isinstance(n, bool) or not isinstance(n, numbers.Integral) or n < 0:
            raise ValueError(f"SparsityAllocator.load_state_dict: expected {{'n_steps': int >= 0}}, got {state!r}")
        self.n_steps = int(n)
