"""Allocators refuse bad options where they enter, skip a step with a non-finite gradient for
every layer at once (never half an update), and a failed rank change or state load changes nothing."""
import math

import pytest
import torch
import torch.nn as nn

import allocation.controller as controller
from allocation.adalora import AdaLoRAAllocator, AdaLoRAConfig
from allocation.controller import ControllerConfig, CurvatureRankAllocator, RankController
from allocation.curvature import CurvatureTracker
from allocation.sparsity import SparsityAllocator
from lora.model import add_lora_to_model
from tests.snapshot import assert_unchanged, snapshot


def _net(method="lora", r=4):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 5))
    add_lora_to_model(net, target_modules=["0", "2", "4"], method=method, r=r)
    return net


def _backward(net, poison=None):
    loss = net(torch.randn(16, 6)).square().mean()
    loss.backward()
    if poison is not None:                     # a non-finite gradient in one layer only
        poison.lora_B.grad[0, 0] = float("inf")


def _opt_state(opt):
    return {id(p): {k: v.clone() for k, v in s.items()} for p, s in opt.state.items()}


# --- the curvature tracker --------------------------------------------------------------------------
@pytest.mark.parametrize("signal", ["grad_sq", "secant"])
def test_tracker_skips_a_step_with_a_non_finite_gradient_for_every_layer(signal):
    net = _net()
    alloc = CurvatureRankAllocator(net, ControllerConfig(signal=signal, interval=1))
    for step in range(2):
        _backward(net)
        alloc.on_step(step, net, None)
        with torch.no_grad():                  # move θ so the secant has a step
            for p in net.parameters():
                p.add_(0.01)
        net.zero_grad()
    before = {k: (e.value, e.count) for k, e in alloc.tracker.emas.items()}
    prev = {k: (g.clone(), t.clone()) for k, (g, t) in alloc.tracker._prev.items()}
    _backward(net, poison=net[4])              # the last layer: the ones before must not move either
    assert alloc.tracker.update(alloc.controller.layers) == {}
    assert {k: (e.value, e.count) for k, e in alloc.tracker.emas.items()} == before
    assert all(torch.equal(prev[k][0], g) and torch.equal(prev[k][1], t) for k, (g, t) in alloc.tracker._prev.items())
    assert alloc.tracker.n_skipped == 1 and alloc.tracker.last_skipped == ["4"]
    alloc.controller.plan(alloc.tracker.scores())    # no EMA left unset: plan works (was a TypeError)


def test_tracker_first_step_with_a_non_finite_gradient_leaves_no_unset_ema():
    net = _net()
    tracker = CurvatureTracker()
    layers = [(n, m) for n, m in net.named_modules() if hasattr(m, "lora_A")]
    _backward(net, poison=net[2])
    assert tracker.update(layers) == {}
    assert tracker.emas == {} and tracker.scores() == {}


def test_tracker_state_is_checked_before_it_replaces_anything():
    tracker = CurvatureTracker(0.5)
    tracker.load_state_dict({"beta": 0.5, "signal": "grad_sq", "emas": {"a": (1.0, 3)}})
    good = tracker.state_dict()
    for bad, what in (({"beta": 1.5, "signal": "grad_sq", "emas": {}}, "beta"),
                      ({"beta": 0.5, "signal": "hessian", "emas": {}}, "signal"),
                      ({"beta": 0.5, "signal": "grad_sq", "emas": {"a": (None, 0)}}, r"emas\['a'\]"),
                      ({"beta": 0.5, "signal": "grad_sq", "emas": {"a": (math.nan, 2)}}, r"emas\['a'\]"),
                      ({"beta": 0.5}, "expected a dict with beta, signal and emas")):
        with pytest.raises(ValueError, match=what):
            tracker.load_state_dict(bad)
        assert tracker.state_dict() == good


# --- options refused where they enter ------------------------------------------------------------------
@pytest.mark.parametrize("option, value", [("interval", 0), ("warmup", -1), ("r_min", 0), ("r_max", 1),
                                           ("rank_step", 0), ("n_change", 0), ("memory_cap_bytes", 0),
                                           ("beta", 1.0), ("beta", -0.1), ("signal", "hessian"),
                                           ("interval", 2.5), ("n_change", True)])
def test_controller_options_are_refused_by_name(option, value):
    kw = {"r_min": 2} if option == "r_max" else {}
    with pytest.raises(ValueError, match=f"ControllerConfig.{option} must be"):
        ControllerConfig(**kw, **{option: value})
    cfg = ControllerConfig()
    setattr(cfg, option, value)                 # edited after construction: the controller checks again
    if option == "r_max":
        cfg.r_min = 2
    with pytest.raises(ValueError, match=f"ControllerConfig.{option} must be"):
        RankController(_net(), cfg)


@pytest.mark.parametrize("option, value, match", [
    ("init_r", 0, "init_r must be an int >= 1"), ("target_r", 0, "target_r must be an int >= 1"),
    ("target_r", 20, "target_r must be <= init_r = 12"), ("tinit", -1, "tinit must be an int >= 0"),
    ("tfinal", -2, "tfinal must be an int >= 0"), ("deltaT", 0, "deltaT must be an int >= 1"),
    ("beta1", 1.0, r"beta1 must be in \[0, 1\)"), ("beta2", -0.5, r"beta2 must be in \[0, 1\)"),
    ("orth_reg_weight", -1.0, "orth_reg_weight must be a finite number >= 0"),
    ("orth_reg_weight", math.inf, "orth_reg_weight must be a finite number >= 0")])
def test_adalora_options_are_refused_by_name(option, value, match):
    with pytest.raises(ValueError, match=f"AdaLoRAConfig.{match}"):
        AdaLoRAConfig(**{option: value})


def test_adalora_total_steps_and_phases_are_checked_at_construction():
    net = _net("adalora", r=4)
    for total, match in ((0, "total_steps must be a positive int"), (None, "total_steps must be a positive int"),
                         (5, "tinit \\+ tfinal = 5 leaves no pruning phase")):
        with pytest.raises(ValueError, match=match):
            AdaLoRAAllocator(net, AdaLoRAConfig(init_r=4, target_r=2, tinit=3, tfinal=2), total)


@pytest.mark.parametrize("kw, match", [({"final_sparsity": 1.0}, "final_sparsity must be in"),
                                       ({"final_sparsity": -0.1}, "final_sparsity must be in"),
                                       ({"l1": -1e-4}, "l1 must be a finite number >= 0"),
                                       ({"l1": math.nan}, "l1 must be a finite number >= 0"),
                                       ({"total_steps": 0}, "total_steps must be a positive int")])
def test_sparsity_options_are_refused_at_construction(kw, match):
    net = _net("sparse")
    with pytest.raises(ValueError, match=f"SparsityAllocator: {match}"):
        SparsityAllocator(net, **{"total_steps": 100, **kw})


def test_plan_refuses_non_finite_or_unknown_scores():
    ctrl = RankController(_net(), ControllerConfig())
    with pytest.raises(ValueError, match="scores must be finite numbers"):
        ctrl.plan({"0": math.nan, "2": 1.0})
    with pytest.raises(ValueError, match=r"unknown layers \['9'\]"):
        ctrl.plan({"9": 1.0})


# --- AdaLoRA importance: the same all-or-nothing step -------------------------------------------------
def test_adalora_importance_skips_a_non_finite_step_for_every_layer():
    net = _net("adalora", r=4)
    alloc = AdaLoRAAllocator(net, AdaLoRAConfig(init_r=4, target_r=2), total_steps=10)
    _backward(net)
    alloc.on_step(0, net, None)
    net.zero_grad()
    before = {k: v.clone() for k, v in alloc.ipt.items()}
    _backward(net, poison=net[4])
    alloc.on_step(1, net, None)
    assert alloc.n_skipped == 1 and alloc.last_skipped == ["4.lora_B"]
    assert all(torch.equal(before[k], v) for k, v in alloc.ipt.items())
    assert all(torch.isfinite(v).all() for v in alloc.unc.values())


def test_adalora_state_is_checked_against_the_model_before_it_replaces_anything():
    net = _net("adalora", r=4)
    alloc = AdaLoRAAllocator(net, AdaLoRAConfig(init_r=4, target_r=2), total_steps=10)
    _backward(net)
    alloc.on_step(0, net, None)
    state = alloc.state_dict()
    other = AdaLoRAAllocator(_net("adalora", r=3), AdaLoRAConfig(init_r=4, target_r=2), total_steps=10)
    kept = other.state_dict()
    with pytest.raises(ValueError, match=r"ipt\['0.lora_A'\] must be a tensor of shape \(3, 6\)"):
        other.load_state_dict(state)
    assert other.state_dict().keys() == kept.keys() and other.ipt == {} and other.n_steps == 0


# --- a rank change that fails half-way is undone ------------------------------------------------------
def test_a_resize_failing_on_the_last_layer_undoes_the_others(monkeypatch):
    net = _net()
    opt = torch.optim.AdamW([p for p in net.parameters() if p.requires_grad], lr=0.01)
    for _ in range(2):
        _backward(net)
        opt.step()
    _backward(net)                            # gradients present too
    ctrl = RankController(net, ControllerConfig(r_max=8))
    before, state = snapshot(net), _opt_state(opt)
    params = [p for g in opt.param_groups for p in g["params"]]
    real, calls = controller.resize_with_state, []

    def flaky(layer, rank, optimizer=None, keep_scaling=False):
        calls.append(rank)
        if len(calls) == 3:
            raise RuntimeError("injected")
        real(layer, rank, optimizer, keep_scaling)
    monkeypatch.setattr(controller, "resize_with_state", flaky)
    with pytest.raises(RuntimeError, match="injected"):
        ctrl.apply_ranks({"0": 2, "2": 6, "4": 5}, opt)
    assert_unchanged(before, net)             # same objects, values, flags, scaling
    assert [p for g in opt.param_groups for p in g["params"]] == params
    assert _opt_state(opt).keys() == state.keys()
    assert all(torch.equal(v, _opt_state(opt)[i][k]) for i, s in state.items() for k, v in s.items())
    assert all(p.grad is not None for p in params)


def test_over_cap_rollback_keeps_the_same_parameter_objects():
    net = _net()
    opt = torch.optim.AdamW([p for p in net.parameters() if p.requires_grad], lr=0.01)
    _backward(net)
    opt.step()
    ctrl = RankController(net, ControllerConfig(r_max=8))
    ctrl.config.memory_cap_bytes = ctrl.adapter_bytes()
    before = snapshot(net)
    assert not ctrl.apply_ranks({"0": 6}, opt)
    assert_unchanged(before, net)
