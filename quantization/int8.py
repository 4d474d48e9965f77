"""Symmetric absmax int8 quantization: row-wise, blockwise, and outlier columns.

Row-wise (vector-wise in LLM.int8(), Dettmers, Lewis, Belkada, Zettlemoyer 2022,
arXiv:2208.07339, §3.1): each output row i of W (out, in) gets its own scale

    s_i = max_j |W_ij| / 127,     q_ij = round(W_ij / s_i) ∈ [-127, 127],     Ŵ_ij = q_ij · s_i

so |W_ij - Ŵ_ij| ≤ s_i / 2.  Blockwise does the same over row-major blocks of B elements
(any tensor shape), one scale per block, like the NF4 code in nf4.py.

Outlier columns (the mixed-precision decomposition of LLM.int8(), §3.2): a few input
features carry values far larger than the rest; one of them in a row inflates s_i and
wipes out the precision of every other entry of that row.  LLM.int8() finds those
feature columns in the activations (|x| ≥ 6) and multiplies them in 16 bits.  We
quantize only weights (activations stay in float), so we apply the same split on the
weight side: input columns j with max_i |W_ij| ≥ `outlier_threshold` are kept in float
(out, k) and left out of the row scales; the rest are quantized row-wise.
`int8_matmul` does the activation-side decomposition itself (x in int8 too), as in the paper.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .blockwise import blockwise_absmax, check_blocksize, check_float_tensor, check_shape, check_storage
from .nf4 import FLOAT_DTYPES


@dataclass
class Int8Tensor:
    """Int8 codes plus float32 scales (one per row, or one per block)."""
    data: torch.Tensor                        # int8: (rows, cols) row-wise, or (n,) blockwise
    scale: torch.Tensor                       # float32: (rows,) or (nblocks,) — absmax / 127
    shape: torch.Size                         # original shape
    dtype: torch.dtype                        # original dtype
    blocksize: int | None = None              # None = row-wise
    outlier_cols: torch.Tensor | None = None  # (k,) int64 column indices kept in float (row-wise only)
    outlier_weight: torch.Tensor | None = None  # (rows, k) float32 values of those columns

    def __post_init__(self):
        """Refuse codes and scales that disagree with the metadata (shape, block size)."""
        self.shape = check_shape(self.shape, "Int8Tensor")
        if self.dtype not in FLOAT_DTYPES:
            raise TypeError(f"Int8Tensor: dtype must be float32/float16/bfloat16, got {self.dtype}")
        n = self.numel
        if self.blocksize is not None:
            check_blocksize(self.blocksize)
            check_storage("Int8Tensor.data", self.data, (torch.int8,), n,
                          f"one code per element of {tuple(self.shape)}")
            check_storage("Int8Tensor.scale", self.scale, FLOAT_DTYPES, -(-n // self.blocksize),
                          f"one per block of {self.blocksize} of {n} elements")
            if self.outlier_cols is not None or self.outlier_weight is not None:
                raise ValueError("Int8Tensor: outlier columns work with row-wise scales only (blocksize=None)")
            return
        cols = self.shape[-1]
        rows = n // cols
        check_storage("Int8Tensor.data", self.data, (torch.int8,), n, f"one code per element of {tuple(self.shape)}")
        if tuple(self.data.shape) != (rows, cols):
            raise ValueError(f"Int8Tensor.data: row-wise codes must have shape {(rows, cols)} for shape "
                             f"{tuple(self.shape)}, got {tuple(self.data.shape)}")
        check_storage("Int8Tensor.scale", self.scale, FLOAT_DTYPES, rows, f"one per row of {rows}")
        if (self.outlier_cols is None) != (self.outlier_weight is None):
            raise ValueError("Int8Tensor: outlier_cols and outlier_weight come together (both or neither)")
        if self.outlier_cols is not None:
            k = self.outlier_cols.numel()
            check_storage("Int8Tensor.outlier_cols", self.outlier_cols, (torch.int64,), k, "column indices")
            check_storage("Int8Tensor.outlier_weight", self.outlier_weight, FLOAT_DTYPES, rows * k,
                          f"{rows} rows x {k} outlier columns")
            if tuple(self.outlier_weight.shape) != (rows, k):
                raise ValueError(f"Int8Tensor.outlier_weight: expected shape {(rows, k)}, "
                                 f"got {tuple(self.outlier_weight.shape)}")
            if k and not bool(((self.outlier_cols >= 0) & (self.outlier_cols < cols)).all()):
                raise ValueError(f"Int8Tensor.outlier_cols: indices must be in [0, {cols}), "
                                 f"got {self.outlier_cols.tolist()}")

    @property
    def numel(self) -> int:
        return int(torch.Size(self.shape).numel())

    def tensors(self) -> dict[str, torch.Tensor]:
        names = ("data", "scale", "outlier_cols", "outlier_weight")
        return {k: getattr(self, k) for k in names if getattr(self, k) is not None}

    def storage_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors().values())

    def bits_per_param(self) -> float:
        return 8 * self.storage_bytes() / self.numel


def _round_to_int8(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x (..., m) float32, scale broadcastable -> int8 codes; scale 0 (all-zero row) -> 0."""
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    return torch.round(x / safe).clamp_(-127, 127).to(torch.int8)


def quantize_int8(w: torch.Tensor, blocksize: int | None = None,
                  outlier_threshold: float | None = None) -> Int8Tensor:
    """Row-wise (blocksize=None; w viewed as (-1, last dim)) or blockwise absmax int8."""
    check_float_tensor(w, "quantize_int8 input")
    w = w.detach()
    if blocksize is not None:
        check_blocksize(blocksize)
        if outlier_threshold is not None:
            raise ValueError(f"quantize_int8: outlier_threshold works with row-wise scales only (blocksize=None), "
                             f"got blocksize={blocksize}")
        n = w.numel()
        scaled, absmax = blockwise_absmax(w, blocksize)     # scaled in [-1, 1]
        data = torch.round(scaled * 127).to(torch.int8).reshape(-1)[:n]
        return Int8Tensor(data, absmax / 127, w.shape, w.dtype, blocksize)
    if w.dim() < 1:
        raise ValueError(f"quantize_int8: row-wise needs at least 1 dimension, got shape {tuple(w.shape)}")
    rows = w.reshape(-1, w.shape[-1]).float()               # (r, c)
    cols = outlier = None
    if outlier_threshold is not None:
        if not outlier_threshold > 0:
            raise ValueError(f"quantize_int8: outlier_threshold must be > 0, got {outlier_threshold!r}")
        cols = (rows.abs().amax(dim=0) >= outlier_threshold).nonzero().view(-1)   # (k,)
        outlier = rows[:, cols].clone()                                             # (r, k)
        rows = rows.index_fill(1, cols, 0.0)                # out of the row scales
    scale = rows.abs().amax(dim=1) / 127                    # (r,)
    data = _round_to_int8(rows, scale[:, None])
    return Int8Tensor(data, scale, w.shape, w.dtype, None, cols, outlier)


def dequantize_int8(q: Int8Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Int8Tensor -> dense tensor of q.shape in `dtype` (default: the original dtype)."""
    dtype = dtype or q.dtype
    if q.blocksize is not None:
        n, bs = q.numel, q.blocksize
        vals = torch.nn.functional.pad(q.data.float(), (0, q.scale.numel() * bs - n))
        return (vals.view(-1, bs) * q.scale[:, None]).reshape(-1)[:n].to(dtype).view(q.shape)
    w = q.data.float() * q.scale.float()[:, None]           # (r, c)
    if q.outlier_cols is not None and q.outlier_cols.numel():
        w.index_copy_(1, q.outlier_cols, q.outlier_weight.float())
    return w.to(dtype).view(q.shape)


def int8_matmul(x: torch.Tensor, q: Int8Tensor, threshold: float | None = 6.0) -> torch.Tensor:
    """LLM.int8() matrix multiply, y ≈ x Ŵᵀ with the activations in int8 too (Dettmers et al.
    2022, §3.2, "mixed-precision decomposition"):

        O = {j : max_t |x_tj| ≥ threshold}                      outlier feature columns of x
        y = Σ_{j∈O} x_:j Ŵ_:jᵀ                                  in float (few columns)
          + s_x s_wᵀ ⊙ (q_x q_wᵀ)                               integer dot products over j ∉ O
    q_x: x row-wise (vector-wise) int8 with scale s_x (t,); q_w, s_w: the row-wise weight.
    x (..., in) float, q row-wise (blocksize None) for W (out, in) -> y (..., out) float32.
    Weight-side outlier columns of q (if any) join O.  threshold=None: no decomposition.
    The integer products are exact: float32 matmuls over chunks of 1024 input features
    (|partial sum| ≤ 127² · 1024 < 2^24), summed in int32.  A teaching version: the point is
    the arithmetic, not speed.
    """
    if q.blocksize is not None:
        raise ValueError("int8_matmul: needs a row-wise Int8Tensor (blocksize=None), got blockwise "
                         f"blocksize={q.blocksize}")
    rows = x.reshape(-1, x.shape[-1]).float()                        # (t, in)
    if rows.shape[1] != q.shape[-1]:
        raise ValueError(f"int8_matmul: x has {rows.shape[1]} features, the weight expects {q.shape[-1]}")
    outliers = torch.zeros(rows.shape[1], dtype=torch.bool, device=rows.device)
    if threshold is not None:
        outliers |= rows.abs().amax(dim=0) >= threshold
    if q.outlier_cols is not None:
        outliers[q.outlier_cols] = True
    cols = outliers.nonzero().view(-1)                               # (k,)
    rest = rows.index_fill(1, cols, 0.0)
    sx = rest.abs().amax(dim=1) / 127                                # (t,)
    qx = _round_to_int8(rest, sx[:, None]).float()                   # (t, in) integer-valued
    qw = q.data.float()                                              # (out, in) integer-valued
    acc = torch.zeros(rows.shape[0], qw.shape[0], dtype=torch.int32, device=rows.device)
    for k0 in range(0, rows.shape[1], 1024):
        acc += (qx[:, k0:k0 + 1024] @ qw[:, k0:k0 + 1024].t()).to(torch.int32)   # exact
    y = acc.float() * sx[:, None] * q.scale.float()[None, :]         # (t, out)
    if cols.numel():
        w_cols = dequantize_int8(q, torch.float32).index_select(1, cols)           # (out, k)
        y = y + rows.index_select(1, cols) @ w_cols.t()
    return y.view(*x.shape[:-1], -1)
