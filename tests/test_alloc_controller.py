"""Curvature EMA, optimizer-state carry-over at resize, the memory cap with rollback, DRaFT-Q end to end."""
import copy

import pytest
import torch
import torch.nn as nn
from hypothesis import given, settings
from hypothesis import strategies as st

from allocation.allocator import NeverSteppedError, NullAllocator
from allocation.controller import ControllerConfig, CurvatureRankAllocator, RankController, resize_with_state
from allocation.curvature import EMA, CurvatureTracker
from lora.dora import DoRALinear
from lora.hira import HiRALinear
from lora.layers import LoRALinear

D = torch.float64
TOL = 1e-6    # float64 models; lora.base rescales B and takes SVDs in float32, so not 1e-12


# --- EMA and the curvature signal -----------------------------------------------------------------
@settings(max_examples=60, deadline=None, database=None)
@given(beta=st.floats(0.0, 0.99), signals=st.lists(st.floats(-50, 50), min_size=1, max_size=40),
       c0=st.floats(-100, 100))
def test_ema_is_a_bounded_contraction(beta, signals, c0):
    a, b = EMA(beta), EMA(beta)
    a.update(c0)
    b.update(c0 + 1.0)                  # two runs, starts one apart
    lo, hi = min(signals + [c0]), max(signals + [c0])
    for t, s in enumerate(signals, start=1):
        a.update(s), b.update(s)
        assert lo - 1e-9 <= a.value <= hi + 1e-9                        # bounded in, bounded out
        assert abs((b.value - a.value) - beta ** t) <= 1e-9 * (1 + t)   # gap shrinks exactly as beta^t


def test_ema_constant_signal_error_decays_geometrically_and_beta_checked():
    e = EMA(0.8)
    e.update(10.0)
    for t in range(1, 20):
        e.update(2.0)
        assert e.value - 2.0 == pytest.approx(8.0 * 0.8 ** t)
    with pytest.raises(ValueError, match="contraction"):
        EMA(1.0)


class _Quadratic(nn.Module):
    """A stand-in 'layer' whose adapter parameter sees the loss c/2 ||θ||^2 (Hessian c I)."""

    def __init__(self, n):
        super().__init__()
        self.theta = nn.Parameter(torch.randn(n, dtype=D))

    def adapter_parameters(self):
        return [self.theta]


def test_tracker_signals_from_gradients_only():
    layer = _Quadratic(6)
    grad_sq, secant = CurvatureTracker(0.5, "grad_sq"), CurvatureTracker(0.5, "secant")
    opt = torch.optim.SGD(layer.parameters(), lr=0.1)
    for step in range(4):
        (0.5 * 3.0 * layer.theta.square().sum()).backward()
        raw = grad_sq.update([("l", layer)])
        assert raw["l"] == pytest.approx(layer.theta.grad.square().mean().item())
        raw = secant.update([("l", layer)])
        if step > 0:
            assert raw["l"] == pytest.approx(3.0)                        # ||g_t - g_t-1|| / ||Δθ|| = c
        opt.step(), opt.zero_grad()
    assert set(secant.scores()) == {"l"}


# --- resize with optimizer state ------------------------------------------------------------------
class Net(nn.Module):
    def __init__(self, cls=LoRALinear, ranks=(4, 4, 4), base=None):
        super().__init__()
        dims = [6, 8, 8, 5]
        self.layers = nn.ModuleList()
        for i, r in enumerate(ranks):
            lin = nn.Linear(dims[i], dims[i + 1]).to(D)
            self.layers.append(cls(base(lin) if base else lin, rank=r))

    def forward(self, x):
        for i, layer in enumerate(self.layers):
            x = layer(x)
            x = torch.tanh(x) if i < len(self.layers) - 1 else x
        return x


def _train(net, opt, x, steps, alloc=None):
    for step in range(1, steps + 1):
        loss = net(x).square().mean()
        loss.backward()
        if alloc:
            alloc.on_step(step, net, opt)
        opt.step()
        if alloc:
            alloc.after_step(step, net, opt)
        opt.zero_grad(set_to_none=True)


def _adamw(net):
    return torch.optim.AdamW([p for p in net.parameters() if p.requires_grad], lr=0.05)


def _grads(net, x, layer):
    net.zero_grad(set_to_none=True)
    net(x).square().mean().backward()
    return layer.lora_A.grad.clone(), layer.lora_B.grad.clone()


def _set_first_moment_to_grad(opt, layer, gA, gB):
    opt.state[layer.lora_A]["exp_avg"] = gA.clone()
    opt.state[layer.lora_B]["exp_avg"] = gB.clone()


@pytest.mark.parametrize("cls", [LoRALinear, DoRALinear, HiRALinear])
def test_grow_keeps_function_and_moments_follow_the_chain_rule(cls):
    tol = TOL
    net, x = Net(cls), torch.randn(16, 6, dtype=D)
    opt = _adamw(net)
    _train(net, opt, x, 3)
    layer = net.layers[1]
    gA, gB = _grads(net, x, layer)
    _set_first_moment_to_grad(opt, layer, gA, gB)
    old_state = {k: {n: v.clone() for n, v in opt.state[p].items()} for k, p in
                 (("A", layer.lora_A), ("B", layer.lora_B))}
    s_old, y_old = layer.scaling, net(x).detach()
    resize_with_state(layer, 7, opt)
    ratio = layer.scaling / s_old
    assert layer.rank == 7
    assert torch.allclose(net(x), y_old, atol=tol)                      # function unchanged at the change
    stA, stB = opt.state[layer.lora_A], opt.state[layer.lora_B]
    assert torch.equal(stA["exp_avg_sq"][:4], old_state["A"]["exp_avg_sq"])
    assert torch.equal(stA["exp_avg_sq"][4:], torch.zeros(3, 8, dtype=D))
    assert torch.allclose(stB["exp_avg_sq"][:, :4], ratio ** 2 * old_state["B"]["exp_avg_sq"])
    assert torch.equal(stB["exp_avg"][:, 4:], torch.zeros(8, 3, dtype=D))
    assert stA["step"] == old_state["A"]["step"] and stB["step"] == old_state["B"]["step"]
    # the carried first moment of the surviving slots is exactly the gradient in the new parametrisation
    gA2, gB2 = _grads(net, x, layer)
    assert torch.allclose(stA["exp_avg"][:4], gA2[:4], atol=tol)
    assert torch.allclose(stB["exp_avg"][:, :4], gB2[:, :4], atol=tol)
    assert {id(p) for g in opt.param_groups for p in g["params"]} >= {id(layer.lora_A), id(layer.lora_B)}
    _train(net, opt, x, 2)                                               # and training goes on


@pytest.mark.parametrize("cls", [LoRALinear, DoRALinear, HiRALinear])
def test_exact_shrink_maps_first_moments_onto_the_new_gradients(cls):
    tol = 1e-5
    torch.manual_seed(3)
    net, x = Net(cls, ranks=(4, 5, 4)), torch.randn(16, 6, dtype=D)
    layer = net.layers[1]
    opt = _adamw(net)
    _train(net, opt, x, 1)
    with torch.no_grad():                       # B A of rank 3 < 5: shrinking to 3 keeps the function
        layer.lora_B.copy_(torch.randn(8, 5, dtype=D))
        layer.lora_A.copy_(torch.randn(5, 3, dtype=D) @ torch.randn(3, 8, dtype=D))
    gA, gB = _grads(net, x, layer)
    _set_first_moment_to_grad(opt, layer, gA, gB)
    y_old = net(x).detach()
    resize_with_state(layer, 3, opt)
    assert torch.allclose(net(x), y_old, atol=tol)
    gA2, gB2 = _grads(net, x, layer)
    assert torch.allclose(opt.state[layer.lora_A]["exp_avg"], gA2, atol=tol)
    assert torch.allclose(opt.state[layer.lora_B]["exp_avg"], gB2, atol=tol)


def test_shrink_of_svd_form_factors_keeps_the_surviving_slices():
    net, x = Net(ranks=(4, 5, 4)), torch.randn(16, 6, dtype=D)
    layer = net.layers[1]
    U, _ = torch.linalg.qr(torch.randn(8, 5, dtype=D))
    V, _ = torch.linalg.qr(torch.randn(8, 5, dtype=D))
    root = torch.tensor([5.0, 4.0, 3.0, 2.0, 1.0], dtype=D).sqrt()
    with torch.no_grad():                       # balanced SVD form: B = U sqrt(S), A = sqrt(S) V^T
        layer.lora_B.copy_(U * root)
        layer.lora_A.copy_(root[:, None] * V.t())
    opt = _adamw(net)
    _train(net, opt, x, 2)
    with torch.no_grad():
        layer.lora_B.copy_(U * root)
        layer.lora_A.copy_(root[:, None] * V.t())
    vA = opt.state[layer.lora_A]["exp_avg_sq"].clone()
    vB = opt.state[layer.lora_B]["exp_avg_sq"].clone()
    mA = opt.state[layer.lora_A]["exp_avg"].clone()
    s_old = layer.scaling
    resize_with_state(layer, 3, opt)
    ratio = layer.scaling / s_old
    assert torch.allclose(opt.state[layer.lora_A]["exp_avg_sq"], vA[:3], atol=1e-10, rtol=1e-5)
    assert torch.allclose(opt.state[layer.lora_B]["exp_avg_sq"], ratio ** 2 * vB[:, :3], atol=1e-10, rtol=1e-5)
    assert torch.allclose(opt.state[layer.lora_A]["exp_avg"].abs(), mA[:3].abs(), atol=1e-10, rtol=1e-5)  # SVD signs


# --- the cap, rollback and random request sequences -----------------------------------------------
def _snapshot(net, opt):
    params = {k: v.detach().clone() for k, v in net.state_dict().items()}
    state = [{k: v.clone() for k, v in opt.state[p].items()} for g in opt.param_groups for p in g["params"]
             if p in opt.state]
    return params, state


def _same(a, b):
    pa, sa = a
    pb, sb = b
    return pa.keys() == pb.keys() and all(torch.equal(pa[k], pb[k]) for k in pa) and len(sa) == len(sb) and all(
        x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x) for x, y in zip(sa, sb))


def test_over_cap_change_is_applied_then_rolled_back_exactly():
    net, x = Net(), torch.randn(16, 6, dtype=D)
    opt = _adamw(net)
    ctrl = RankController(net, ControllerConfig())
    ctrl.config.memory_cap_bytes = ctrl.adapter_bytes() + 100           # room for nothing bigger
    _train(net, opt, x, 3)
    before, y = _snapshot(net, opt), net(x).detach()
    assert not ctrl.apply_ranks({"layers.0": 2, "layers.1": 8}, opt)    # net growth: over the cap
    assert ctrl.n_rollbacks == 1 and ctrl.ranks() == {"layers.0": 4, "layers.1": 4, "layers.2": 4}
    assert _same(before, _snapshot(net, opt)) and torch.equal(net(x), y)
    assert ctrl.apply_ranks({"layers.0": 2, "layers.1": 5}, opt)        # within the cap: kept
    assert ctrl.adapter_bytes() <= ctrl.config.memory_cap_bytes
    _train(net, opt, x, 2)


def test_start_above_cap_and_wrong_layers_are_errors():
    net = Net()
    with pytest.raises(ValueError, match="memory_cap_bytes"):
        RankController(net, ControllerConfig(memory_cap_bytes=10))
    with pytest.raises(ValueError, match="r_min"):
        RankController(net, ControllerConfig(r_min=5, r_max=4))
    with pytest.raises(ValueError, match="no adapter layers"):
        RankController(nn.Linear(2, 2))
    with pytest.raises(ValueError, match="ControllerConfig.interval must be an int >= 1, got 0"):
        RankController(net, ControllerConfig(interval=0))


def test_a_layer_built_above_min_in_out_keeps_its_rank_through_decisions():
    net = Net(ranks=(4, 4, 7))                                  # layers.2 is 8 -> 5: rank 7 > min(in, out)
    ctrl = RankController(net, ControllerConfig(rank_step=1, r_min=2, r_max=8))
    assert ctrl.step(1, {"layers.0": 3.0, "layers.1": 2.0, "layers.2": 1.0})   # once raised for layers.2
    assert ctrl.ranks() == {"layers.0": 5, "layers.1": 4, "layers.2": 7}
    with pytest.raises(ValueError, match=r"rank of layers.2 must be an int in \[1, 7\].*got 8"):
        ctrl.apply_ranks({"layers.2": 8})
    with pytest.raises(ValueError, match=r"rank of layers.1 must be an int in \[1, 8\].*got 9"):
        ctrl.apply_ranks({"layers.1": 9})


@settings(max_examples=12, deadline=None, database=None)
@given(requests=st.lists(st.lists(st.integers(1, 9), min_size=3, max_size=3), min_size=1, max_size=5),
       slack=st.integers(0, 3000))
def test_random_requests_never_exceed_cap_and_carry_state(requests, slack):
    torch.manual_seed(0)
    net, x = Net(), torch.randn(16, 6, dtype=D)
    opt = _adamw(net)
    ctrl = RankController(net, ControllerConfig(r_min=1, r_max=9))
    ctrl.config.memory_cap_bytes = cap = ctrl.adapter_bytes() + slack
    names = [n for n, _ in ctrl.layers]
    tops = [min(layer.in_features, layer.out_features) for _, layer in ctrl.layers]
    for req in requests:
        req = [min(r, top) for r, top in zip(req, tops)]
        _train(net, opt, x, 1)
        old = ctrl.ranks()
        before, y = _snapshot(net, opt), net(x).detach()
        moments = {n: opt.state[layer.lora_A]["exp_avg_sq"].clone() for n, layer in ctrl.layers}
        kept = ctrl.apply_ranks(dict(zip(names, req)), opt)
        assert ctrl.adapter_bytes() <= cap
        assert kept == (ctrl.planned_bytes(dict(zip(names, req))) <= cap)
        if not kept:
            assert ctrl.ranks() == old and _same(before, _snapshot(net, opt))
            continue
        assert ctrl.ranks() == dict(zip(names, req))
        if all(r >= old[n] for n, r in zip(names, req)):                # grows only: same function
            assert torch.allclose(net(x), y, atol=TOL)
        for n, layer in ctrl.layers:                                     # A moments of surviving grown rows
            if layer.rank >= old[n]:
                assert torch.equal(opt.state[layer.lora_A]["exp_avg_sq"][:old[n]], moments[n])
            assert torch.all(opt.state[layer.lora_A]["exp_avg_sq"] >= 0)
            assert opt.state[layer.lora_A]["exp_avg_sq"].shape == layer.lora_A.shape


def test_plan_trims_grows_to_fill_the_cap():
    net = Net(ranks=(4, 4, 4))
    ctrl = RankController(net, ControllerConfig(rank_step=4, r_min=2, r_max=16))
    ranks = ctrl.ranks()
    ctrl.config.memory_cap_bytes = cap = ctrl.planned_bytes({**ranks, "layers.1": 6, "layers.2": 2}) + 50
    plan = ctrl.plan({"layers.0": 1.0, "layers.1": 9.0, "layers.2": 0.1})
    assert plan["layers.2"] == 2 and 4 < plan["layers.1"] < 8 and plan["layers.0"] == 4
    assert ctrl.planned_bytes(plan) <= cap < ctrl.planned_bytes({**plan, "layers.1": plan["layers.1"] + 1})


@settings(max_examples=25, deadline=None, database=None)
@given(decisions=st.lists(st.lists(st.floats(0, 10), min_size=3, max_size=3), min_size=1, max_size=6),
       slack=st.integers(0, 4000), rank_step=st.integers(1, 3))
def test_controller_decisions_fill_but_never_exceed_the_cap(decisions, slack, rank_step):
    net = Net(ranks=(2, 2, 2))
    ctrl = RankController(net, ControllerConfig(r_min=1, r_max=8, rank_step=rank_step))
    ctrl.config.memory_cap_bytes = cap = ctrl.adapter_bytes() + slack
    for step, scores in enumerate(decisions, start=1):
        scores = {n: s for (n, _), s in zip(ctrl.layers, scores)}
        old = ctrl.ranks()
        plan = ctrl.plan(scores)
        assert ctrl.step(step, scores) and ctrl.ranks() == plan
        assert ctrl.adapter_bytes() == ctrl.planned_bytes(plan) <= cap
        for n, layer in ctrl.layers:
            ceiling = min(old[n] + rank_step, 8, layer.in_features, layer.out_features)
            if plan[n] > old[n] and plan[n] < ceiling:                      # a trimmed grow: no more room
                assert ctrl.planned_bytes({**plan, n: plan[n] + 1}) > cap
    assert [h["step"] for h in ctrl.rank_history] == list(range(len(decisions) + 1))


# --- the allocator end to end ---------------------------------------------------------------------
class Fake4bit(nn.Module):
    """A duck-typed frozen quantized base: in/out features, dequantize(), no weight Parameter."""

    def __init__(self, linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.register_buffer("codes", (linear.weight.detach() * 8).round())
        self.register_buffer("b", linear.bias.detach().clone())

    def dequantize(self, dtype=None):
        return self.codes / 8

    def forward(self, x):
        return x @ self.dequantize().t() + self.b


def test_draftq_trains_under_the_cap_on_a_4bit_style_base():
    torch.manual_seed(0)
    net, x = Net(base=Fake4bit), torch.randn(32, 6, dtype=D)
    opt = _adamw(net)
    probe = RankController(copy.deepcopy(net))
    cap = probe.adapter_bytes() + 400
    alloc = CurvatureRankAllocator(net, ControllerConfig(interval=2, r_min=2, r_max=8, memory_cap_bytes=cap))
    loss0 = net(x).square().mean().item()
    for step in range(1, 13):
        loss = net(x).square().mean()
        loss.backward()
        alloc.on_step(step, net, opt)
        opt.step()
        y = net(x).detach()
        before = alloc.controller.ranks()
        alloc.after_step(step, net, opt)
        opt.zero_grad(set_to_none=True)
        assert alloc.controller.adapter_bytes() <= cap
        after = alloc.controller.ranks()
        if all(after[n] >= before[n] for n in after):
            assert torch.allclose(net(x), y, atol=TOL)
    assert net(x).square().mean().item() < loss0
    hist = alloc.rank_history
    assert [h["step"] for h in hist] == [0, 2, 4, 6, 8, 10, 12]
    assert any(h["ranks"] != hist[0]["ranks"] for h in hist)
    alloc.finish(12)
    state = alloc.state_dict()
    fresh = CurvatureRankAllocator(net, ControllerConfig(interval=2, r_min=2, r_max=8, memory_cap_bytes=cap))
    fresh.load_state_dict(state)
    assert fresh.rank_history == hist and fresh.tracker.scores() == alloc.tracker.scores()


def test_real_4bit_base_if_available():
    layers = pytest.importorskip("quantization.layers")
    torch.manual_seed(0)
    lin = nn.Linear(64, 64)
    layer = LoRALinear(layers.Linear4bit.from_linear(lin), rank=4)
    opt = torch.optim.AdamW(layer.adapter_parameters(), lr=0.01)
    x = torch.randn(8, 64)
    layer(x).square().mean().backward()
    opt.step()
    y = layer(x).detach()
    resize_with_state(layer, 8, opt)
    assert torch.allclose(layer(x), y, atol=1e-5)
    layer(x).square().mean().backward()
    opt.step()


def test_finish_raises_when_never_stepped():
    net = Net()
    alloc = CurvatureRankAllocator(net)
    with pytest.raises(NeverSteppedError, match="never stepped: training ran as plain LoRA"):
        alloc.finish(10)
    NullAllocator(net).finish(10)
    assert NullAllocator(net).rank_history[0]["ranks"] == {"layers.0": 4, "layers.1": 4, "layers.2": 4}


def test_plan_fills_free_budget_without_shrinking():
    net = Net(ranks=(4, 4, 4))
    ctrl = RankController(net, ControllerConfig(rank_step=2, r_min=2, r_max=16, n_change=2))
    ctrl.config.memory_cap_bytes = ctrl.planned_bytes({n: 8 for n in ctrl.ranks()})
    plan = ctrl.plan({"layers.0": 1.0, "layers.1": 9.0, "layers.2": 0.1})
    assert plan == {"layers.0": 6, "layers.1": 6, "layers.2": 4}       # room left: nobody shrinks


def test_spread_signal_is_the_gradient_energy_beyond_each_factors_leading_direction():
    """signal="spread": a rank-one gradient scores 0, whatever its size; otherwise ||g||^2 - σ_1^2 per
    parameter, summed over A and B (checked against the eigenvalues of g g^T)."""
    torch.manual_seed(0)
    layer = LoRALinear(nn.Linear(6, 5), rank=3)
    tracker = CurvatureTracker(0.5, "spread")
    u, v = torch.randn(5, 1), torch.randn(1, 3)
    layer.lora_B.grad, layer.lora_A.grad = 100 * u @ v, torch.zeros(3, 6)      # huge but rank one
    assert tracker.update([("l", layer)])["l"] == pytest.approx(0.0, abs=1e-3)
    gB, gA = torch.randn(5, 3), torch.randn(3, 6)
    layer.lora_B.grad, layer.lora_A.grad = gB.clone(), gA.clone()
    beyond = sum(float(torch.linalg.eigvalsh(g @ g.T)[:-1].sum()) for g in (gB, gA))  # all but the top σ^2
    assert tracker.update([("l", layer)])["l"] == pytest.approx(beyond / (15 + 18), rel=1e-4)
    assert CurvatureTracker(0.5, "grad_sq").update([("l", layer)])["l"] > beyond / 33


def test_the_configs_know_every_curvature_signal():
    from allocation.curvature import SIGNALS
    from trainers.configs import SIGNALS as CONFIG_SIGNALS
    assert CONFIG_SIGNALS == SIGNALS
