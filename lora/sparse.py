"""Sparse LoRA: LoRA whose factors are pruned, entry by entry or whole rank components at a time."""
from __future__ import annotations

import torch
import torch.nn as nn
from torch import Tensor

from lora.checks import check_finite, check_rank
from lora.low_rank import resized_low_rank
from lora.layers import LoRALinear


def cubic_sparsity(step: int, start: int, end: int, final_sparsity: float,
                   initial_sparsity: float = 0.0) -> float:
    """Target sparsity at `step` on the cubic ramp of Zhu & Gupta 2017 ("To prune, or not to prune",
    arXiv:1710.01878, eq. 1): s_t = s_f + (s_i - s_f) (1 - (t - t0) / (t1 - t0))^3, held at s_i
    before `start` and at s_f after `end`. Prunes fast early, gently near the end."""
    if not 0.0 <= initial_sparsity <= final_sparsity < 1.0:
        raise ValueError(f"cubic_sparsity: need 0 <= initial_sparsity <= final_sparsity < 1, "
                         f"got {initial_sparsity} and {final_sparsity}")
    if end <= start:
        raise ValueError(f"cubic_sparsity: end step must be after start step, got start={start}, end={end}")
    if step <= start:
        return float(initial_sparsity)
    if step >= end:
        return float(final_sparsity)
    frac = 1.0 - (step - start) / (end - start)
    return float(final_sparsity + (initial_sparsity - final_sparsity) * frac ** 3)


class SparseLoRALinear(LoRALinear):
    """y = W0 x + b + s (B ⊙ M_B)(A ⊙ M_A) dropout(x)

    A (r, in), B (out, r)      trainable factors, as in LoRALinear
    M_A, M_B                   boolean buffers `mask_A`, `mask_B` (same shapes), 1 = kept

    Three ways to make the update sparse:
      * `l1_penalty()`: sum |A ⊙ M_A| + |B ⊙ M_B|, added to the loss (times a coefficient)
        to push entries toward zero;
      * `prune_to(sparsity)`: unstructured magnitude pruning of A and B (each to that
        fraction of zeros), driven by `cubic_sparsity` (Zhu & Gupta 2017);
      * `prune_ranks(keep)`: structured pruning: keep the `keep` rank-one components
        s B[:, i] A[i, :] of largest norm ||B[:, i]|| ||A[i, :]||; the factors really shrink.
    Masks only ever remove entries. They are applied in forward (so masked entries get
    zero gradient) and `apply_masks_()` re-zeros the stored values; call it after each
    optimizer step, since Adam's momentum can move an entry whose gradient is zero.
    """

    def __init__(self, base_layer: nn.Module | int, out_features: int | None = None, **kwargs):
        super().__init__(base_layer, out_features, **kwargs)
        self.register_buffer("mask_A", torch.ones(self.lora_A.shape, dtype=torch.bool, device=self.lora_A.device))
        self.register_buffer("mask_B", torch.ones(self.lora_B.shape, dtype=torch.bool, device=self.lora_B.device))

    def _factors(self) -> tuple[Tensor, Tensor]:
        return self.lora_A * self.mask_A, self.lora_B * self.mask_B

    def l1_penalty(self) -> Tensor:
        """sum |A ⊙ M_A| + sum |B ⊙ M_B| (a scalar tensor with gradient, in the adapter's dtype)."""
        A, B = self._factors()
        return A.abs().sum() + B.abs().sum()

    def _check_masks(self, who: str) -> None:
        """Masks someone replaced must still fit the factors, or the second in-place product fails
        after the first has changed A."""
        for mname, mask, param in (("mask_A", self.mask_A, self.lora_A), ("mask_B", self.mask_B, self.lora_B)):
            if mask.dtype != torch.bool or mask.shape != param.shape or mask.device != param.device:
                raise ValueError(f"SparseLoRALinear.{who}: {mname} must be a bool tensor of shape "
                                 f"{tuple(param.shape)} on {param.device}, got {mask.dtype} "
                                 f"{tuple(mask.shape)} on {mask.device}")

    @torch.no_grad()
    def apply_masks_(self) -> None:
        """Zero the pruned entries of lora_A and lora_B in place (call after optimizer.step())."""
        self._check_masks("apply_masks_")
        self.lora_A.mul_(self.mask_A)
        self.lora_B.mul_(self.mask_B)

    @torch.no_grad()
    def prune_to(self, sparsity: float) -> None:
        """Magnitude pruning: zero the smallest |entries| of A and of B until each has `sparsity`
        zeros (already-pruned entries count, and masks never regrow)."""
        if not 0.0 <= float(sparsity) < 1.0:
            raise ValueError(f"SparseLoRALinear.prune_to: sparsity must be in [0, 1), got {sparsity!r}")
        self._check_masks("prune_to")
        new_masks = []   # both are computed before either changes
        for param, mask in ((self.lora_A, self.mask_A), (self.lora_B, self.mask_B)):
            n_prune = int(round(sparsity * mask.numel()))
            new_mask = mask.clone()
            if n_prune > int((~mask).sum()):
                score = param.detach().abs().float().masked_fill(~mask, -1.0).flatten()  # pruned go first
                drop = torch.topk(score, n_prune, largest=False).indices
                new_mask.view(-1)[drop] = False
            new_masks.append(new_mask)
        self.mask_A.copy_(new_masks[0])
        self.mask_B.copy_(new_masks[1])
        self.apply_masks_()

    def component_importance(self) -> Tensor:
        """(r,) Frobenius norm of each rank-one term B[:, i] A[i, :] (up to the common scaling)."""
        A, B = self._factors()
        return (B.detach().float().norm(dim=0) * A.detach().float().norm(dim=1))

    @torch.no_grad()
    def prune_ranks(self, keep: int) -> Tensor:
        """Keep the `keep` most important rank components (their order preserved); return their indices.

        The factors shrink to rank `keep`; the layer then equals a dense LoRA holding
        exactly the kept components (scaling becomes alpha / keep, B is rescaled to match)."""
        check_rank(keep, "SparseLoRALinear.prune_ranks")
        if keep > self.rank:
            raise ValueError(f"SparseLoRALinear.prune_ranks: keep must be <= rank {self.rank}, got {keep}")
        if self.merged:
            raise RuntimeError("SparseLoRALinear.prune_ranks: unmerge() before changing the rank")
        A, B = self._factors()
        check_finite(A, "SparseLoRALinear.prune_ranks: lora_A")   # NaN would rank as the most important
        check_finite(B, "SparseLoRALinear.prune_ranks: lora_B")
        kept = torch.topk(self.component_importance(), keep).indices.sort().values
        mask_A, mask_B = self.mask_A[kept], self.mask_B[:, kept]
        self._set_factors(A[kept], B[:, kept])
        self.mask_A, self.mask_B = mask_A.contiguous(), mask_B.contiguous()
        return kept

    @torch.no_grad()
    def resize(self, new_rank: int, *, keep_scaling: bool = False) -> None:
        """As LowRankAdapter.resize. Growing keeps the masks and adds dense new components;
        shrinking (SVD of the update) gives dense factors, so the masks reset to all-ones."""
        self._check_resizable(new_rank, keep_scaling)
        old = self.rank
        A, B = self._factors()
        A, B = resized_low_rank(A, B, new_rank)
        if new_rank >= old:
            grow = new_rank - old
            mask_A = torch.cat([self.mask_A, self.mask_A.new_ones(grow, self.in_features)], dim=0)
            mask_B = torch.cat([self.mask_B, self.mask_B.new_ones(self.out_features, grow)], dim=1)
        else:
            mask_A = torch.ones(A.shape, dtype=torch.bool, device=A.device)
            mask_B = torch.ones(B.shape, dtype=torch.bool, device=B.device)
        self._set_factors(A, B, keep_scaling)   # the last step that can fail
        self.mask_A, self.mask_B = mask_A, mask_B

    def nonzeros(self) -> dict:
        """Counts of nonzero entries in the effective factors, and the density against dense LoRA."""
        A, B = self._factors()
        nz_A, nz_B = int((A != 0).sum()), int((B != 0).sum())
        dense = A.numel() + B.numel()
        return {"lora_A": nz_A, "lora_B": nz_B, "total": nz_A + nz_B, "dense": dense,
                "density": (nz_A + nz_B) / dense}

    def extra_repr(self) -> str:
        kept = int(self.mask_A.sum() + self.mask_B.sum())
        return super().extra_repr() + f", kept={kept}/{self.mask_A.numel() + self.mask_B.numel()}"
