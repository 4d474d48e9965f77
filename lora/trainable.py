"""What trains, and how much: requires_grad flags, parameter counts, the adapter state dict.

loralib's two free helpers (`mark_only_lora_as_trainable`, `lora_state_dict`) plus a true
parameter count (`count_parameters`, which counts a packed quantized layer by its logical
size and a tied tensor once).
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn

from lora.config import BIASES
from lora.targets import adapter_layers, find_modules_to_save


def restore_flags(flags: list[tuple[torch.Tensor, bool]]) -> None:
    for p, flag in flags:
        p.requires_grad_(flag)

def mark_only_lora_as_trainable(model: nn.Module, bias: str = "none") -> nn.Module:
    """Freeze everything but adapter parameters; bias="all" / "lora_only" also trains biases.
    A model without adapters is refused (it would freeze every parameter)."""
    if bias not in BIASES:
        raise ValueError(f"mark_only_lora_as_trainable: bias must be one of {BIASES}, got {bias!r}")
    if not adapter_layers(model):
        raise ValueError(f"mark_only_lora_as_trainable: {type(model).__name__} has no adapter layers, so this "
                         f"would freeze every parameter; add adapters first (lora.add_lora_to_model)")
    flags = [(p, p.requires_grad) for p in model.parameters()]
    try:
        for p in model.parameters():
            p.requires_grad_(False)
        for _, layer in adapter_layers(model):
            for p in layer.adapter_parameters():
                p.requires_grad_(True)
            if bias == "lora_only" and getattr(layer.base_layer, "bias", None) is not None:
                layer.base_layer.bias.requires_grad_(True)
        if bias == "all":
            for name, p in model.named_parameters():
                if name == "bias" or name.endswith(".bias"):
                    p.requires_grad_(True)
    except BaseException:
        restore_flags(flags)
        raise
    return model


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) with TRUE counts: a module with `true_param_count()` (a packed
    quantized layer) counts that, not its storage; shared (tied) tensors count once."""
    seen: set[int] = set()
    trainable = total = 0

    def visit(module: nn.Module) -> None:
        nonlocal trainable, total
        if callable(getattr(module, "true_param_count", None)):
            fresh = [p for p in module.parameters() if id(p) not in seen]
            seen.update(id(p) for p in module.parameters())
            total += int(module.true_param_count())
            trainable += sum(p.numel() for p in fresh if p.requires_grad)
            return
        for p in module.parameters(recurse=False):
            if id(p) not in seen:
                seen.add(id(p))
                total += p.numel()
                trainable += p.numel() if p.requires_grad else 0
        for child in module.children():
            visit(child)

    visit(model)
    return trainable, total


def lora_state_dict(model: nn.Module, modules_to_save: Sequence[str] = ()) -> dict[str, torch.Tensor]:
    """The adapter tensors (factors, magnitudes, masks: everything outside `base_layer`) by
    their model state-dict names, plus the parameters of `modules_to_save`."""
    state = {}
    for name, layer in adapter_layers(model):
        prefix = f"{name}." if name else ""
        for key, tensor in layer.state_dict(keep_vars=True).items():
            if not key.startswith("base_layer."):
                state[prefix + key] = tensor.detach()
    for name, module in find_modules_to_save(model, modules_to_save):
        for key, p in module.named_parameters():
            state[f"{name}.{key}"] = p.detach()
    return state
