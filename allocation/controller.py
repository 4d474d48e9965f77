"""Dynamic ranks during training (the "DRaFT-Q" recipe): a rank controller under a hard memory cap.

Every `interval` steps the controller reads the per-layer curvature EMA
(allocation.curvature), grows the `n_change` most curved layers by `rank_step`
and shrinks the `n_change` least curved ones, within [r_min, r_max]. Each change
goes through the layer's own `resize`, which keeps the output unchanged when
growing (new B columns are zero) and keeps the best rank-k approximation of the
update when shrinking (truncated SVD of B A, Eckart-Young).

Memory cap. The adapter's training memory (weights + grads + AdamW's two
moments, allocation.budget.training_bytes) is never above `memory_cap_bytes`.
The plan is checked against the accounting first (grows are trimmed, least
curved first, until it fits); then the change is applied for real, the bytes
are measured from the live parameters, and if they are over the cap everything
is rolled back to the snapshot of the last allocation within the cap (the same
Parameter objects with their factors and gradients, buffers, scaling and optimizer
state, bit for bit); a resize that fails on the way is rolled back the same way
before the error goes on. Ranks stay <= min(in, out).

Carrying the optimizer state through a resize, and the snapshot a rollback restores:
allocation/resize.py (re-exported here).
"""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

import torch.nn as nn

from allocation.allocator import check_stepped, current_ranks, no_reduce
from allocation.budget import adapter_params, training_bytes
from allocation.curvature import SIGNALS, CurvatureTracker
from allocation.resize import resize_with_state, restore_layer, snapshot_layer  # noqa: F401
from lora.targets import adapter_layers


@dataclass
class ControllerConfig:
    interval: int = 50                     # K: steps between rank decisions
    warmup: int = 0                        # no decisions before this step
    r_min: int = 2
    r_max: int = 32
    rank_step: int = 2                     # ranks added / removed per change
    n_change: int = 1                      # layers grown (and at most shrunk, as the cap needs) per decision
    memory_cap_bytes: int | None = None    # hard cap on adapter training bytes (None: no cap)
    beta: float = 0.9                      # curvature EMA factor
    signal: str = "grad_sq"                # "grad_sq", "spread" or "secant" (allocation.curvature)
    keep_scaling: bool = False             # a resized layer keeps alpha / r (alpha follows the rank), so its
                                           # step size does not jump; False: alpha stays (PEFT's rule)

    def __post_init__(self):
        self.check()

    def check(self) -> None:
        """Every option where it enters, by name (RankController checks again: a config can be edited)."""
        for name, low in (("interval", 1), ("warmup", 0), ("r_min", 1), ("rank_step", 1), ("n_change", 1)):
            _check_int(f"ControllerConfig.{name}", getattr(self, name), low)
        _check_int("ControllerConfig.r_max", self.r_max, self.r_min, "r_min")
        if self.memory_cap_bytes is not None:
            _check_int("ControllerConfig.memory_cap_bytes", self.memory_cap_bytes, 1, none=True)
        if isinstance(self.beta, bool) or not isinstance(self.beta, (int, float)) or not 0.0 <= self.beta < 1.0:
            raise ValueError(f"ControllerConfig.beta must be in [0, 1), got {self.beta!r}")
        if not isinstance(self.keep_scaling, bool):
            raise ValueError(f"ControllerConfig.keep_scaling must be a bool, got {self.keep_scaling!r}")
        if self.signal not in SIGNALS:
            raise ValueError(f"ControllerConfig.signal must be one of {SIGNALS}, got {self.signal!r}")


def _check_int(what: str, value, low: int, low_name: str | None = None, none: bool = False) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < low:
        bound = f">= {low_name} = {low}" if low_name else f">= {low}"
        raise ValueError(f"{what} must be an int {bound}{' or None' if none else ''}, got {value!r}")


def layer_method(layer: nn.Module) -> str:
    """The accounting row of budget.py a layer belongs to, from its parameter names."""
    if hasattr(layer, "lora_E"):
        return "adalora"
    return "dora" if hasattr(layer, "lora_magnitude") else "lora"



class RankController:
    """Grows/shrinks adapter ranks by score under a hard cap on adapter training bytes."""

    def __init__(self, model: nn.Module, config: ControllerConfig | None = None):
        self.config = config = config or ControllerConfig()
        config.check()
        self.layers = adapter_layers(model)
        if not self.layers:
            raise ValueError("RankController: the model has no adapter layers (add_lora_to_model first)")
        for name, layer in self.layers:
            if not (hasattr(layer, "lora_A") and hasattr(layer, "lora_B") and hasattr(layer, "resize")):
                raise TypeError(f"RankController: {name} ({type(layer).__name__}) has no lora_A/lora_B/resize")
            if hasattr(layer, "lora_E"):
                raise TypeError(f"RankController: {name} is an AdaLoRA (SVD-form) layer; use AdaLoRAAllocator")
        cap = config.memory_cap_bytes
        if cap is not None and self.adapter_bytes() > cap:
            raise ValueError(f"RankController: the starting adapters take {self.adapter_bytes()} bytes, "
                             f"above memory_cap_bytes={cap}; start with smaller ranks")
        self.rank_history = [{"step": 0, "ranks": self.ranks()}]
        self.n_rollbacks = 0

    def ranks(self) -> dict[str, int]:
        return current_ranks(self.layers)

    def planned_bytes(self, ranks: dict[str, int]) -> int:
        """Training bytes of the adapters at `ranks`, from the accounting in budget.py."""
        total = 0
        for name, layer in self.layers:
            n = adapter_params(layer.in_features, layer.out_features, ranks[name], layer_method(layer))
            total += training_bytes(n, layer.lora_A.dtype)
        return total

    def adapter_bytes(self) -> int:
        """Training bytes measured on the live parameters (weights + grads + two moments each)."""
        return sum(training_bytes(p.numel(), p.dtype) for _, layer in self.layers
                   for p in layer.adapter_parameters())

    def apply_ranks(self, new_ranks: dict[str, int], optimizer=None) -> bool:
        """Resize layers to `new_ranks` (shrinks first), carrying optimizer state.

        Applies for real, measures, and rolls back everything if the cap is exceeded;
        returns whether the new allocation was kept.
        """
        by_name = dict(self.layers)
        unknown = set(new_ranks) - set(by_name)
        if unknown:
            raise ValueError(f"RankController.apply_ranks: unknown layers {sorted(unknown)}")
        for n, r in new_ranks.items():
            # a layer built above min(in, out) (LoRALinear allows it) may keep its rank, not grow to one
            top = max(min(by_name[n].in_features, by_name[n].out_features), by_name[n].rank)
            if isinstance(r, bool) or not isinstance(r, int) or not 1 <= r <= top:
                raise ValueError(f"RankController.apply_ranks: rank of {n} must be an int in [1, {top}] "
                                 f"(min(in, out), or the layer's current rank if larger), got {r!r}")
        changes = [(n, r) for n, r in new_ranks.items() if r != by_name[n].rank]
        changes.sort(key=lambda nr: nr[1] - by_name[nr[0]].rank)               # shrinks first
        snaps = {n: snapshot_layer(by_name[n], optimizer) for n, _ in changes}
        try:
            for n, r in changes:
                resize_with_state(by_name[n], r, optimizer, self.config.keep_scaling)
        except BaseException:           # all-or-nothing: a failed resize puts every layer back
            for n, _ in changes:
                restore_layer(by_name[n], snaps[n], optimizer)
            raise
        cap = self.config.memory_cap_bytes
        if cap is not None and self.adapter_bytes() > cap:
            for n, _ in changes:
                restore_layer(by_name[n], snaps[n], optimizer)
            self.n_rollbacks += 1
            return False
        return True

    def plan(self, scores: dict[str, float]) -> dict[str, int]:
        """Grow the most curved layers; shrink the least curved only as far as the cap needs.

        Up to `n_change` layers, most curved first, grow by `rank_step`. If that would
        pass the memory cap, up to `n_change` of the least curved layers (not being
        grown) give back `rank_step` each, one at a time, until it fits; if it still does not fit, the
        least curved grows are trimmed. So the budget fills up first (no shrinking
        while there is room) and then rank flows from flat layers to curved ones.
        """
        c = self.config
        ranks = self.ranks()
        names = [n for n, _ in self.layers]
        unknown = sorted(set(scores) - set(names))
        if unknown:
            raise ValueError(f"RankController.plan: scores name unknown layers {unknown}")
        bad = {n: v for n, v in scores.items()
               if isinstance(v, bool) or not isinstance(v, numbers.Real) or not math.isfinite(v)}
        if bad:
            raise ValueError(f"RankController.plan: scores must be finite numbers, got {bad}")
        low = min(scores.values(), default=0.0)
        order = sorted(range(len(names)), key=lambda i: (-scores.get(names[i], low), i))   # stable
        top = {n: min(c.r_max, layer.in_features, layer.out_features) for n, layer in self.layers}
        grow = [names[i] for i in order if ranks[names[i]] < top[names[i]]][:c.n_change]
        new = dict(ranks)
        for n in grow:
            new[n] = min(top[n], ranks[n] + c.rank_step)
        if c.memory_cap_bytes is None:
            return new
        shrink = [names[i] for i in reversed(order) if ranks[names[i]] > c.r_min and names[i] not in grow]
        for n in shrink[:c.n_change]:
            if self.planned_bytes(new) <= c.memory_cap_bytes:
                break
            new[n] = max(c.r_min, ranks[n] - c.rank_step)
        for n in reversed(grow):                        # least curved grow gives way first
            while new[n] > ranks[n] and self.planned_bytes(new) > c.memory_cap_bytes:
                new[n] -= 1
        return new

    def step(self, step: int, scores: dict[str, float], optimizer=None) -> bool:
        """One decision (call every `interval` steps); records the ranks in `rank_history`."""
        kept = self.apply_ranks(self.plan(scores), optimizer)
        self.rank_history.append({"step": int(step), "ranks": self.ranks()})
        return kept


class CurvatureRankAllocator:
    """DRaFT-Q: curvature EMA from the adapter gradients + the rank controller (allocator protocol).

    Build the adapters at a rank whose bytes fit a cap set at, e.g., the bytes of uniform r=8
    (budget.training_bytes(budget.adapter_params(...))), and let the controller move rank to
    where the signal is: from below the cap (r=4) it first fills the cap, from the cap (r=8, the
    library's DRaFT-Q recipe, which then never spends less than uniform) it only moves rank.
    Works on any base the adapters accept (nn.Linear, 8-bit, NF4): only lora_A / lora_B are touched.
    """

    name = "DRaFT-Q"

    def __init__(self, model: nn.Module, config: ControllerConfig | None = None):
        self.config = config or ControllerConfig()
        self.controller = RankController(model, self.config)
        self.tracker = CurvatureTracker(self.config.beta, self.config.signal)
        self.n_steps = 0
        self.reduce = no_reduce          # all-reduce mean under several processes (allocator.py)

    @property
    def rank_history(self) -> list[dict]:
        return self.controller.rank_history

    def on_step(self, step: int, model: nn.Module, optimizer) -> None:
        self.tracker.update(self.controller.layers, self.reduce)
        self.n_steps += 1

    def after_step(self, step: int, model: nn.Module, optimizer) -> None:
        c = self.config
        if step > 0 and step >= c.warmup and step % c.interval == 0:
            self.controller.step(step, self.tracker.scores(), optimizer)

    def regularization(self, model: nn.Module):
        return 0.0

    def finish(self, total_steps: int) -> None:
        check_stepped(self.name, self.n_steps, total_steps)

    def state_dict(self) -> dict:
        return {"n_steps": self.n_steps, "tracker": self.tracker.state_dict(),
                "rank_history": list(self.rank_history), "n_rollbacks": self.controller.n_rollbacks}

    def load_state_dict(self, state: dict) -> None:
        """Checks the whole state first (ValueError naming the bad entry), then replaces."""
        if not isinstance(state, dict) or not {"n_steps", "tracker", "rank_history"} <= set(state):
            raise ValueError(f"{self.name}.load_state_dict: expected a dict with n_steps, tracker and "
                             f"rank_history, got {state if not isinstance(state, dict) else sorted(state)!r}")
        _check_int(f"{self.name} state n_steps", state["n_steps"], 0)
        _check_int(f"{self.name} state n_rollbacks", state.get("n_rollbacks", 0), 0)
        history = state["rank_history"]
        if not isinstance(history, list) or not all(isinstance(h, dict) and {"step", "ranks"} <= set(h)
                                                    for h in history):
            raise ValueError(f"{self.name}.load_state_dict: rank_history must be a list of {{step, ranks}} dicts")
        tracker = CurvatureTracker(self.config.beta, self.config.signal)
        tracker.load_state_dict(state["tracker"])                       # validates; replaces only the new one
        self.tracker, self.n_steps = tracker, int(state["n_steps"])
        self.controller.rank_history = list(history)
        self.controller.n_rollbacks = int(state.get("n_rollbacks", 0))
