"""AdaLoRA's adapter: the update in SVD form P Λ Q (Zhang et al. 2023, arXiv:2303.10512)."""
from __future__ import annotations

import math
import numbers

import torch
import torch.nn as nn
from torch import Tensor

from lora.base import LowRankAdapter, _set_data
from lora.low_rank import lora_scaling, product_svd, work_dtype


class SVDLoRALinear(LowRankAdapter):
    """y = W0 x + b + s * P diag(Λ ⊙ m) Q dropout(x)

    W0 (out, in), b (out,)   frozen base layer (nn.Linear or an 8/4-bit Linear-like layer)
    Q  (r, in)               `lora_A`, right singular vectors, N(0, 0.02^2) at init
    Λ  (r, 1)                `lora_E`, singular values, zeros at init (so the layer starts as the base)
    P  (out, r)              `lora_B`, left singular vectors, N(0, 0.02^2) at init
    m  (r,)                  `rank_mask` buffer of 0/1: triplet i (P[:, i], Λ_i, Q[i]) is active iff m_i = 1
    s                        `scaling` = alpha / r (alpha / sqrt(r) with use_rslora)

    P and Q are not constrained to be orthogonal; AdaLoRA adds the regulariser
    ||P^T P - I||_F^2 + ||Q Q^T - I||_F^2 to the loss (allocation.adalora). Pruning a
    triplet sets m_i = 0 and Λ_i = 0 (`set_mask`): the mask in the forward makes a
    pruned triplet contribute nothing even if an optimizer later moves Λ_i.
    ΔW = s * P (Q * (Λ ⊙ m))  (out, in); the active rank is sum(m).
    """

    def __init__(self, base_layer: nn.Module, *, rank: int = 8, alpha: float = 16, dropout: float = 0.0,
                 use_rslora: bool = False, init_std: float = 0.02, dtype: torch.dtype | None = None):
        self.check_arguments(type(self).__name__, rank, alpha, dropout, use_rslora)
        if isinstance(init_std, bool) or not isinstance(init_std, numbers.Real) \
                or not math.isfinite(init_std) or init_std <= 0:
            raise ValueError(f"{type(self).__name__}: init_std must be a finite number > 0, got {init_std!r}")
        super().__init__(base_layer, rank=rank, alpha=alpha, dropout=dropout, use_rslora=use_rslora,
                         dtype=dtype)                        # lora_A, lora_B, scaling, dropout
        self.init_std = float(init_std)
        with torch.no_grad():                                # AdaLoRA's init: P, Q Gaussian, Λ zero
            self.lora_A.normal_(0.0, init_std)                                              # Q (r, in)
            self.lora_B.normal_(0.0, init_std)                                              # P (out, r)
        self.lora_E = nn.Parameter(torch.zeros(rank, 1, **self._factory))                  # Λ (r, 1)
        self.register_buffer("rank_mask", torch.ones(rank, **self._factory))              # m (r,)

    @property
    def active_rank(self) -> int:
        return int(self.rank_mask.sum().item())

    def _masked_A(self) -> Tensor:
        return self.lora_A * (self.lora_E * self.rank_mask[:, None])                      # (r, in)

    def get_delta_weight(self) -> Tensor:
        return (self.lora_B @ self._masked_A()) * self.scaling                             # (out, in)

    def forward(self, x: Tensor) -> Tensor:
        out = self.base_layer(x)                                                           # (..., out)
        if self.merged:
            return out
        x = self.lora_dropout(x)
        if x.dtype != self.lora_A.dtype:
            x = x.to(self.lora_A.dtype)
        delta = (x @ self._masked_A().t()).mul_(self.scaling) @ self.lora_B.t()           # (..., r) -> (..., out)
        return out + delta.to(out.dtype)

    @torch.no_grad()
    def set_mask(self, keep: Tensor) -> None:
        """Keep the triplets where `keep` (r,) is True; zero Λ of the others (and keep it zero)."""
        if not isinstance(keep, Tensor):
            raise TypeError(f"SVDLoRALinear.set_mask: keep must be a tensor of {self.rank} booleans, "
                            f"got {type(keep).__name__}")
        if keep.numel() != self.rank:
            raise ValueError(f"SVDLoRALinear.set_mask: expected {self.rank} entries, got {keep.numel()}")
        if keep.dtype != torch.bool and not ((keep == 0) | (keep == 1)).all():
            raise ValueError(f"SVDLoRALinear.set_mask: keep must hold booleans or 0/1, got {keep.tolist()}")
        keep = keep.to(device=self.rank_mask.device).bool().reshape(-1)
        self.rank_mask.copy_(keep.to(self.rank_mask.dtype))
        self.lora_E.masked_fill_(~keep[:, None], 0.0)

    def orthogonality(self) -> Tensor:
        """||P^T P - I||_F^2 + ||Q Q^T - I||_F^2 (AdaLoRA's regulariser for this layer, as the paper
        writes it)."""
        return sum(t.square() for t in self.orthogonality_terms())

    def orthogonality_terms(self) -> tuple[Tensor, Tensor]:
        """(||P^T P - I||_F, ||Q Q^T - I||_F): how far each factor is from orthonormal (the authors'
        code averages these over all factors: allocation.adalora.orthogonal_regularizer)."""
        P, Q = self.lora_B, self.lora_A
        eye = torch.eye(self.rank, device=P.device, dtype=P.dtype)
        return torch.linalg.matrix_norm(P.t() @ P - eye), torch.linalg.matrix_norm(Q @ Q.t() - eye)

    @torch.no_grad()
    def resize(self, new_rank: int) -> None:
        """Change r keeping the output: growing appends new active triplets with Λ = 0 (old ones
        stay at [:r_old]); shrinking re-factors ΔW by its SVD and keeps the top `new_rank` triplets
        (the best rank-k approximation, Eckart-Young). Λ absorbs the change of s = alpha / r.
        The same Parameter objects are kept (their `.data` is swapped)."""
        self._check_resizable(new_rank)
        r = self.rank
        if new_rank == r:
            return
        new_scaling = lora_scaling(self.alpha, new_rank, self.use_rslora)
        keep_scale = self.scaling / new_scaling
        A, E, B, m = self.lora_A.data, self.lora_E.data, self.lora_B.data, self.rank_mask
        if new_rank > r:
            extra = new_rank - r
            A_new = torch.cat([A, torch.randn(extra, A.shape[1], dtype=A.dtype, device=A.device) * self.init_std])
            B_new = torch.cat([B, torch.randn(B.shape[0], extra, dtype=B.dtype, device=B.device) * self.init_std],
                              dim=1)
            E_new = torch.cat([E * m[:, None] * keep_scale, E.new_zeros(extra, 1)])
            m_new = torch.cat([m, m.new_ones(extra)])
        else:
            U, S, Vh = product_svd(B, A.to(work_dtype(A)) * (E.to(work_dtype(A)) * m[:, None]))
            kept = min(new_rank, S.numel())     # ΔW has at most min(out, in) directions
            extra = new_rank - kept             # pad as when growing: new triplets with Λ = 0
            A_new = torch.cat([Vh[:kept].to(A.dtype),
                               torch.randn(extra, A.shape[1], dtype=A.dtype, device=A.device) * self.init_std])
            B_new = torch.cat([U[:, :kept].to(B.dtype),
                               torch.randn(B.shape[0], extra, dtype=B.dtype, device=B.device) * self.init_std],
                              dim=1)
            E_new = torch.cat([(S[:kept, None] * keep_scale).to(E.dtype), E.new_zeros(extra, 1)])
            m_new = m.new_ones(new_rank)
        m_new = m_new.contiguous()
        _set_data((self.lora_A, A_new), (self.lora_E, E_new), (self.lora_B, B_new))   # all or none
        self.rank_mask = m_new
        self.scaling = new_scaling

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}, "
                f"active_rank={self.active_rank}, alpha={self.alpha}, scaling={self.scaling:.4g}, "
                f"dropout={self.dropout_p}, merged={self.merged}")
