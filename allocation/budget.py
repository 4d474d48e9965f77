"""What an allocation costs, exactly, and how to turn scores into integer ranks under a budget.

Accounting (all plain integers; nothing here looks at a model):

    adapter parameters of one layer W (out, in) at rank r
        LoRA / Sparse LoRA / HiRA   r (in + out)                A (r, in), B (out, r)
        DoRA                        r (in + out) + out          + magnitude m (out,)
        AdaLoRA (SVD form)          r (in + out) + r            + singular values Λ (r,)

    training bytes of n trainable parameters with AdamW
        n * (bytes(weight) + bytes(grad) + 2 * bytes(moment))    (m and v, Kingma & Ba 2015)
    a total-memory budget as the rank controller's cap on those bytes
        cap = total - (everything else the step holds)           adapter_cap_from_total

    base bytes of a frozen (out, in) weight at a bit width
        32 / 16 bit   out * in * bits / 8
        8 bit         out * in  +  4 * out        int8 codes + one fp32 absmax per row (row-wise)
        4 bit (NF4)   4 + 8/64 + 32/(64*256) bits per weight (QLoRA, Dettmers et al. 2023):
                      packed 4-bit codes, one 8-bit absmax per block of 64 weights,
                      one fp32 constant per 256 blocks (double quantization), plus one
                      fp32 mean per tensor; counted with ceilings, so it is the formula
                      plus 4 bytes when out*in is a multiple of 64*256, and the bytes a
                      quantization.nf4 tensor stores in general.

`ranks_from_scores` turns per-layer scores (sensitivities, curvatures) into
integer ranks proportional to the scores. It "water-fills": find λ such that the
real-valued ranks t_i = clip(λ s_i, r_min, r_max) spend the budget exactly, take
floor(t_i), then hand out single rank steps, largest remaining deficit t_i - r_i
first (ties: the higher score, then the earlier layer), until no further step fits. Hence the result
never exceeds the budget and no layer below r_max could take one more rank.
"""
from __future__ import annotations

import math
import numbers
import sys
from collections.abc import Mapping, Sequence

METHODS = ("lora", "sparse", "hira", "dora", "adalora")


# --- parameters ------------------------------------------------------------------------------
def cost_per_rank(in_features: int, out_features: int, method: str = "lora") -> int:
    """Parameters one more rank adds to a layer: a row of A and a column of B (and one Λ entry)."""
    _check_method(method)
    _check_features(in_features, out_features, "cost_per_rank")
    return in_features + out_features + (1 if method == "adalora" else 0)


def fixed_params(in_features: int, out_features: int, method: str = "lora") -> int:
    """Parameters that do not depend on the rank (DoRA's magnitude vector)."""
    _check_method(method)
    return out_features if method == "dora" else 0


def adapter_params(in_features: int, out_features: int, rank: int, method: str = "lora") -> int:
    """Trainable parameters of one adapter layer at `rank` (see the table at the top)."""
    if rank < 0:
        raise ValueError(f"adapter_params: rank must be >= 0, got {rank}")
    return rank * cost_per_rank(in_features, out_features, method) + fixed_params(in_features, out_features,
                                                                                  method)


# --- bytes -----------------------------------------------------------------------------------
_DTYPE_BYTES = {"float32": 4, "fp32": 4, "float16": 2, "fp16": 2, "bfloat16": 2, "bf16": 2, "float64": 8}


def dtype_bytes(dtype) -> int:
    """Bytes per element of a dtype given as a torch.dtype, a name ("bf16") or a number of bytes."""
    if isinstance(dtype, int) and not isinstance(dtype, bool):
        if dtype < 1:
            raise ValueError(f"dtype_bytes: a number of bytes must be >= 1, got {dtype}")
        return dtype
    itemsize = getattr(dtype, "itemsize", None)          # torch.dtype has .itemsize
    if isinstance(itemsize, int):
        return itemsize
    name = str(dtype).replace("torch.", "")
    if name not in _DTYPE_BYTES:
        raise ValueError(f"dtype_bytes: expected a torch dtype, one of {sorted(_DTYPE_BYTES)} or an int, "
                         f"got {dtype!r}")
    return _DTYPE_BYTES[name]


def adamw_bytes(n_params: int, dtype="float32", moment_dtype=None) -> dict[str, int]:
    """The parts of `training_bytes`: {"weights", "grads", "moments"} (m and v: 2 per parameter)."""
    w = dtype_bytes(dtype)
    m = dtype_bytes(moment_dtype) if moment_dtype is not None else w
    return {"weights": n_params * w, "grads": n_params * w, "moments": 2 * n_params * m}


def training_bytes(n_params: int, dtype="float32", moment_dtype=None) -> int:
    """Bytes n trainable parameters occupy under AdamW: weight + grad + the two moments."""
    return sum(adamw_bytes(n_params, dtype, moment_dtype).values())


def adapter_cap_from_total(total_bytes: int, other_bytes: int) -> int:
    """The rank controller's `memory_cap_bytes` (adapter training bytes) under a total budget.

    other_bytes: everything else a training step holds at its peak (base weights, activations,
    logits, ...; trainers.plan counts it with the same formulas). Counting the adapters'
    gradients in the cap as well keeps the whole step under `total_bytes`, whether the peak
    comes while activations are alive (no adapter gradients yet) or after (all of them)."""
    if total_bytes <= other_bytes:
        raise ValueError(f"adapter_cap_from_total: total_bytes={total_bytes} leaves nothing for the adapters; "
                         f"the rest of the step already needs other_bytes={other_bytes}")
    return int(total_bytes - other_bytes)


def base_bits_per_param(bits: int) -> float:
    """Average storage bits of one frozen weight; 4-bit is 4 + 8/64 + 32/(64*256) (NF4 + DQ)."""
    if bits == 4:
        return 4 + 8 / 64 + 32 / (64 * 256)
    if bits == 8:
        return 8.0   # plus 4 bytes per output row, see base_bytes
    if bits in (16, 32):
        return float(bits)
    raise ValueError(f"base_bits_per_param: bits must be 4, 8, 16 or 32, got {bits}")


def base_bytes(in_features: int, out_features: int, bits: int, *, blocksize: int = 64,
               dq_blocks: int = 256) -> int:
    """Bytes of a frozen (out, in) base weight at `bits` (bias not included)."""
    _check_features(in_features, out_features, "base_bytes")
    n = in_features * out_features
    if bits in (16, 32):
        return n * bits // 8
    if bits == 8:
        return n + 4 * out_features                      # int8 codes + fp32 absmax per row
    if bits == 4:
        n_blocks = math.ceil(n / blocksize)
        return math.ceil(n / 2) + n_blocks + 4 * math.ceil(n_blocks / dq_blocks) + 4
    raise ValueError(f"base_bytes: bits must be 4, 8, 16 or 32, got {bits}")


def _check_features(in_features, out_features, where: str) -> None:
    for what, v in (("in_features", in_features), ("out_features", out_features)):
        if isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < 1:
            raise ValueError(f"{where}: {what} must be a positive int, got {v!r}")


def _check_method(method: str) -> None:
    if method not in METHODS:
        raise ValueError(f"budget: method must be one of {METHODS}, got {method!r}")


# --- scores -> ranks -------------------------------------------------------------------------
def ranks_from_scores(scores, budget: float, r_min: int, r_max: int, cost_per_rank=1):
    """Integer ranks proportional to `scores` with sum_i cost_i * r_i <= budget, using it fully.

    scores: a sequence of non-negative floats, or a mapping name -> score (then a dict
    name -> rank comes back, in the same order). cost_per_rank: one number for all
    layers or one per layer (e.g. in + out parameters per rank). All-zero scores
    mean "no preference" (equal shares). Raises ValueError for NaN/inf/negative
    scores, r_min > r_max, or a budget below the minimum sum_i cost_i * r_min.
    """
    names = list(scores.keys()) if isinstance(scores, Mapping) else None
    s = [float(v) for v in (scores.values() if names is not None else scores)]
    n = len(s)
    if n == 0:
        raise ValueError("ranks_from_scores: no scores given")
    if any(math.isnan(v) or math.isinf(v) for v in s):
        raise ValueError(f"ranks_from_scores: scores must be finite, got NaN/inf in {s}")
    if any(v < 0 for v in s):
        raise ValueError(f"ranks_from_scores: scores must be >= 0 (use magnitudes), got {min(s)}")
    if isinstance(r_min, bool) or isinstance(r_max, bool) or int(r_min) != r_min or int(r_max) != r_max:
        raise ValueError(f"ranks_from_scores: r_min and r_max must be ints, got {r_min!r}, {r_max!r}")
    r_min, r_max = int(r_min), int(r_max)
    if r_min < 0 or r_min > r_max:
        raise ValueError(f"ranks_from_scores: need 0 <= r_min <= r_max, got r_min={r_min}, r_max={r_max}")
    c = list(cost_per_rank) if isinstance(cost_per_rank, Sequence) else [cost_per_rank] * n
    if len(c) != n:
        raise ValueError(f"ranks_from_scores: {n} scores but {len(c)} costs per rank")
    if any(not (ci > 0) or math.isinf(ci) for ci in c):
        raise ValueError(f"ranks_from_scores: costs per rank must be positive and finite, got {c}")
    minimum = sum(ci * r_min for ci in c)
    if math.isnan(budget) or budget < minimum:
        raise ValueError(f"ranks_from_scores: budget {budget} is below the minimum allocation "
                         f"sum(cost * r_min) = {minimum}")
    top, raw = max(s), s
    s = [v / top for v in s] if top > 0 else [1.0] * n    # only the ratios matter

    targets = _water_fill(s, c, budget, r_min, r_max)            # real-valued, sum c*t <= budget
    ranks = [min(r_max, max(r_min, math.floor(t))) for t in targets]
    left = budget - sum(ci * ri for ci, ri in zip(c, ranks))
    while True:   # one rank step at a time to the largest deficit that still fits
        best = None
        for i in range(n):
            if ranks[i] < r_max and c[i] <= left and (best is None or (targets[i] - ranks[i], raw[i])
                                                      > (targets[best] - ranks[best], raw[best])):
                best = i
        if best is None:
            break
        ranks[best] += 1
        left -= c[best]
    return dict(zip(names, ranks)) if names is not None else ranks


def _water_fill(s: list[float], c: list, budget: float, r_min: int, r_max: int) -> list[float]:
    """t_i = clip(λ s_i, r_min, r_max) with λ chosen (bisection) so sum c_i t_i ~ budget, never above."""
    def spend(lam: float) -> float:
        return sum(ci * min(r_max, max(r_min, lam * si)) for si, ci in zip(s, c))

    saturated = sum(ci * (r_max if si > 0 else r_min) for si, ci in zip(s, c))   # spend(λ -> inf)
    lo, hi = 0.0, 1.0
    # λ stops at the largest float: a subnormal score (1e-313) would need a λ beyond it, and an
    # infinite λ would make every bisection midpoint inf. Such a score then gets r_min here, as a
    # zero score does, and the rank steps of ranks_from_scores hand it what is left.
    while spend(hi) < min(budget, saturated) and hi < sys.float_info.max:
        hi = min(hi * 2.0, sys.float_info.max)
    for _ in range(200):
        mid = lo + 0.5 * (hi - lo)                                # no overflow near the largest float
        if spend(mid) <= budget:
            lo = mid
        else:
            hi = mid
    return [min(r_max, max(r_min, lo * si)) for si in s]
