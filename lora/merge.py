"""Merging: write adapters into their base weights, in place (`merge_adapters`, undone exactly by
`unmerge_lora_weights`) or for good, replacing each adapter by a plain layer (`merge_lora_weights`)."""
from __future__ import annotations

import copy

import torch
import torch.nn as nn

from lora.base import AdapterLayer
from lora.checks import check_finite
from lora.layout import base_weight, weight_layout
from lora.config import forget_adapters
from lora.model import CONTAINERS, swap_modules
from lora.targets import adapter_layers, modules_outside_adapters


@torch.no_grad()
def merged_linear(layer: AdapterLayer, name: str = "") -> nn.Module:
    """A plain layer computing what `layer` computes: W0 (dequantized) + delta W, summed in
    float32 and stored in the dtype of the weight the base stands for: an nn.Linear's own, a
    quantized layer's `weight_dtype` (its weight before quantization) or else float32, so
    the model's activations meet the dtype they met before quantizing.

    An nn.Linear, except for a Conv1D base: then a copy of that Conv1D holding the merged
    weight in its own (in, out) layout, so the model's state dict keeps its checkpoint's
    shapes (a merged Hugging Face GPT-2 still saves and loads as one)."""
    base = layer.base_layer
    W = base_weight(base).float()                                     # (out, in)
    if not layer.merged:
        W = W + layer.get_delta_weight().float()
    check_finite(W, f"merge_lora_weights: the merged weight W0 + delta W of {name or type(layer).__name__}")
    if weight_layout(base) == "in_out":
        merged = copy.deepcopy(base)
        base_weight(merged).copy_(W)                                  # through the (out, in) view
        if getattr(merged, "bias", None) is not None:
            merged.bias.copy_(layer.merged_bias())
        return merged.requires_grad_(False)
    if isinstance(base, nn.Linear):
        dtype = base.weight.dtype
    else:
        dtype = getattr(base, "weight_dtype", None) or torch.float32
    bias = layer.merged_bias()
    linear = nn.Linear(layer.in_features, layer.out_features, bias=bias is not None,
                       device=W.device, dtype=dtype)
    linear.weight.copy_(W)
    if bias is not None:
        linear.bias.copy_(bias)
    linear.requires_grad_(False)
    return linear


def merge_lora_weights(model: nn.Module) -> nn.Module:
    """Replace every adapter by a plain nn.Linear holding W0 + delta W (works for quantized
    bases: W0 is dequantized; a Conv1D base stays a Conv1D, see `merged_linear`). The result
    holds no adapter; it is returned (the same object unless `model` itself is an adapter).
    With named adapters (lora.named) the active one is merged and the others dropped (PEFT's
    merge_and_unload); a module the active adapter does not target gets its base layer back.
    All-or-nothing: every merged layer is built (and checked finite) before the first is put in place."""
    layers = adapter_layers(model)
    if layers and not layers[0][0]:
        return merged_linear(layers[0][1])
    active = dict(layers)
    swap_modules(model, [(name, merged_linear(active[name], name) if name in active else module.base_layer)
                         for name, module in modules_outside_adapters(model) if isinstance(module, CONTAINERS)])
    forget_adapters(model)                         # no adapters left to describe
    return model


def merge_adapters(model: nn.Module) -> nn.Module:
    """Call `merge()` on every adapter (in place into float bases, nn.Linear or Conv1D; quantized bases refuse).
    All-or-nothing: if one adapter cannot merge, those merged by this call are unmerged (exact)."""
    layers = [(name, layer) for name, layer in adapter_layers(model) if not layer.merged]
    for name, layer in layers:   # refuse a quantized base before merging anything
        try:
            layer._check_mergeable()
        except RuntimeError as err:
            raise RuntimeError(f"merge_adapters: {name}: {err}") from None
    try:
        for name, layer in layers:
            try:
                layer.merge()
            except ValueError as err:  # a non-finite merged weight
                raise ValueError(f"merge_adapters: {name}: {err}") from None
    except BaseException:
        for _, layer in layers:
            if layer.merged:
                layer.unmerge()
        raise
    return model


def unmerge_lora_weights(model: nn.Module) -> nn.Module:
    """Undo `merge_adapters`: call `unmerge()` on every in-place merged adapter.
    All-or-nothing: if one fails, those unmerged by this call are merged again."""
    layers = [layer for _, layer in adapter_layers(model) if layer.merged]
    try:
        for layer in layers:
            layer.unmerge()
    except BaseException:
        for layer in layers:
            if not layer.merged:
                layer.merge()
        raise
    return model
