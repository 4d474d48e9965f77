"""AdaLoRA: SVD-form layer, importance and triplet scores, the cubic schedule, masking, regulariser."""
import pytest
import torch
import torch.nn as nn
from hypothesis import given, settings
from hypothesis import strategies as st

from allocation.adalora import AdaLoRAAllocator, AdaLoRAConfig, budget_schedule, orthogonal_regularizer
from allocation.allocator import NeverSteppedError
from lora.svd import SVDLoRALinear

D = torch.float64


def _layer(r=6, d_in=10, d_out=7, seed=0):
    torch.manual_seed(seed)
    layer = SVDLoRALinear(nn.Linear(d_in, d_out).to(D), rank=r, alpha=12)
    with torch.no_grad():
        layer.lora_E.copy_(torch.randn(r, 1, dtype=D))
    return layer


# --- the schedule ---------------------------------------------------------------------------------
def test_schedule_totals_at_chosen_steps():
    b = lambda t: budget_schedule(t, 100, 24, 8, 10, 20)          # noqa: E731  T=100, t_i=10, t_f=20
    assert [b(0), b(9), b(10)] == [24, 24, 24]                      # warm-up, then the cubic starts at b0
    assert b(45) == 8 + (24 - 8) // 8                               # halfway: (1/2)^3 of the gap is left
    assert b(10 + 70 // 4) == 8 + int(16 * (1 - 17 / 70) ** 3)
    assert [b(79), b(80), b(99), b(100)] == [8, 8, 8, 8]            # final phase at the target


@settings(max_examples=80, deadline=None, database=None)
@given(T=st.integers(2, 300), b0=st.integers(1, 200), data=st.data())
def test_schedule_is_monotone_between_target_and_initial(T, b0, data):
    bT = data.draw(st.integers(1, b0))
    ti = data.draw(st.integers(0, T - 1))
    tf = data.draw(st.integers(0, T - 1 - ti))
    values = [budget_schedule(t, T, b0, bT, ti, tf) for t in range(T + 1)]
    assert all(bT <= v <= b0 for v in values)
    assert all(a >= b for a, b in zip(values, values[1:]))
    assert values[0] == b0 if ti > 0 or T - tf > 0 else True
    assert values[T] == bT


# --- the SVD-form layer -----------------------------------------------------------------------------
def test_masked_triplets_contribute_nothing():
    layer = _layer()
    x = torch.randn(5, 10, dtype=D)
    keep = torch.tensor([True, False, True, False, False, True])
    layer.set_mask(keep)
    assert torch.equal(layer.lora_E[~keep], torch.zeros(3, 1, dtype=D))     # Λ zeroed
    P, L, Q = layer.lora_B[:, keep], layer.lora_E[keep], layer.lora_A[keep]
    expected = layer.base_layer(x) + layer.scaling * x @ (P @ (Q * L)).t()
    assert torch.allclose(layer(x), expected, atol=1e-12)
    assert layer.active_rank == 3
    with torch.no_grad():                       # whatever an optimizer does to a pruned Λ, it stays silent
        layer.lora_E[~keep] = 5.0
        layer.lora_A[~keep] = 3.0
    assert torch.allclose(layer(x), expected, atol=1e-12)
    layer(x).sum().backward()
    assert torch.equal(layer.lora_E.grad[~keep], torch.zeros(3, 1, dtype=D))
    assert torch.equal(layer.lora_A.grad[~keep], torch.zeros(3, 10, dtype=D))
    assert torch.allclose(layer.get_delta_weight(), layer.scaling * P @ (Q * L), atol=1e-12)


def test_svd_layer_starts_as_base_and_resizes_keeping_function():
    base = nn.Linear(10, 7).to(D)
    fresh = SVDLoRALinear(base, rank=4)
    x = torch.randn(5, 10, dtype=D)
    assert torch.equal(fresh(x), base(x))                                   # Λ = 0 at init
    layer = _layer()
    layer.set_mask(torch.tensor([True, True, False, True, True, True]))
    y = layer(x).detach()
    A, B = layer.lora_A.detach().clone(), layer.lora_B.detach().clone()
    obj = layer.lora_A
    layer.resize(9)
    assert layer.rank == 9 and layer.lora_A is obj
    assert torch.equal(layer.lora_A[:6], A) and torch.equal(layer.lora_B[:, :6], B)
    assert torch.allclose(layer(x), y, atol=1e-12)
    delta = layer.get_delta_weight().detach().float()
    S = torch.linalg.svdvals(delta)
    layer.resize(2)                                                         # best rank-2 approximation
    err = (layer.get_delta_weight().detach().float() - delta).norm()
    assert err == pytest.approx(S[2:].square().sum().sqrt().item(), rel=1e-4, abs=1e-6)
    assert layer.active_rank == 2


def test_svd_shrink_to_more_than_the_smaller_dimension_keeps_the_requested_rank():
    layer = _layer(r=6, d_in=3, d_out=5)                                    # ΔW has rank <= 3
    x = torch.randn(4, 3, dtype=D)
    y = layer(x).detach()
    layer.resize(4)                                                         # 3 SVD triplets + 1 with Λ = 0
    assert layer.rank == 4 and layer.lora_E.shape == (4, 1) and layer.rank_mask.shape == (4,)
    assert layer.lora_E[3].item() == 0.0
    assert torch.allclose(layer(x), y, atol=1e-10)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("adapter_dtype", [None, torch.float32])
def test_svd_layer_in_half_precision(dtype, adapter_dtype):
    base = nn.Linear(10, 7).to(dtype)
    layer = SVDLoRALinear(base, rank=3, alpha=6, dtype=adapter_dtype)
    assert layer.lora_E.dtype == (adapter_dtype or dtype)
    x = torch.randn(4, 10).to(dtype)
    assert torch.equal(layer(x), base(x))                                   # Λ = 0: exactly the base
    with torch.no_grad():
        layer.lora_E.normal_()
        y = layer(x)
        ref = torch.nn.functional.linear(x.float(), base.weight.float() + layer.get_delta_weight().float(),
                                         base.bias.float())
        W0 = base.weight.clone()
        layer.merge()
        y_merged = layer(x)
        layer.unmerge()
    assert y.dtype == y_merged.dtype == dtype and torch.equal(base.weight, W0)
    tol = 3e-2 if dtype == torch.bfloat16 else 4e-3
    scale = max(1.0, float(ref.abs().max()))
    assert float((y.float() - ref).abs().max()) <= tol * scale
    assert float((y_merged.float() - y.float()).abs().max()) <= tol * scale


def test_orthogonal_regularizer():
    layer = _layer(r=4)
    with torch.no_grad():
        layer.lora_B.copy_(torch.linalg.qr(torch.randn(7, 4, dtype=D))[0])
        layer.lora_A.copy_(torch.linalg.qr(torch.randn(10, 4, dtype=D))[0].t())
    assert layer.orthogonality().item() == pytest.approx(0.0, abs=1e-20)
    with torch.no_grad():
        layer.lora_B.mul_(2.0)                                              # P^T P = 4 I: ||3 I||^2 = 36
    assert layer.orthogonality().item() == pytest.approx(36.0)
    model = nn.Sequential(layer, nn.Tanh(), _layer(r=3, d_in=7, d_out=2))
    other = model[2]
    # the authors' code: the mean over the 4 factors of the unsquared norms (||3 I||_F = 6 for P, 0 for Q)
    manual = (6.0 + 0.0 + (other.lora_B.t() @ other.lora_B - torch.eye(3, dtype=D)).square().sum().sqrt() +
              (other.lora_A @ other.lora_A.t() - torch.eye(3, dtype=D)).square().sum().sqrt()) / 4
    assert orthogonal_regularizer(model).item() == pytest.approx(manual.item())
    alloc = AdaLoRAAllocator(model, AdaLoRAConfig(target_r=2, orth_reg_weight=0.25), total_steps=10)
    assert alloc.regularization(model).item() == pytest.approx(0.25 * manual.item())


# --- importance and the allocator ---------------------------------------------------------------------
class TwoLayer(nn.Module):
    def __init__(self, r=6):
        super().__init__()
        torch.manual_seed(0)
        self.a = SVDLoRALinear(nn.Linear(10, 8).to(D), rank=r)
        self.b = SVDLoRALinear(nn.Linear(8, 3).to(D), rank=r)

    def forward(self, x):
        return self.b(torch.tanh(self.a(x)))


def test_importance_and_triplet_scores_follow_the_paper():
    model, x = TwoLayer(), torch.randn(16, 10, dtype=D)
    with torch.no_grad():
        model.a.lora_E.normal_(), model.b.lora_E.normal_()
    c = AdaLoRAConfig(target_r=4, beta1=0.8, beta2=0.7)
    alloc = AdaLoRAAllocator(model, c, total_steps=10)
    model(x).square().mean().backward()
    alloc.on_step(1, model, None)
    layer = model.a
    I = {n: (getattr(layer, n) * getattr(layer, n).grad).abs() for n in ("lora_A", "lora_E", "lora_B")}
    for n, i in I.items():
        ipt = (1 - 0.8) * i                                                # Ī_1 from Ī_0 = 0
        unc = (1 - 0.7) * (i - ipt).abs()                                  # Ū_1 = (1 - β2) |I_1 - Ī_1|
        assert torch.allclose(alloc.ipt[f"a.{n}"], ipt) and torch.allclose(alloc.unc[f"a.{n}"], unc)
    s = {n: alloc.ipt[f"a.{n}"] * alloc.unc[f"a.{n}"] for n in I}
    expected = s["lora_E"][:, 0] + s["lora_B"].mean(dim=0) + s["lora_A"].mean(dim=1)
    assert torch.allclose(alloc.triplet_scores()["a"], expected)


def test_masking_follows_the_schedule_and_keeps_pruned_zero():
    model, x = TwoLayer(r=6), torch.randn(32, 10, dtype=D)
    y = torch.randn(32, 3, dtype=D)
    T = 30
    c = AdaLoRAConfig(target_r=2, tinit=4, tfinal=6, deltaT=3, orth_reg_weight=0.1)
    alloc = AdaLoRAAllocator(model, c, total_steps=T)
    assert (alloc.b0, alloc.bT) == (12, 4)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.02)
    losses = []
    for step in range(1, T + 1):
        loss = (model(x) - y).square().mean()
        losses.append(loss.item())
        (loss + alloc.regularization(model)).backward()
        alloc.on_step(step, model, opt)
        opt.step()
        alloc.after_step(step, model, opt)
        opt.zero_grad(set_to_none=True)
        total = sum(alloc.ranks().values())
        if step < c.tinit:
            assert total == 12
        elif step < T - c.tfinal and (step - c.tinit) % c.deltaT == 0:
            assert total == budget_schedule(step, T, 12, 4, c.tinit, c.tfinal)   # masked to b(t) exactly
        elif step >= T - c.tfinal:
            assert total == 4
        for layer in (model.a, model.b):                                   # pruned Λ zero after every step
            assert torch.all(layer.lora_E[layer.rank_mask == 0] == 0)
    assert losses[-1] < losses[0]
    hist = alloc.rank_history
    assert hist[0] == {"step": 0, "ranks": {"a": 6, "b": 6}} and sum(hist[-1]["ranks"].values()) == 4
    steps = [h["step"] for h in hist]
    assert steps == sorted(steps) and T - c.tfinal in steps
    alloc.finish(T)
    fresh = AdaLoRAAllocator(TwoLayer(r=6), c, total_steps=T)
    fresh.load_state_dict(alloc.state_dict())
    assert fresh.rank_history == hist and torch.equal(fresh.ipt["a.lora_E"], alloc.ipt["a.lora_E"])


def test_allocator_errors():
    model = TwoLayer(r=4)
    alloc = AdaLoRAAllocator(model, AdaLoRAConfig(target_r=2), total_steps=5)
    with pytest.raises(NeverSteppedError, match="allocator AdaLoRA was never stepped: training ran as plain LoRA"):
        alloc.finish(5)
    with pytest.raises(ValueError, match="target total rank"):
        AdaLoRAAllocator(model, AdaLoRAConfig(target_r=5), total_steps=5)
    with pytest.raises(ValueError, match="no SVDLoRALinear"):
        AdaLoRAAllocator(nn.Linear(3, 3), AdaLoRAConfig(), total_steps=5)
    with pytest.raises(ValueError, match="no pruning"):
        AdaLoRAAllocator(model, AdaLoRAConfig(target_r=2, tinit=3, tfinal=2), total_steps=5)
    with pytest.raises(ValueError, match="total_steps must be a positive int .*got None"):
        AdaLoRAAllocator(model, AdaLoRAConfig(target_r=2))       # refused where it enters, not at the first step


def test_with_model_surgery_both_adaptive_allocators_run():
    from allocation.controller import ControllerConfig, CurvatureRankAllocator
    from lora.model import add_lora_to_model
    x, y = torch.randn(32, 8), torch.randn(32, 3)
    for method, make in (("adalora", lambda m: AdaLoRAAllocator(m, AdaLoRAConfig(target_r=2, deltaT=2), 12)),
                         ("lora", lambda m: CurvatureRankAllocator(m, ControllerConfig(interval=3)))):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 3))
        add_lora_to_model(model, target_modules=["0", "2"], method=method, r=4)
        alloc = make(model)
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.02)
        for step in range(1, 13):
            loss = (model(x) - y).square().mean()
            (loss + alloc.regularization(model)).backward()
            alloc.on_step(step, model, opt)
            opt.step()
            alloc.after_step(step, model, opt)
            opt.zero_grad(set_to_none=True)
        alloc.finish(12)
        assert len(alloc.rank_history) > 1
        if method == "adalora":
            assert sum(alloc.ranks().values()) == 4
