"""Mixed precision for the frozen bases: which layers keep 8 bits and which go to 4 (NF4).

Given per-layer sensitivities (e.g. Hutchinson traces, allocation.hutchinson) and
a memory budget for the base weights, every layer starts at 4 bits (the cheapest
allowed) and layers are upgraded to 8 bits greedily by sensitivity per extra byte,

    gain_i = |s_i| / (bytes_8(i) - bytes_4(i)),

highest first (ties: the earlier layer), skipping a layer whose upgrade does not
fit and going on with the next. This is the classic greedy for the 0/1 knapsack:
deterministic, optimal when the upgrades have equal cost (same shapes), and
within one item's value of the optimum otherwise (Dantzig 1957). Bytes come from
allocation.budget.base_bytes, so 4-bit includes the NF4 absmax and double
quantization overhead and 8-bit its row-wise absmax.

`plan_rank_and_precision` puts the two decisions together from the same scores:
the bit width of each base under a byte budget and the rank of each adapter under
a parameter budget (budget.ranks_from_scores): one joint configuration.
"""
from __future__ import annotations

import math
from collections.abc import Mapping

from allocation.budget import base_bytes, cost_per_rank, fixed_params, ranks_from_scores


def choose_precision(scores: Mapping[str, float], shapes: Mapping[str, tuple[int, int]], budget_bytes: int,
                     *, high_bits: int = 8, low_bits: int = 4) -> dict[str, int]:
    """name -> bits (high_bits or low_bits) with total base bytes <= budget_bytes.

    shapes: name -> (in_features, out_features). Raises if even all-`low_bits` does not fit.
    """
    names = list(scores)
    if set(names) != set(shapes):
        raise ValueError(f"choose_precision: scores and shapes name different layers: "
                         f"{sorted(set(names) ^ set(shapes))}")
    vals = [float(scores[n]) for n in names]
    if any(math.isnan(v) or math.isinf(v) for v in vals):
        raise ValueError(f"choose_precision: scores must be finite, got {vals}")
    if isinstance(budget_bytes, bool) or not isinstance(budget_bytes, (int, float)) or math.isnan(budget_bytes):
        raise ValueError(f"choose_precision: budget_bytes must be a number of bytes, got {budget_bytes!r}")
    if high_bits <= low_bits:
        raise ValueError(f"choose_precision: high_bits must be above low_bits, got {high_bits} and {low_bits}")
    low = {n: base_bytes(*shapes[n], low_bits) for n in names}
    high = {n: base_bytes(*shapes[n], high_bits) for n in names}
    used = sum(low.values())
    if used > budget_bytes:
        raise ValueError(f"choose_precision: budget {budget_bytes} bytes is below the all-{low_bits}-bit "
                         f"minimum {used} bytes")
    bits = {n: low_bits for n in names}
    gain = {n: abs(v) / max(1, high[n] - low[n]) for n, v in zip(names, vals)}
    for i in sorted(range(len(names)), key=lambda i: (-gain[names[i]], i)):
        n = names[i]
        extra = high[n] - low[n]
        if used + extra <= budget_bytes:
            bits[n] = high_bits
            used += extra
    return bits


def total_base_bytes(bits: Mapping[str, int], shapes: Mapping[str, tuple[int, int]]) -> int:
    return sum(base_bytes(*shapes[n], b) for n, b in bits.items())


def plan_rank_and_precision(scores: Mapping[str, float], shapes: Mapping[str, tuple[int, int]], *,
                            base_budget_bytes: int, adapter_budget_params: int, r_min: int = 2,
                            r_max: int = 32, method: str = "lora") -> dict[str, dict[str, int]]:
    """name -> {"bits": 4 or 8, "rank": r}: base precision and adapter rank from the same scores.

    adapter_budget_params counts all adapter parameters (including DoRA's fixed m).
    """
    bits = choose_precision(scores, shapes, base_budget_bytes)
    names = list(scores)
    costs = [cost_per_rank(*shapes[n], method) for n in names]
    fixed = sum(fixed_params(*shapes[n], method) for n in names)
    ranks = ranks_from_scores([abs(float(scores[n])) for n in names], adapter_budget_params - fixed,
                              r_min, r_max, costs)
    return {n: {"bits": bits[n], "rank": r} for n, r in zip(names, ranks)}
