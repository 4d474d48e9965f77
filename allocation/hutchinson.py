"""One-shot Hessian sensitivity per layer: Hutchinson's trace estimator (the "SADRA" recipe).

For a loss L and a module weight W (flattened to a vector w), the sensitivity is
the trace of the Hessian block H_WW = d^2 L / dw^2. Hutchinson (1990, "A stochastic
estimator of the trace of the influence matrix for Laplacian smoothing splines")
observed that for a random vector v with E[v v^T] = I,

    tr(H) = E[v^T H v],

and Rademacher entries (+-1 with probability 1/2) give the smallest variance among
such v: Var[v^T H v] = 2 sum_{i != j} H_ij^2 (the diagonal is counted exactly).
H v is a Hessian-vector product, computed without forming H by differentiating
twice (Pearlmutter 1994): g = dL/dw with create_graph=True, then H v = d(g . v)/dw.

All target modules share one double backward: with one probe v_k per module and
the joint product u = H v, the estimate v_k^T u_k = v_k^T H_kk v_k + sum_{j!=k}
v_k^T H_kj v_j has expectation tr(H_kk), because independent probes make the
cross terms average to zero. Samples cycle through the calibration batches, so
the result estimates the batch-averaged trace. Sampling stops once every module's
standard error (std / sqrt(n)) is below `tol` times |mean| (after `min_samples`).

The ranks then follow the sensitivities (`sensitivity_ranks`): between r_min = 2
and r_max = 32 at the parameter budget of uniform r = 8, so training costs what
uniform LoRA costs (up to less than one rank step, see budget.ranks_from_scores).
"""
from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.nn as nn
from torch import Tensor
from torch.nn.attention import SDPBackend, sdpa_kernel

from allocation.budget import cost_per_rank, fixed_params, ranks_from_scores
from lora.layout import in_out_features, module_device


@dataclass
class TraceEstimate:
    trace: float       # mean of the per-sample estimates v^T H v
    stderr: float      # standard error of that mean, std / sqrt(n)
    n_samples: int


def rademacher_like(t: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """A tensor of +-1 with t's shape, dtype and device."""
    bits = torch.randint(0, 2, t.shape, generator=generator, device="cpu")
    return (bits * 2 - 1).to(dtype=t.dtype, device=t.device)


def hutchinson_traces(loss_fn: Callable[[int], Tensor], params: Mapping[str, Tensor], *,
                      min_samples: int = 8, max_samples: int = 200, tol: float = 0.05,
                      seed: int = 0) -> dict[str, TraceEstimate]:
    """Estimate tr(d^2 L / dp^2) for each tensor p in `params` (each must require grad).

    loss_fn(i) returns the scalar loss of sample i (e.g. of calibration batch i mod n).
    """
    if min_samples < 2 or max_samples < min_samples:
        raise ValueError(f"hutchinson_traces: need 2 <= min_samples <= max_samples, "
                         f"got {min_samples}, {max_samples}")
    if not tol >= 0:
        raise ValueError(f"hutchinson_traces: tol must be >= 0, got {tol!r}")
    names = list(params)
    tensors = [params[k] for k in names]
    for k, p in zip(names, tensors):
        if not p.requires_grad:
            raise ValueError(f"hutchinson_traces: {k} does not require grad")
    gen = torch.Generator().manual_seed(seed)
    samples: list[list[float]] = [[] for _ in names]
    for i in range(max_samples):
        loss = loss_fn(i)
        grads = torch.autograd.grad(loss, tensors, create_graph=True)
        probes = [rademacher_like(p, gen) for p in tensors]
        gv = sum((g * v).sum() for g, v in zip(grads, probes))
        hvs = torch.autograd.grad(gv, tensors, allow_unused=True)      # (H v)_k for every block
        for k, (v, hv) in enumerate(zip(probes, hvs)):
            samples[k].append(0.0 if hv is None else float((v * hv).sum()))
        if i + 1 >= min_samples and all(_settled(s, tol) for s in samples):
            break
    return {k: TraceEstimate(*_mean_stderr(s), len(s)) for k, s in zip(names, samples)}


def _mean_stderr(xs: Sequence[float]) -> tuple[float, float]:
    n = len(xs)
    mean = sum(xs) / n
    var = sum((x - mean) ** 2 for x in xs) / (n - 1)
    return mean, math.sqrt(var / n)


def _settled(xs: Sequence[float], tol: float) -> bool:
    mean, se = _mean_stderr(xs)
    return se <= tol * abs(mean) or se == 0.0


def default_loss(model: nn.Module, batch) -> Tensor:
    """Loss of the project's models, which return (logits, loss).

    A dict batch (as trainers.data yields) is called the way the training loop calls
    it, model(input_ids, targets=labels, attention_mask=...), on the model's device;
    a tuple or list is passed positionally, model(*batch).
    """
    if isinstance(batch, Mapping):
        device = module_device(model)
        mask = batch.get("attention_mask")
        out = model(batch["input_ids"].to(device), targets=batch["labels"].to(device),
                    attention_mask=None if mask is None else mask.to(device))
    else:
        out = model(*batch)
    return out[1] if isinstance(out, (tuple, list)) else out


def probed_weight(module: nn.Module, name: str = "module") -> nn.Parameter:
    """The full-precision weight whose Hessian block we probe (an adapter's base weight)."""
    base = getattr(module, "base_layer", module)
    weight = getattr(base, "weight", None)
    if not isinstance(weight, nn.Parameter) or not weight.is_floating_point():
        raise TypeError(f"hessian_traces: {name} ({type(base).__name__}) has no floating-point weight "
                        f"Parameter; probe the full-precision model before quantizing it")
    return weight


def hessian_traces(model: nn.Module, batches: Sequence, module_names: Iterable[str],
                   loss_fn: Callable[[nn.Module, object], Tensor] = default_loss, *,
                   min_samples: int = 8, max_samples: int = 64, tol: float = 0.05,
                   seed: int = 0) -> dict[str, TraceEstimate]:
    """Hutchinson trace of the loss Hessian w.r.t. each named module's weight, over calibration batches.

    The base weights are frozen during fine-tuning, so requires_grad is switched on
    for the probed weights (and off for every other parameter) while probing and
    restored afterwards; the model runs in eval mode (no dropout) and every module's own
    mode is put back as it was.
    """
    batches = list(batches)
    if not batches:
        raise ValueError("hessian_traces: no calibration batches given")
    names = list(module_names)
    if not names:
        raise ValueError("hessian_traces: no module names given")
    modules = dict(model.named_modules())
    missing = [n for n in names if n not in modules]
    if missing:
        raise ValueError(f"hessian_traces: no modules named {missing} in the model")
    weights = {n: probed_weight(modules[n], n) for n in names}
    saved = {p: p.requires_grad for p in model.parameters()}
    modes = {m: m.training for m in model.modules()}  # each module's own mode, not just the root's
    try:
        for p in model.parameters():
            p.requires_grad_(False)
        for w in weights.values():
            w.requires_grad_(True)
        model.eval()
        # Hessian-vector products differentiate twice; the fused (flash / memory-efficient)
        # attention kernels have no double backward, the plain math kernel has.
        with sdpa_kernel(SDPBackend.MATH):
            return hutchinson_traces(lambda i: loss_fn(model, batches[i % len(batches)]), weights,
                                     min_samples=min_samples, max_samples=max_samples, tol=tol, seed=seed)
    finally:
        for p, flag in saved.items():
            p.requires_grad_(flag)
        for m, mode in modes.items():  # model.train(flag) would overwrite submodules' own modes
            m.training = mode


def sensitivity_ranks(traces: Mapping[str, TraceEstimate | float], shapes: Mapping[str, tuple[int, int]],
                      *, r_min: int = 2, r_max: int = 32, uniform_rank: int = 8,
                      method: str = "lora") -> dict[str, int]:
    """Ranks proportional to |trace| at the parameter budget of `uniform_rank` everywhere.

    shapes: name -> (in_features, out_features). The magnitude is used because a
    non-convex loss can have a negative trace, and a large negative curvature is
    just as much a sign that the layer matters. The result suits LoraConfig.rank_pattern.
    """
    names = list(traces)
    if set(names) != set(shapes):
        raise ValueError(f"sensitivity_ranks: traces and shapes name different modules: "
                         f"{sorted(set(names) ^ set(shapes))}")
    scores = [abs(t.trace if isinstance(t, TraceEstimate) else float(t)) for t in traces.values()]
    costs = [cost_per_rank(*shapes[n], method) for n in names]
    budget = sum(uniform_rank * c for c in costs)     # fixed parameters (DoRA's m) cancel out
    ranks = ranks_from_scores(scores, budget, r_min, r_max, costs)
    return dict(zip(names, ranks))


def module_shapes(model: nn.Module, names: Iterable[str]) -> dict[str, tuple[int, int]]:
    """name -> (in_features, out_features) of Linear-like modules (a Conv1D's nx, nf), or adapters."""
    modules = dict(model.named_modules())
    shapes = {}
    for n in names:
        try:
            shapes[n] = in_out_features(modules[n])
        except (KeyError, AttributeError):
            raise ValueError(f"module_shapes: no Linear-like module named {n!r} in the model") from None
    return shapes


def adapter_budget_params(shapes: Mapping[str, tuple[int, int]], rank: int, method: str = "lora") -> int:
    """Total adapter parameters of uniform `rank` over the given layers (for reports)."""
    return sum(rank * cost_per_rank(i, o, method) + fixed_params(i, o, method) for i, o in shapes.values())
