"""What every adapter layer shares: a frozen base, merge/unmerge, and low-rank resizing.

An adapter wraps a frozen base layer and adds a trainable correction

    y = base_layer(x) + delta(x)

The base may be an `nn.Linear`, a quantized Linear-like layer or a transformers
`Conv1D`; lora/layout.py says which layers qualify and how W0 is read as (out, in)
whatever the base stores. The argument checks live in lora/checks.py, the low-rank
math (scaling, SVD of B @ A, resizing the factors) in lora/low_rank.py; this file
holds the two classes built on them, and re-exports those names, which other
modules import from here.

Dtypes: the adapter's parameters have their own dtype (by default the base
weight's). The delta is computed in that dtype and the sum is returned in the
dtype of the base layer's output, so a bf16 base with an fp32 adapter gives bf16.

Scaling across `resize`: `scaling` is always `alpha / r` (or `alpha / sqrt(r)`
with rsLoRA) for the current r, as in PEFT. By default `alpha` never changes, so a
saved adapter means the same thing with per-layer ranks in `rank_pattern`, and when the
rank changes B is multiplied by `old_scaling / new_scaling`, so the product
`scaling * B @ A` (and the layer's output) is unchanged. That makes the layer's step
size under Adam jump with the rank (Adam moves B by ~lr per entry whatever its scale,
so the output moves by ~scaling * lr): `resize(k, keep_scaling=True)` instead lets
alpha follow the rank (alpha / r stays put, like `alpha_pattern = 2 r`), so B is left as
it is and the step size stays the same; the new alpha is the layer's, saved per layer. Growing keeps the rows of
A bit-for-bit at `[:r_old]` and the columns of B at `[:, :r_old]` (times that
factor); carried-over Adam moments for B are then off by the same constant factor.
"""
from __future__ import annotations

import torch
import torch.nn as nn
from torch import Tensor

from lora.checks import (check_alpha, check_base, check_dropout, check_dtype, check_finite,  # noqa: F401
                         check_flag, check_rank)
from lora.layout import (base_weight, in_out_features, is_conv1d, is_linear_like, is_quantized,  # noqa: F401
                         module_device, weight_layout)
from lora.low_rank import (kaiming_rows_, lora_scaling, product_svd, resized_low_rank,  # noqa: F401
                           work_dtype)

QUANTIZED_MERGE_ERROR = (
    "merge into a quantized base: the base layer {kind} stores packed low-bit weights, so an in-place "
    "merge would have to requantize and lose the update; use lora.merge_lora_weights(model) (replaces the "
    "adapter by a plain nn.Linear holding the dequantized W + delta W), then "
    "quantization.requantize_merged(model, bits) "
    "to build a new quantized layer from the merged weight")


def _set_data(*pairs: tuple[nn.Parameter, Tensor]) -> None:
    """Swap the storage of each (Parameter, new data), keeping the objects (optimizers keep
    referencing them) and clearing `.grad` (an old-shaped gradient cannot be accumulated into
    the new shape). All or none: if one swap fails, the earlier ones are put back."""
    new = [(param, data.contiguous()) for param, data in pairs]
    old = [(param, param.data, param.grad) for param, _ in new]
    try:
        for param, data in new:
            _assign(param, data)
    except BaseException:
        for param, data, grad in old:
            param.data, param.grad = data, grad
        raise


def _assign(param: nn.Parameter, data: Tensor) -> None:
    param.data = data
    param.grad = None


class AdapterLayer(nn.Module):
    """Common base of the adapter layers: a frozen `base_layer` plus a trainable correction.

    Subclasses define `get_delta_weight()` (out, in) and `forward`. `merge()` adds
    the delta into a float base (nn.Linear, or a Conv1D through its transposed view)
    in place, remembering the original weight so `unmerge()` restores it bit-for-bit;
    merging is always an explicit call.

    All-or-nothing: a subclass checks every argument of its own (and reads whatever it
    needs from W0) BEFORE calling `AdapterLayer.__init__`, the first step that changes
    the base (it freezes it), so a rejected constructor leaves the base layer untouched.
    """

    def __init__(self, base_layer: nn.Module, *, dtype: torch.dtype | None = None):
        super().__init__()
        check_base(base_layer, type(self).__name__)
        check_dtype(dtype, type(self).__name__)
        factory = self._factory_kwargs(base_layer, dtype)
        self.base_layer = base_layer
        self.in_features, self.out_features = in_out_features(base_layer)
        self.merged = False
        self._original_weight: Tensor | None = None  # set while merged
        self._factory = factory
        for p in base_layer.parameters():
            p.requires_grad_(False)

    @staticmethod
    def _factory_kwargs(base: nn.Module, dtype: torch.dtype | None) -> dict:
        """Device of the base; dtype: asked for, else the base weight's (float32 for packed weights)."""
        tensors = list(base.parameters()) + list(base.buffers())
        device = tensors[0].device if tensors else None
        if dtype is None:
            weight = getattr(base, "weight", None)
            if not is_quantized(base) and isinstance(weight, Tensor) and weight.is_floating_point():
                dtype = weight.dtype
            else:
                dtype = getattr(base, "compute_dtype", None) or torch.float32
        return {"device": device, "dtype": dtype}

    # --- the questions every adapter answers -------------------------------------------------
    def get_delta_weight(self) -> Tensor:
        raise NotImplementedError(f"{type(self).__name__} must define get_delta_weight()")

    def adapter_parameters(self) -> list[nn.Parameter]:
        """The trainable parameters: everything outside `base_layer`."""
        return [p for name, p in self.named_parameters() if not name.startswith("base_layer.")]

    def _check_mergeable(self) -> None:
        if is_quantized(self.base_layer):
            raise RuntimeError(QUANTIZED_MERGE_ERROR.format(kind=type(self.base_layer).__name__))

    def frozen_weight(self) -> Tensor:
        """W0 (out, in): the base weight as it was before any merge (dequantized for packed bases)."""
        if self.merged and self._original_weight is not None:
            return self._original_weight
        return base_weight(self.base_layer)

    def merged_weight(self) -> Tensor:
        """The weight an equivalent plain Linear would hold: W0 + delta W, in W0's dtype."""
        W = self.frozen_weight()
        return W + self.get_delta_weight().to(W.dtype)

    def merged_bias(self) -> Tensor | None:
        """The bias an equivalent plain layer would hold: the base's own (IA3 rescales it, lora/ia3.py)."""
        return getattr(self.base_layer, "bias", None)

    @torch.no_grad()
    def merge(self) -> None:
        """Write the update into the base weight; forward then runs the base alone."""
        if self.merged:
            return
        self._check_mergeable()
        weight = base_weight(self.base_layer)  # (out, in); a Conv1D's transposed view, written through
        new_weight = self.merged_weight()
        check_finite(new_weight, f"{type(self).__name__}.merge: the merged weight W0 + delta W")
        original = weight.detach().clone()
        weight.copy_(new_weight)
        self._original_weight, self.merged = original, True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Restore the base weight saved by `merge()` (bit-exact)."""
        if not self.merged:
            return
        base_weight(self.base_layer).copy_(self._original_weight)
        self._original_weight, self.merged = None, False

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, merged={self.merged}"


class LowRankAdapter(AdapterLayer):
    """An adapter with factors `lora_A` (r, in), `lora_B` (out, r) and `scaling = alpha / r`.

    Holds the shared rank bookkeeping and `resize`; subclasses define how the
    factors enter the layer (LoRA adds s B A, HiRA s W0 * (B A), DoRA normalises).
    """

    def __init__(self, base_layer: nn.Module, *, rank: int = 8, alpha: float = 16,
                 dropout: float = 0.0, use_rslora: bool = False, dtype: torch.dtype | None = None):
        self.check_arguments(type(self).__name__, rank, alpha, dropout, use_rslora)
        super().__init__(base_layer, dtype=dtype)                           # checks base, dtype; freezes
        self.alpha = alpha
        self.use_rslora = use_rslora
        self.scaling = lora_scaling(alpha, rank, use_rslora)
        self.dropout_p = float(dropout)
        # Dropout before A, as in PEFT; an Identity (never called) when p == 0.
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.lora_A = nn.Parameter(torch.empty(rank, self.in_features, **self._factory))   # (r, in)
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, rank, **self._factory))  # (out, r)
        with torch.no_grad():
            kaiming_rows_(self.lora_A)

    @staticmethod
    def check_arguments(who: str, rank, alpha, dropout, use_rslora) -> None:
        """The low-rank arguments every subclass shares (subclasses call it before reading W0)."""
        check_rank(rank, who)
        check_alpha(alpha, f"{who}: alpha")
        check_dropout(dropout, f"{who}: dropout")
        check_flag(use_rslora, f"{who}: use_rslora")

    @property
    def rank(self) -> int:
        return self.lora_A.shape[0]

    @property
    def r(self) -> int:  # PEFT's name
        return self.rank

    @torch.no_grad()
    def resize(self, new_rank: int, *, keep_scaling: bool = False) -> None:
        """Change the rank keeping `scaling * B @ A` (hence the output) unchanged.

        keep_scaling: alpha follows the rank so `scaling` stays what it was (module docstring).

        Growing: old entries stay at [:r_old], new A rows kaiming, new B columns 0.
        Shrinking: top singular directions of the current update (see
        `resized_low_rank`). The same nn.Parameter objects are kept (their `.data`
        is swapped and `.grad` cleared); optimizer state must be carried by the caller.

        Autograd caveat: a graph built before the resize (say last step's `loss`,
        still referenced) remembers the old shapes, and a later backward through
        these Parameters then fails. Drop such references first, or resize during
        training with `allocation.resize.resize_with_state`, which also moves
        the optimizer state and re-registers fresh Parameters.
        """
        self._check_resizable(new_rank, keep_scaling)
        A, B = resized_low_rank(self.lora_A.data, self.lora_B.data, new_rank)
        self._set_factors(A, B, keep_scaling)

    def _check_resizable(self, new_rank, keep_scaling: bool = False) -> None:
        """What every resize checks before changing anything: the rank, the flag, not merged, finite
        factors (an SVD of NaN factors fails halfway or spreads the NaN to every entry)."""
        name = f"{type(self).__name__}.resize"
        check_rank(new_rank, name)
        check_flag(keep_scaling, f"{name}: keep_scaling")
        if self.merged:
            raise RuntimeError(f"{name}: unmerge() before changing the rank")
        for pname, p in self.named_parameters():
            if not pname.startswith("base_layer."):
                check_finite(p, f"{name}: {pname}")

    @torch.no_grad()
    def _set_factors(self, A: Tensor, B: Tensor, keep_scaling: bool = False) -> None:
        """Install new factors A (k, in), B (out, k) whose product B @ A is meant at the OLD scaling.

        Sets `scaling` to alpha / k and multiplies B by old/new scaling, so scaling * B @ A is
        what it was meant to be; with keep_scaling, `scaling` stays and alpha becomes the value
        that gives it at rank k (scaling is linear in alpha). Keeps the Parameter objects;
        changes nothing if the swap fails.
        """
        if keep_scaling:
            alpha, new_scaling = self.scaling / lora_scaling(1.0, A.shape[0], self.use_rslora), self.scaling
        else:
            alpha, new_scaling = self.alpha, lora_scaling(self.alpha, A.shape[0], self.use_rslora)
        if new_scaling != self.scaling:
            B = (B.to(work_dtype(B)) * (self.scaling / new_scaling)).to(B.dtype)
        _set_data((self.lora_A, A), (self.lora_B, B))
        self.alpha, self.scaling = alpha, new_scaling

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}, "
                f"alpha={self.alpha}, scaling={self.scaling:.4g}, dropout={self.dropout_p}, "
                f"merged={self.merged}")
