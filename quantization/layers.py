"""Frozen quantized drop-ins for nn.Linear: Linear4bit (NF4) and Linear8bit (int8).

`from_linear` also takes a transformers `Conv1D` (Hugging Face GPT-2's projections,
y = x W + b with W stored (in, out)): the quantized layer stores Wᵀ (out, in) like any
other, so it is an ordinary Linear-like layer to everything above (QLoRA included).

Both compute  y = x Ŵᵀ + b  where Ŵ = dequant(stored weight) is rebuilt on the fly in
the compute dtype.  The weight is frozen: no gradient for it, but x gets one,

    ∂L/∂x = ∂L/∂y · Ŵ        (..., out) @ (out, in) -> (..., in)

and Ŵ is dequantized AGAIN in the backward pass instead of being saved by autograd
between forward and backward: only the packed codes stay alive, which is the memory
saving QLoRA is about (Dettmers et al. 2023, §3 "QLoRA").
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from .int8 import Int8Tensor, dequantize_int8, quantize_int8
from .blockwise import check_blocksize
from .nf4 import DQ_BLOCKSIZE, FLOAT_DTYPES, NF4Tensor, dequantize_nf4, quantize_nf4


def is_conv1d(module: nn.Module) -> bool:
    """A transformers-style `Conv1D`: int `nx` (in) and `nf` (out) and a weight (nx, nf).
    (The same duck-typed rule as lora.base.is_conv1d: the two packages import neither each other
    nor transformers.)"""
    nx, nf, weight = getattr(module, "nx", None), getattr(module, "nf", None), getattr(module, "weight", None)
    return (not isinstance(module, nn.Linear) and isinstance(nx, int) and isinstance(nf, int)
            and isinstance(weight, torch.Tensor) and tuple(weight.shape) == (nx, nf))


def in_out_features(layer: nn.Module) -> tuple[int, int]:
    """(in_features, out_features) of an nn.Linear-like layer, or a Conv1D's (nx, nf)."""
    if is_conv1d(layer):
        return int(layer.nx), int(layer.nf)
    return int(layer.in_features), int(layer.out_features)


def linear_weight(layer: nn.Module) -> torch.Tensor:
    """The (out, in) float weight of an nn.Linear, or of a Conv1D (its (in, out) weight transposed:
    a contiguous copy, which is fine here since the float weight is discarded once quantized)."""
    if is_conv1d(layer):
        return layer.weight.detach().t().contiguous()
    if not isinstance(layer, nn.Linear):
        raise TypeError(f"expected an nn.Linear or a Conv1D (nx, nf, weight (nx, nf)), got {type(layer).__name__}")
    return layer.weight.detach()


class DequantLinearFunction(torch.autograd.Function):
    """y = F.linear(x, dequant(dtype), bias); the backward re-dequantizes (saves no weight)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, bias: torch.Tensor | None,
                dequant: Callable[[torch.dtype], torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
        ctx.dequant, ctx.dtype, ctx.x_dtype = dequant, dtype, x.dtype
        ctx.b_dtype = None if bias is None else bias.dtype
        return F.linear(x, dequant(dtype), bias)          # the (out, in) weight dies here

    @staticmethod
    def backward(ctx, grad_y: torch.Tensor):
        # grad_y may come back in another dtype (autocast ran the forward matmul): cast to
        # the compute dtype here and hand each gradient back in its input's dtype.
        grad_x = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = (grad_y.to(ctx.dtype) @ ctx.dequant(ctx.dtype)).to(ctx.x_dtype)   # (..., out) @ (out, in)
        if ctx.needs_input_grad[1]:                        # only if someone unfroze the bias
            grad_b = grad_y.reshape(-1, grad_y.shape[-1]).sum(0).to(ctx.b_dtype)
        return grad_x, grad_b, None, None


class _FrozenQuantLinear(nn.Module):
    """What Linear4bit and Linear8bit share: the forward, the counts, dtype handling."""

    def _init_common(self, in_features: int, out_features: int, bias: bool,
                     compute_dtype: torch.dtype | None, weight_dtype: torch.dtype) -> None:
        name = type(self).__name__
        for what, value in (("in_features", in_features), ("out_features", out_features)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}: {what} must be a positive int, got {value!r}")
        if compute_dtype is not None and compute_dtype not in FLOAT_DTYPES:
            raise TypeError(f"{name}: compute_dtype must be None or float32/float16/bfloat16, got {compute_dtype!r}")
        if weight_dtype not in FLOAT_DTYPES:
            raise TypeError(f"{name}: weight_dtype must be float32/float16/bfloat16, got {weight_dtype!r}")
        self.in_features, self.out_features = in_features, out_features
        self.compute_dtype = compute_dtype      # None: compute in the input's dtype
        self.weight_dtype = weight_dtype        # dtype of the weight before quantization
        self.bias = nn.Parameter(torch.zeros(out_features), requires_grad=False) if bias else None
        self._float_constants: tuple[str, ...] = ()

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = self.compute_dtype or x.dtype
        bias = None if self.bias is None else self.bias.to(dtype)
        y = DequantLinearFunction.apply(x.to(dtype), bias, self.dequantize, dtype)
        return y.to(x.dtype)

    def true_param_count(self) -> int:
        """Parameters of the layer it stands for (in·out + bias), not the packed-byte count."""
        return self.in_features * self.out_features + (self.out_features if self.bias is not None else 0)

    def storage_bytes(self) -> int:
        """Bytes actually held: codes, scales and bias."""
        tensors = list(self.buffers(recurse=False)) + list(self.parameters(recurse=False))
        return sum(t.numel() * t.element_size() for t in tensors)

    def _apply(self, fn, recurse=True):
        # model.half() / model.to(bfloat16) must move the scales but keep them float32:
        # casting them would silently change the dequantized weights.
        kept = {name: getattr(self, name) for name in self._float_constants if getattr(self, name) is not None}
        super()._apply(fn, recurse)
        for name, old in kept.items():
            new = getattr(self, name)
            if new.dtype != old.dtype:
                self._buffers[name] = old.to(new.device)
        return self

    def extra_repr(self) -> str:
        cd = None if self.compute_dtype is None else str(self.compute_dtype).replace("torch.", "")
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, compute_dtype={cd}")


class Linear4bit(_FrozenQuantLinear):
    """Frozen NF4 linear layer (QLoRA, Dettmers et al. 2023).

        y = x · (L[q] ⊙ c)ᵀ + b
    q: 4-bit codes of W (out, in), row-major, two per byte (buffer `weight_packed`);
    c: one absmax per block of `blocksize` weights, float32 (`absmax`), or, with double
    quantization, 8-bit codes (`absmax_codes`) + one float32 per 256 of them
    (`absmax_scales`) + their mean (`absmax_mean`); L: the 16 NF4 levels.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *,
                 compute_dtype: torch.dtype | None = None, blocksize: int = 64,
                 double_quant: bool = True, weight_dtype: torch.dtype = torch.float32):
        super().__init__()
        check_blocksize(blocksize)
        self._init_common(in_features, out_features, bias, compute_dtype, weight_dtype)
        self.blocksize, self.double_quant = blocksize, double_quant
        n = in_features * out_features
        nblocks = -(-n // blocksize)
        # Empty, correctly shaped storage (filled by from_linear or load_state_dict).
        self.register_buffer("weight_packed", torch.zeros((n + 1) // 2, dtype=torch.uint8))
        if double_quant:
            self.register_buffer("absmax_codes", torch.zeros(nblocks, dtype=torch.uint8))
            self.register_buffer("absmax_scales", torch.zeros(-(-nblocks // DQ_BLOCKSIZE)))
            self.register_buffer("absmax_mean", torch.zeros(()))
            self._float_constants = ("absmax_scales", "absmax_mean")
        else:
            self.register_buffer("absmax", torch.zeros(nblocks))
            self._float_constants = ("absmax",)

    @classmethod
    def from_linear(cls, linear: nn.Module, *, compute_dtype: torch.dtype | None = None,
                    blocksize: int = 64, double_quant: bool = True) -> "Linear4bit":
        """Quantize an nn.Linear, or a Conv1D (its weight transposed to (out, in))."""
        w = linear_weight(linear)                                   # (out, in)
        layer = cls(w.shape[1], w.shape[0], linear.bias is not None,
                    compute_dtype=compute_dtype, blocksize=blocksize, double_quant=double_quant,
                    weight_dtype=w.dtype)
        layer.load_nf4(quantize_nf4(w, blocksize, double_quant))
        if linear.bias is not None:
            layer.bias = nn.Parameter(linear.bias.detach().clone(), requires_grad=False)
        return layer

    def load_nf4(self, q: NF4Tensor) -> None:
        """Take the storage of an NF4Tensor (same shape/blocksize/double-quant setting)."""
        if tuple(q.shape) != (self.out_features, self.in_features) or q.blocksize != self.blocksize \
                or q.double_quant != self.double_quant:
            raise ValueError(f"Linear4bit.load_nf4: expected shape {(self.out_features, self.in_features)}, "
                             f"blocksize {self.blocksize}, double_quant {self.double_quant}; got "
                             f"{tuple(q.shape)}, {q.blocksize}, {q.double_quant}")
        self.weight_packed = q.packed.contiguous()
        for name in self._float_constants + (("absmax_codes",) if self.double_quant else ()):
            setattr(self, name, getattr(q, name).contiguous())

    def nf4(self) -> NF4Tensor:
        """The stored weight as an NF4Tensor (views of the buffers, no copy)."""
        shape = torch.Size((self.out_features, self.in_features))
        if self.double_quant:
            return NF4Tensor(self.weight_packed, shape, self.weight_dtype, self.blocksize,
                             absmax_codes=self.absmax_codes, absmax_scales=self.absmax_scales,
                             absmax_mean=self.absmax_mean)
        return NF4Tensor(self.weight_packed, shape, self.weight_dtype, self.blocksize, absmax=self.absmax)

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """Ŵ (out, in) in `dtype` (default: compute_dtype, else the original weight dtype)."""
        return dequantize_nf4(self.nf4(), dtype or self.compute_dtype or self.weight_dtype)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", blocksize={self.blocksize}, double_quant={self.double_quant}"


class Linear8bit(_FrozenQuantLinear):
    """Frozen int8 linear layer (absmax; LLM.int8(), Dettmers et al. 2022).

        y = x · (q ⊙ s)ᵀ + b
    q: int8 codes of W (`weight_int8`, (out, in) row-wise or (out·in,) blockwise);
    s: float32 absmax/127 per output row or per block (`weight_scale`).  With an
    outlier threshold, input columns `outlier_cols` are kept in float32
    (`outlier_weight`, (out, k)); see int8.py.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *,
                 compute_dtype: torch.dtype | None = None, blocksize: int | None = None,
                 n_outlier_cols: int = 0, weight_dtype: torch.dtype = torch.float32):
        super().__init__()
        if blocksize is not None:
            check_blocksize(blocksize)
        self._init_common(in_features, out_features, bias, compute_dtype, weight_dtype)
        if isinstance(n_outlier_cols, bool) or not isinstance(n_outlier_cols, int) \
                or not 0 <= n_outlier_cols <= in_features or (n_outlier_cols and blocksize is not None):
            raise ValueError(f"Linear8bit: n_outlier_cols must be an int in [0, in_features={in_features}] "
                             f"(and 0 with blockwise scales), got {n_outlier_cols!r} with blocksize={blocksize}")
        self.blocksize = blocksize
        n = in_features * out_features
        if blocksize is None:
            self.register_buffer("weight_int8", torch.zeros(out_features, in_features, dtype=torch.int8))
            self.register_buffer("weight_scale", torch.zeros(out_features))
        else:
            self.register_buffer("weight_int8", torch.zeros(n, dtype=torch.int8))
            self.register_buffer("weight_scale", torch.zeros(-(-n // blocksize)))
        self._float_constants = ("weight_scale",)
        if n_outlier_cols:
            self.register_buffer("outlier_cols", torch.zeros(n_outlier_cols, dtype=torch.int64))
            self.register_buffer("outlier_weight", torch.zeros(out_features, n_outlier_cols))
            self._float_constants += ("outlier_weight",)
        else:
            self.outlier_cols = self.outlier_weight = None

    @classmethod
    def from_linear(cls, linear: nn.Module, *, compute_dtype: torch.dtype | None = None,
                    blocksize: int | None = None, outlier_threshold: float | None = None) -> "Linear8bit":
        """Quantize an nn.Linear, or a Conv1D (its weight transposed to (out, in))."""
        w = linear_weight(linear)                                   # (out, in)
        q = quantize_int8(w, blocksize, outlier_threshold)
        k = 0 if q.outlier_cols is None else q.outlier_cols.numel()
        layer = cls(w.shape[1], w.shape[0], linear.bias is not None,
                    compute_dtype=compute_dtype, blocksize=blocksize, n_outlier_cols=k, weight_dtype=w.dtype)
        layer.weight_int8, layer.weight_scale = q.data.contiguous(), q.scale.contiguous()
        if k:
            layer.outlier_cols, layer.outlier_weight = q.outlier_cols, q.outlier_weight.contiguous()
        if linear.bias is not None:
            layer.bias = nn.Parameter(linear.bias.detach().clone(), requires_grad=False)
        return layer

    def int8(self) -> Int8Tensor:
        shape = torch.Size((self.out_features, self.in_features))
        return Int8Tensor(self.weight_int8, self.weight_scale, shape, self.weight_dtype, self.blocksize,
                          self.outlier_cols, self.outlier_weight)

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        return dequantize_int8(self.int8(), dtype or self.compute_dtype or self.weight_dtype)

    def extra_repr(self) -> str:
        k = 0 if self.outlier_cols is None else self.outlier_cols.numel()
        return super().extra_repr() + f", blocksize={self.blocksize}, outlier_cols={k}"
