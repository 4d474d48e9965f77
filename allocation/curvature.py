"""A cheap per-layer curvature signal during training, smoothed by an EMA (the "DRaFT-Q" recipe).

Training already has the adapter gradients after `loss.backward()`. From them,
with no extra backward pass, each step gives a raw signal per layer:

  signal="grad_sq"  s_t = ||g_t||^2 / n      mean squared gradient of the layer's adapter
                                              parameters (the diagonal empirical Fisher,
                                              a standard curvature proxy; Amari 1998)
  signal="spread"   s_t = sum_F (||g_F||^2 - σ_1(g_F)^2) / n
                                              the same gradient energy minus each factor F's
                                              leading direction (σ_1: its largest singular
                                              value): what one more rank could use. On the
                                              real stories260K model the raw gradient of v_proj
                                              is the largest but nearly rank one (σ_1 / σ_2 ~ 7),
                                              so grad_sq sends rank where it buys little
                                              (README, "Adaptive ranks on a real model")
  signal="secant"   s_t = ||g_t - g_{t-1}|| / ||θ_t - θ_{t-1}||
                                              a secant (finite-difference) estimate of how
                                              fast the gradient turns: the size of the
                                              Hessian along the step just taken

Dividing by the parameter count n makes layers with different ranks comparable;
otherwise a layer that grew would look more curved only because it is bigger.
The secant needs the previous g and θ of the layer (adapter-sized copies), and
skips a step when the layer's shape changed (after a resize) or θ did not move.

The raw signal is noisy, so each layer keeps an exponential moving average

    c_t = β c_{t-1} + (1 - β) s_t,     β in [0, 1),  c_1 = s_1.

Why it converges: the update is an affine map c -> β c + (1-β) s, a contraction
with factor β. Two runs fed the same signals from different starts differ by
β^t |c_0 - c'_0|; with a constant signal s the error |c_t - s| = β^t |c_0 - s|
decays geometrically; and each c_t is a convex combination of c_0, s_1..s_t, so
signals in [a, b] keep the EMA in [a, b] (bounded in, bounded out). Cost per
step: one norm per adapter parameter, O(#adapter parameters), no backward.
"""
from __future__ import annotations

import math
from collections.abc import Iterable

import torch
import torch.nn as nn

from allocation.allocator import no_reduce

SIGNALS = ("grad_sq", "spread", "secant")


class EMA:
    """c <- beta c + (1 - beta) s, started at the first value seen."""

    def __init__(self, beta: float = 0.9):
        if not 0.0 <= beta < 1.0:
            raise ValueError(f"EMA: beta must be in [0, 1) for the update to be a contraction, got {beta}")
        self.beta = float(beta)
        self.value: float | None = None
        self.count = 0

    def update(self, s: float) -> float:
        if not math.isfinite(s):
            raise ValueError(f"EMA.update: signal must be finite, got {s}")
        self.value = s if self.value is None else self.beta * self.value + (1.0 - self.beta) * s
        self.count += 1
        return self.value


def _energy(grad: torch.Tensor, beyond_leading: bool) -> float:
    """||g||_F^2; with beyond_leading ||g||_F^2 - σ_1(g)^2 (a vector, DoRA's magnitude, has no
    direction beyond its leading one: 0). NaN / inf stay NaN / inf, so the step is skipped."""
    g = grad.detach().float()
    total = float(g.pow(2).sum())
    if not beyond_leading or not math.isfinite(total):
        return total
    if g.dim() != 2:
        return 0.0
    return max(0.0, total - float(torch.linalg.matrix_norm(g, ord=2)) ** 2)


class CurvatureTracker:
    """Per-layer EMA of a curvature signal computed from the adapter gradients already present.

    A step is all-or-nothing: every layer's signal is computed first, and if any is NaN or
    inf (an fp16 overflow step, which the GradScaler skips as well, or a broken gradient)
    the tracker skips the whole step: no EMA and no secant memory changes, for any layer.
    `n_skipped` counts such steps and `last_skipped` names the layers of the latest one.
    """

    def __init__(self, beta: float = 0.9, signal: str = "grad_sq"):
        if signal not in SIGNALS:
            raise ValueError(f"CurvatureTracker: signal must be one of {SIGNALS}, got {signal!r}")
        EMA(beta)  # validates beta
        self.beta = beta
        self.signal = signal
        self.emas: dict[str, EMA] = {}
        self._prev: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}   # name -> (g, θ) flattened
        self.n_skipped = 0
        self.last_skipped: list[str] = []

    @torch.no_grad()
    def update(self, layers: Iterable[tuple[str, nn.Module]], reduce=no_reduce) -> dict[str, float]:
        """Read the gradients of each (name, adapter layer); return this step's raw signals
        ({} when the step is skipped for a non-finite signal, see the class docstring).
        `reduce` maps the (n_layers,) signal vector to the one every process uses (the
        all-reduce mean under several processes; allocation/allocator.py)."""
        raw, prev = {}, {}
        for name, layer in layers:
            params = [p for p in layer.adapter_parameters() if p.grad is not None]
            if not params:
                continue
            if self.signal in ("grad_sq", "spread"):
                n = sum(p.numel() for p in params)
                raw[name] = sum(_energy(p.grad, self.signal == "spread") for p in params) / n
            else:
                g = torch.cat([p.grad.detach().float().flatten() for p in params])
                theta = torch.cat([p.detach().float().flatten() for p in params])
                if not bool(torch.isfinite(g).all() and torch.isfinite(theta).all()):
                    raw[name] = math.nan
                    continue
                prev[name] = (g, theta)
                s = self._secant(self._prev.get(name), g, theta)
                if s is not None:
                    raw[name] = s
        if raw and reduce is not no_reduce:     # a NaN on any rank makes every rank skip the step
            values = reduce(torch.tensor(list(raw.values()), dtype=torch.float64))
            raw = dict(zip(raw, values.tolist()))
        bad = [name for name, s in raw.items() if not math.isfinite(s)]
        if bad:
            self.n_skipped += 1
            self.last_skipped = bad
            return {}
        self._prev.update(prev)
        for name, s in raw.items():
            self.emas.setdefault(name, EMA(self.beta)).update(s)
        return raw

    @staticmethod
    def _secant(prev, g: torch.Tensor, theta: torch.Tensor) -> float | None:
        if prev is None or prev[0].shape != g.shape:        # first step, or resized since
            return None
        step = (theta - prev[1]).norm()
        if step == 0:
            return None
        return float((g - prev[0]).norm() / step)

    def scores(self) -> dict[str, float]:
        return {name: ema.value for name, ema in self.emas.items()}

    def state_dict(self) -> dict:
        return {"beta": self.beta, "signal": self.signal, "n_skipped": self.n_skipped,
                "emas": {k: (e.value, e.count) for k, e in self.emas.items()}}

    def load_state_dict(self, state: dict) -> None:
        """Checks the whole state first (ValueError naming the bad entry), then replaces."""
        if not isinstance(state, dict) or not {"beta", "signal", "emas"} <= set(state):
            raise ValueError(f"CurvatureTracker.load_state_dict: expected a dict with beta, signal and emas, "
                             f"got {state if not isinstance(state, dict) else sorted(state)!r}")
        fresh = CurvatureTracker(state["beta"], state["signal"])        # validates beta and signal
        if not isinstance(state["emas"], dict):
            raise ValueError(f"CurvatureTracker.load_state_dict: emas must be a dict, got {type(state['emas'])}")
        for k, entry in state["emas"].items():
            value, count = entry if isinstance(entry, (tuple, list)) and len(entry) == 2 else (None, None)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
                    or isinstance(count, bool) or not isinstance(count, int) or count < 1:
                raise ValueError(f"CurvatureTracker.load_state_dict: emas[{k!r}] must be (finite value, count >= 1), "
                                 f"got {entry!r}")
            ema = EMA(fresh.beta)
            ema.value, ema.count = float(value), count
            fresh.emas[k] = ema
        fresh.n_skipped = int(state.get("n_skipped", 0))
        self.__dict__.update(fresh.__dict__)
