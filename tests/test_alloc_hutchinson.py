"""Hutchinson trace estimates against exact Hessian traces, and the ranks that follow from them."""
import math

import pytest
import torch
import torch.nn as nn
from torch.func import functional_call

from allocation.budget import cost_per_rank
from allocation.hutchinson import (TraceEstimate, hessian_traces, hutchinson_traces, module_shapes,
                                   sensitivity_ranks)
from lora.layers import LoRALinear


def _spd(n, seed):
    g = torch.Generator().manual_seed(seed)
    M = torch.randn(n, n, generator=g, dtype=torch.float64)
    return M @ M.t() / n + torch.eye(n, dtype=torch.float64)


@pytest.mark.parametrize("seed", [0, 1])
def test_quadratic_converges_to_exact_trace_within_the_standard_error(seed):
    n, samples = 12, 400
    H = _spd(n, seed)
    x = torch.randn(n, dtype=torch.float64, requires_grad=True)
    est = hutchinson_traces(lambda i: 0.5 * x @ H @ x, {"x": x}, min_samples=samples, max_samples=samples,
                            seed=seed)["x"]
    # Rademacher probes: Var[v^T H v] = 2 sum_{i != j} H_ij^2, so the standard error is known exactly.
    off = (H.square().sum() - H.diagonal().square().sum()).item()
    true_se = math.sqrt(2 * off / samples)
    assert est.n_samples == samples
    assert abs(est.trace - H.trace().item()) < 4 * true_se
    assert 0.7 * true_se < est.stderr < 1.3 * true_se


def test_diagonal_hessian_is_exact_and_stops_at_min_samples():
    d = torch.tensor([1.0, 2.0, 3.0, 4.0], dtype=torch.float64)
    x = torch.randn(4, dtype=torch.float64, requires_grad=True)
    est = hutchinson_traces(lambda i: 0.5 * (d * x * x).sum(), {"x": x}, min_samples=3, max_samples=50)["x"]
    assert est.n_samples == 3 and est.stderr == 0.0
    assert est.trace == pytest.approx(10.0, abs=1e-12)


def test_early_stop_when_relative_error_settles():
    H = _spd(10, 3)
    x = torch.randn(10, dtype=torch.float64, requires_grad=True)
    est = hutchinson_traces(lambda i: 0.5 * x @ H @ x, {"x": x}, min_samples=4, max_samples=2000, tol=0.05)["x"]
    assert 4 <= est.n_samples < 2000
    assert est.stderr <= 0.05 * abs(est.trace)


def _exact_trace(model, name, loss):
    """tr of the Hessian block of `name`'s weight from the full Hessian (autograd.functional.hessian)."""
    params = {k: v.detach() for k, v in model.named_parameters()}
    key = f"{name}.weight"

    def f(w):
        return loss(lambda x: functional_call(model, {**params, key: w}, (x,)))
    H = torch.autograd.functional.hessian(f, params[key])
    n = params[key].numel()
    return H.reshape(n, n).trace().item()


def test_tiny_network_matches_full_hessian_trace_and_restores_state():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 2)).double()
    X, Y = torch.randn(16, 3, dtype=torch.float64), torch.randn(16, 2, dtype=torch.float64)
    net[0].weight.requires_grad_(False)        # frozen, as base weights are during fine-tuning
    net.train()
    est = hessian_traces(net, [(X, Y)], ["0", "2"], lambda m, b: ((m(b[0]) - b[1]) ** 2).mean(),
                         min_samples=600, max_samples=600)
    for name in ("0", "2"):
        exact = _exact_trace(net, name, lambda f: ((f(X) - Y) ** 2).mean())
        assert abs(est[name].trace - exact) < 4 * est[name].stderr + 1e-9, (name, est[name], exact)
    assert not net[0].weight.requires_grad and net[2].weight.requires_grad   # restored
    assert net.training


def test_batches_are_averaged_and_adapters_probe_their_base():
    torch.manual_seed(1)
    net = nn.Sequential(LoRALinear(nn.Linear(4, 4), rank=2), nn.Tanh(), nn.Linear(4, 1)).double()
    batches = [(torch.randn(8, 4, dtype=torch.float64), torch.randn(8, 1, dtype=torch.float64)) for _ in range(2)]
    loss = lambda m, b: ((m(b[0]) - b[1]) ** 2).mean()                      # noqa: E731
    est = hessian_traces(net, batches, ["2"], loss, min_samples=200, max_samples=200)["2"]
    exact = sum(_exact_trace(net, "2", lambda f, b=b: ((f(b[0]) - b[1]) ** 2).mean()) for b in batches) / 2
    assert abs(est.trace - exact) < 4 * est.stderr
    est0 = hessian_traces(net, batches, ["0"], loss, min_samples=4, max_samples=4)["0"]
    assert math.isfinite(est0.trace)
    assert not net[0].base_layer.weight.requires_grad


def test_sensitivity_ranks_spend_the_uniform_budget():
    shapes = {"q": (32, 32), "k": (32, 32), "v": (32, 64), "o": (64, 32)}
    traces = {"q": TraceEstimate(5.0, 0.1, 8), "k": TraceEstimate(-0.5, 0.1, 8), "v": 2.0, "o": 0.01}
    ranks = sensitivity_ranks(traces, shapes, r_min=2, r_max=32, uniform_rank=8)
    costs = {n: cost_per_rank(*s) for n, s in shapes.items()}
    budget = sum(8 * c for c in costs.values())
    spent = sum(ranks[n] * costs[n] for n in shapes)
    assert spent <= budget and budget - spent < min(costs.values())
    assert all(2 <= r <= 32 for r in ranks.values())
    assert ranks["q"] > ranks["v"] > ranks["k"] >= ranks["o"] == 2


def test_module_shapes_and_errors():
    net = nn.Sequential(nn.Linear(3, 5), nn.ReLU())
    assert module_shapes(net, ["0"]) == {"0": (3, 5)}
    with pytest.raises(ValueError, match="no modules named"):
        hessian_traces(net, [torch.randn(2, 3)], ["9"], lambda m, b: m(b).sum())
    with pytest.raises(TypeError, match="floating-point weight"):
        hessian_traces(net, [torch.randn(2, 3)], ["1"], lambda m, b: m(b).sum())


def test_probe_upstream_of_a_fused_lora_layer_sees_every_second_order_term():
    # Issue 17's reproduction: layer "2" downstream of the probed layer "0" takes LoRALinear's fused
    # autograd path (enough rows, plain Linear base). Its backward must be differentiable twice, or the
    # Hessian-vector product silently loses terms (it gave -0.526 +- 0.009 for an exact trace of 0.087).
    from lora import add_lora_to_model
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 2))
    plain = nn.Sequential(nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 2))
    plain.load_state_dict(net.state_dict())
    add_lora_to_model(net, r=2, lora_alpha=4, target_modules=["0", "2"])   # B = 0: same function as plain
    X, Y = torch.randn(32, 8), torch.randn(32, 2)
    assert net[2]._can_fuse(torch.tanh(net[0](X)))                           # the path under test is taken
    loss = lambda m, b: ((m(b[0]) - b[1]) ** 2).mean()                       # noqa: E731
    est = hessian_traces(net, [(X, Y)], ["0"], loss, min_samples=1500, max_samples=1500, tol=0)["0"]
    exact = _exact_trace(plain, "0", lambda f: ((f(X) - Y) ** 2).mean())
    assert abs(est.trace - exact) < 4 * est.stderr, (est, exact)


@pytest.mark.parametrize("function", ["_FusedLoRA", "_ThinLoRA"])
def test_lora_autograd_functions_are_twice_differentiable(function):
    import lora.layers
    apply = getattr(lora.layers, function).apply
    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, 4, dtype=torch.float64, generator=g, requires_grad=True)
    W = torch.randn(3, 4, dtype=torch.float64, generator=g, requires_grad=True)
    b = torch.randn(3, dtype=torch.float64, generator=g)
    A = torch.randn(2, 4, dtype=torch.float64, generator=g, requires_grad=True)
    B = torch.randn(3, 2, dtype=torch.float64, generator=g, requires_grad=True)
    layer = lambda x, A, B: apply(x, W.detach(), b, A, B, 0.7)              # noqa: E731
    assert torch.autograd.gradcheck(layer, (x, A, B))
    assert torch.autograd.gradgradcheck(layer, (x, A, B))


def test_each_module_gets_its_own_mode_back():
    net = nn.Sequential(nn.Linear(4, 4), nn.Dropout(0.5), nn.Linear(4, 1))
    net.train()
    net[1].eval()                                   # the user's choice: this dropout stays off
    X, Y = torch.randn(8, 4), torch.randn(8, 1)
    hessian_traces(net, [(X, Y)], ["2"], lambda m, b: ((m(b[0]) - b[1]) ** 2).mean(),
                   min_samples=2, max_samples=2)
    assert net.training and net[0].training and net[2].training
    assert not net[1].training
