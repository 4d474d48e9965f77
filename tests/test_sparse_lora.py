"""SparseLoRALinear: L1, magnitude pruning on a cubic schedule, structured rank pruning, masks."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from lora import LoRALinear, SparseLoRALinear, cubic_sparsity


def trained_sparse(d_in=12, d_out=10, rank=6, alpha=12.0, seed=0):
    torch.manual_seed(seed)
    layer = SparseLoRALinear(nn.Linear(d_in, d_out), rank=rank, alpha=alpha)
    with torch.no_grad():
        layer.lora_B.normal_()
    return layer


def adam_steps(layer, steps=3, l1=0.0, after_step=True, opt=None):
    opt = opt or torch.optim.Adam(layer.adapter_parameters(), lr=0.05)
    for _ in range(steps):
        x = torch.randn(8, layer.in_features)
        loss = layer(x).square().mean() + l1 * layer.l1_penalty()
        opt.zero_grad()
        loss.backward()
        opt.step()
        if after_step:
            layer.apply_masks_()
    return opt


def test_cubic_schedule_zhu_gupta():
    assert cubic_sparsity(0, 10, 110, 0.8) == 0.0
    assert cubic_sparsity(10, 10, 110, 0.8) == 0.0
    assert cubic_sparsity(110, 10, 110, 0.8) == pytest.approx(0.8)
    assert cubic_sparsity(500, 10, 110, 0.8) == pytest.approx(0.8)
    assert cubic_sparsity(60, 10, 110, 0.8) == pytest.approx(0.8 * (1 - 0.5 ** 3))
    values = [cubic_sparsity(t, 10, 110, 0.8, initial_sparsity=0.1) for t in range(0, 120)]
    assert all(b >= a for a, b in zip(values, values[1:]))          # never un-prunes
    steps = [b - a for a, b in zip(values[10:110], values[11:111])]
    assert steps[0] > steps[-1]                                       # fast early, gentle late
    with pytest.raises(ValueError, match="end step must be after start step"):
        cubic_sparsity(0, 10, 10, 0.5)
    with pytest.raises(ValueError, match="final_sparsity < 1"):
        cubic_sparsity(0, 0, 10, 1.0)


@settings(max_examples=20, deadline=None, derandomize=True)
@given(d_in=st.integers(2, 16), d_out=st.integers(2, 16), rank=st.integers(1, 5),
       sparsity=st.floats(0.0, 0.95))
def test_prune_to_hits_the_target_and_drops_the_smallest(d_in, d_out, rank, sparsity):
    layer = trained_sparse(d_in, d_out, rank)
    A_before = layer.lora_A.detach().clone()
    layer.prune_to(sparsity)
    for name, param, mask in (("A", layer.lora_A, layer.mask_A), ("B", layer.lora_B, layer.mask_B)):
        assert int((~mask).sum()) == int(round(sparsity * mask.numel())), name
        assert torch.all(param[~mask] == 0)
    kept, dropped = A_before[layer.mask_A].abs(), A_before[~layer.mask_A].abs()
    if kept.numel() and dropped.numel():
        assert float(dropped.max()) <= float(kept.min())
    nz = layer.nonzeros()
    assert nz["total"] == nz["lora_A"] + nz["lora_B"] <= int(layer.mask_A.sum() + layer.mask_B.sum())
    assert nz["dense"] == rank * (d_in + d_out)


def test_masks_only_grow_along_the_schedule_and_survive_adam():
    layer = trained_sparse()
    opt = adam_steps(layer, 2)                                        # Adam has momentum everywhere
    previous = layer.mask_A.clone()
    for step in range(0, 60, 10):
        layer.prune_to(cubic_sparsity(step, 0, 50, 0.7))
        assert not torch.any(layer.mask_A & ~previous)                # a pruned entry never returns
        previous = layer.mask_A.clone()
        adam_steps(layer, 2, opt=opt)                                 # momentum pushes on pruned entries...
        assert torch.all(layer.lora_A[~layer.mask_A] == 0)            # ...apply_masks_ puts them back at 0
        assert torch.all(layer.lora_B[~layer.mask_B] == 0)
    kept = int(layer.mask_A.sum() + layer.mask_B.sum())
    assert kept == (72 - round(0.7 * 72)) + (60 - round(0.7 * 60))   # A (6, 12), B (10, 6)
    assert layer.nonzeros()["total"] <= kept


def test_masked_entries_get_zero_grad_and_forward_ignores_them():
    layer = trained_sparse()
    opt = adam_steps(layer, 2)
    layer.prune_to(0.5)
    adam_steps(layer, 2, after_step=False, opt=opt)                   # Adam's momentum moves masked entries off 0
    assert torch.any(layer.lora_A[~layer.mask_A] != 0)
    x = torch.randn(5, 12)
    with torch.no_grad():
        A = layer.lora_A * layer.mask_A
        B = layer.lora_B * layer.mask_B
        ref = F.linear(x, layer.base_layer.weight + layer.scaling * B @ A, layer.base_layer.bias)
    y = layer(x)
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)         # forward re-applies the masks
    layer.zero_grad()
    y.sum().backward()
    assert torch.all(layer.lora_A.grad[~layer.mask_A] == 0)
    assert torch.all(layer.lora_B.grad[~layer.mask_B] == 0)


def test_l1_penalty_value_and_gradient():
    layer = trained_sparse()
    layer.prune_to(0.3)
    pen = layer.l1_penalty()
    expected = (layer.lora_A * layer.mask_A).abs().sum() + (layer.lora_B * layer.mask_B).abs().sum()
    torch.testing.assert_close(pen, expected)
    pen.backward()
    torch.testing.assert_close(layer.lora_A.grad, torch.sign(layer.lora_A.detach()) * layer.mask_A)
    before = float(layer.l1_penalty().detach())
    adam_steps(layer, 20, l1=1.0)
    assert float(layer.l1_penalty().detach()) < before                          # the penalty shrinks the factors


@settings(max_examples=15, deadline=None, derandomize=True)
@given(rank=st.integers(2, 6), data=st.data(), sparsity=st.sampled_from([0.0, 0.4]))
def test_prune_ranks_equals_dense_lora_with_kept_components(rank, data, sparsity):
    keep = data.draw(st.integers(1, rank - 1), label="keep")
    layer = trained_sparse(rank=rank)
    layer.prune_to(sparsity)
    A = (layer.lora_A * layer.mask_A).detach().clone()
    B = (layer.lora_B * layer.mask_B).detach().clone()
    importance = B.norm(dim=0) * A.norm(dim=1)
    expect_kept = torch.topk(importance, keep).indices.sort().values
    s_old = layer.scaling
    A_param = layer.lora_A

    kept = layer.prune_ranks(keep)
    assert torch.equal(kept, expect_kept)
    assert layer.rank == keep and layer.lora_A.shape == (keep, 12) and layer.lora_A is A_param
    assert layer.mask_A.shape == layer.lora_A.shape and layer.mask_B.shape == layer.lora_B.shape
    # A dense LoRA holding exactly the kept components computes the same function.
    dense = LoRALinear(nn.Linear(12, 10), rank=keep, alpha=layer.alpha)
    with torch.no_grad():
        dense.base_layer.load_state_dict(layer.base_layer.state_dict())
        dense.lora_A.copy_(A[kept])
        dense.lora_B.copy_(B[:, kept] * (s_old / dense.scaling))
    x = torch.randn(7, 12)
    torch.testing.assert_close(layer(x), dense(x), rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        ref = F.linear(x, layer.base_layer.weight + s_old * B[:, kept] @ A[kept], layer.base_layer.bias)
    torch.testing.assert_close(layer(x), ref, rtol=1e-5, atol=1e-5)
    adam_steps(layer, 2)                                              # still trains at the new rank
    assert torch.all(layer.lora_A[~layer.mask_A] == 0)


def test_prune_ranks_bad_input():
    layer = trained_sparse(rank=3)
    with pytest.raises(ValueError, match="keep must be <= rank 3, got 4"):
        layer.prune_ranks(4)
    with pytest.raises(ValueError, match="rank must be a positive int, got 0"):
        layer.prune_ranks(0)
    with pytest.raises(ValueError, match=r"sparsity must be in \[0, 1\), got 1.0"):
        layer.prune_to(1.0)


def test_resize_keeps_masks_when_growing_and_output_always():
    layer = trained_sparse(rank=4)
    layer.prune_to(0.5)
    x = torch.randn(6, 12)
    with torch.no_grad():
        y = layer(x)
        mask_A = layer.mask_A.clone()
        layer.resize(6)
        assert torch.equal(layer.mask_A[:4], mask_A) and bool(layer.mask_A[4:].all())
        torch.testing.assert_close(layer(x), y, rtol=1e-5, atol=1e-5)
        layer.prune_ranks(4)                                         # the two new components are zero: dropped
        torch.testing.assert_close(layer(x), y, rtol=1e-5, atol=1e-5)
        assert torch.equal(layer.mask_A, mask_A)
