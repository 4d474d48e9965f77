"""Budget accounting, ranks_from_scores and the 8/4-bit choice."""
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from allocation.budget import (adapter_params, base_bits_per_param, base_bytes, ranks_from_scores,
                               training_bytes)
from allocation.precision import choose_precision, plan_rank_and_precision, total_base_bytes
from lora.dora import DoRALinear
from lora.layers import LoRALinear
from lora.svd import SVDLoRALinear


def _count(layer):
    return sum(p.numel() for p in layer.adapter_parameters())


@pytest.mark.parametrize("cls,method", [(LoRALinear, "lora"), (DoRALinear, "dora"), (SVDLoRALinear, "adalora")])
@pytest.mark.parametrize("rank", [1, 3, 8])
def test_adapter_params_match_real_layers(cls, method, rank):
    layer = cls(torch.nn.Linear(11, 7), rank=rank)
    assert adapter_params(11, 7, rank, method) == _count(layer)


def test_training_bytes_is_weights_grads_and_two_moments():
    assert training_bytes(10, torch.float32) == 10 * 4 * 4
    assert training_bytes(10, "bf16") == 10 * 2 * 4
    assert training_bytes(10, torch.bfloat16, moment_dtype=torch.float32) == 10 * (2 + 2 + 4 + 4)


def test_base_bytes_formulas():
    n_in, n_out = 256, 64 * 4          # n = 65536, a multiple of 64 * 256
    assert base_bytes(n_in, n_out, 32) == n_in * n_out * 4
    assert base_bytes(n_in, n_out, 16) == n_in * n_out * 2
    assert base_bytes(n_in, n_out, 8) == n_in * n_out + 4 * n_out
    # NF4 + double quant: QLoRA's 4 + 8/64 + 32/(64*256) bits per weight, plus one fp32 mean per tensor
    assert base_bytes(n_in, n_out, 4) == n_in * n_out * base_bits_per_param(4) / 8 + 4
    with pytest.raises(ValueError, match="bits"):
        base_bytes(4, 4, 3)


@pytest.mark.parametrize("shape", [(7, 13), (64, 256), (300, 129)])
def test_base_bytes_match_quantization_storage(shape):
    nf4 = pytest.importorskip("quantization.nf4")
    int8 = pytest.importorskip("quantization.int8")
    w = torch.randn(*shape)
    assert base_bytes(shape[1], shape[0], 4) == nf4.quantize_nf4(w).storage_bytes()
    assert base_bytes(shape[1], shape[0], 8) == int8.quantize_int8(w).storage_bytes()


# --- ranks_from_scores ------------------------------------------------------------------------
scores_st = st.lists(st.floats(0.0, 100.0, allow_nan=False), min_size=1, max_size=8)


@settings(max_examples=150, deadline=None, database=None)
@given(scores=scores_st, r_min=st.integers(0, 4), span=st.integers(0, 30), data=st.data())
def test_ranks_use_budget_fully_and_never_exceed(scores, r_min, span, data):
    n = len(scores)
    r_max = r_min + span
    costs = data.draw(st.lists(st.integers(1, 50), min_size=n, max_size=n))
    minimum = sum(c * r_min for c in costs)
    budget = data.draw(st.integers(minimum, minimum + sum(costs) * (span + 2)))
    ranks = ranks_from_scores(scores, budget, r_min, r_max, costs)
    spent = sum(c * r for c, r in zip(costs, ranks))
    assert spent <= budget
    assert all(r_min <= r <= r_max for r in ranks)
    left = budget - spent
    assert not any(r < r_max and c <= left for r, c in zip(ranks, costs)), "a further rank step fits"
    assert ranks == ranks_from_scores(list(scores), budget, r_min, r_max, list(costs))   # deterministic


@settings(max_examples=100, deadline=None, database=None)
@given(scores=scores_st, budget=st.integers(16, 400), power=st.integers(-8, 8))
def test_equal_costs_ranks_are_monotone_in_scores_and_scale_free(scores, budget, power):
    n = len(scores)
    budget = max(budget, 2 * n)
    ranks = ranks_from_scores(scores, budget, 2, 32)
    for i in range(n):
        for j in range(n):
            if scores[i] > scores[j]:
                assert ranks[i] >= ranks[j]
    scaled = [s * 2.0 ** power for s in scores]
    if all(x * 2.0 ** -power == s for x, s in zip(scaled, scores)):     # exact (not lost among subnormals)
        assert ranks == ranks_from_scores(scaled, budget, 2, 32)


def test_ranks_proportional_and_ties_stable():
    assert ranks_from_scores([1, 2, 4, 8], 15 * 4, 1, 64) == [4, 8, 16, 32]
    # equal scores, 10 ranks over 3 layers: the extra step goes to the earliest layer
    assert ranks_from_scores([5.0, 5.0, 5.0], 10, 1, 10) == [4, 3, 3]
    assert ranks_from_scores({"b": 1.0, "a": 1.0}, 5, 1, 10) == {"b": 3, "a": 2}
    assert ranks_from_scores([0.0, 0.0], 8, 1, 10) == [4, 4]          # no preference: equal shares
    assert ranks_from_scores([1.0, 0.0], 8, 1, 10) == [7, 1]


def test_subnormal_score_is_ranked_like_a_tiny_one_not_the_largest():
    # 2.2e-313 / 2 needs a water level beyond the largest float: the result must still be
    # monotone in the scores (it once gave [31, 30, 30, 30, 30, 30]) and use the budget fully.
    scores = [1.0, 1.0, 1.0, 1.0, 2.0, 2.2250738585e-313]
    ranks = ranks_from_scores(scores, 181, 2, 32)
    assert ranks == [32, 32, 32, 32, 32, 21] == ranks_from_scores(scores[:5] + [0.0], 181, 2, 32)
    assert ranks_from_scores([v * 2.0 ** -8 for v in scores], 181, 2, 32) == ranks
    # equal deficits: the extra rank goes to the higher score (the tiny one), not the earlier zero
    assert ranks_from_scores([0.0, 100.0, 5e-324], 37, 2, 32) == [2, 32, 3]


def test_ranks_bad_input():
    with pytest.raises(ValueError, match="below the minimum"):
        ranks_from_scores([1.0, 2.0], 3, 2, 8)
    with pytest.raises(ValueError, match="r_min"):
        ranks_from_scores([1.0, 2.0], 100, 9, 8)
    with pytest.raises(ValueError, match="finite"):
        ranks_from_scores([1.0, math.nan], 100, 2, 8)
    with pytest.raises(ValueError, match=">= 0"):
        ranks_from_scores([1.0, -1.0], 100, 2, 8)
    with pytest.raises(ValueError, match="costs"):
        ranks_from_scores([1.0, 1.0], 100, 2, 8, [1, 2, 3])


# --- precision ----------------------------------------------------------------------------------
@settings(max_examples=60, deadline=None, database=None)
@given(data=st.data())
def test_precision_within_budget_and_greedy_maximal(data):
    n = data.draw(st.integers(1, 6))
    shapes = {f"l{i}": (data.draw(st.integers(8, 96)), data.draw(st.integers(8, 96))) for i in range(n)}
    scores = {k: data.draw(st.floats(0, 10, allow_nan=False)) for k in shapes}
    low = total_base_bytes({k: 4 for k in shapes}, shapes)
    high = total_base_bytes({k: 8 for k in shapes}, shapes)
    budget = data.draw(st.integers(low, high + 10))
    bits = choose_precision(scores, shapes, budget)
    used = total_base_bytes(bits, shapes)
    assert used <= budget
    for k, b in bits.items():     # every layer still at 4 bits could not be upgraded
        if b == 4:
            assert used - base_bytes(*shapes[k], 4) + base_bytes(*shapes[k], 8) > budget
    assert bits == choose_precision(dict(scores), dict(shapes), budget)


def test_precision_prefers_sensitive_layers_and_errors():
    shapes = {"a": (64, 64), "b": (64, 64), "c": (64, 64)}
    one_upgrade = total_base_bytes({"a": 8, "b": 4, "c": 4}, shapes)
    assert choose_precision({"a": 1.0, "b": 5.0, "c": 2.0}, shapes, one_upgrade) == {"a": 4, "b": 8, "c": 4}
    with pytest.raises(ValueError, match="below the all-4-bit"):
        choose_precision({"a": 1.0, "b": 1.0, "c": 1.0}, shapes, 100)
    plan = plan_rank_and_precision({"a": 1.0, "b": 5.0, "c": 2.0}, shapes, base_budget_bytes=one_upgrade,
                                   adapter_budget_params=3 * 8 * 128)
    # equal shapes: ranks 24 * (1, 5, 2) / 8 = (3, 15, 6) use the uniform-r=8 budget exactly
    assert plan == {"a": {"bits": 4, "rank": 3}, "b": {"bits": 8, "rank": 15}, "c": {"bits": 4, "rank": 6}}
