"""The allocator protocol the training loop calls, and the allocator that does nothing.

One small class per method, all with the same methods, called by the loop in this order:

    loss = loss + allocator.regularization(model)     # before backward (AdaLoRA's orthogonality)
    loss.backward()
    allocator.on_step(step, model, optimizer)          # gradients present, weights not yet moved
    optimizer.step()
    allocator.after_step(step, model, optimizer)       # may mask or resize, carrying optimizer state
    ...
    allocator.finish(total_steps)                      # raises if an adaptive allocator never ran

`rank_history` is a list of {"step": int, "ranks": {layer name: rank}} for heatmaps.

`reduce` (default `no_reduce`) is applied to every statistic an allocator decides from
before it decides. Under several processes (trainers/distributed.py) the trainer sets it
to the all-reduce mean, so every rank makes the same rank and mask decisions; allocation
never imports trainers, and a single process is unchanged.
An adaptive method whose allocator was never stepped would silently train as
plain LoRA; `finish` turns that into an error.
"""
from __future__ import annotations

import torch.nn as nn

from lora.targets import adapter_layers


def current_ranks(layers) -> dict[str, int]:
    return {name: int(layer.rank) for name, layer in layers}


def no_reduce(tensor):
    """The single-process `reduce`: the statistic as it is."""
    return tensor


class NeverSteppedError(RuntimeError):
    pass


class NullAllocator:
    """Static ranks: every hook is a no-op (plain LoRA, DoRA, HiRA, ...)."""

    name = "none"

    def __init__(self, model: nn.Module | None = None):
        self.rank_history: list[dict] = []
        self.reduce = no_reduce
        if model is not None:
            self.rank_history.append({"step": 0, "ranks": current_ranks(adapter_layers(model))})

    def on_step(self, step: int, model: nn.Module, optimizer) -> None:
        pass

    def after_step(self, step: int, model: nn.Module, optimizer) -> None:
        pass

    def regularization(self, model: nn.Module):
        return 0.0

    def finish(self, total_steps: int) -> None:
        pass

    def state_dict(self) -> dict:
        return {"rank_history": list(self.rank_history)}

    def load_state_dict(self, state: dict) -> None:
        self.rank_history = list(state.get("rank_history", []))


def check_stepped(name: str, n_steps: int, total_steps: int) -> None:
    """The guard every adaptive allocator's finish() calls."""
    if total_steps > 0 and n_steps == 0:
        raise NeverSteppedError(f"allocator {name} was never stepped: training ran as plain LoRA "
                                f"(call allocator.on_step(step, model, optimizer) after backward and "
                                f"allocator.after_step(...) after optimizer.step())")
