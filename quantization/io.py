"""Save and load quantized models as safetensors, bit for bit.

The file holds the model's state dict (packed codes, scales, float parameters) and, in
the safetensors header metadata under "nanopeft.quantization", a JSON map from each
quantized layer's dotted name to what is needed to rebuild an empty layer of the right
shape.  Loading takes the float model architecture (fresh or pretrained), swaps those
layers for empty quantized ones, then loads every tensor strictly.
"""
from __future__ import annotations

import json
import os

import torch
import torch.nn as nn
from safetensors import safe_open
from safetensors.torch import load_model, save_model

from .layers import Linear4bit, Linear8bit, in_out_features
from .model import replace_module

METADATA_KEY = "nanopeft.quantization"


def _dtype_name(dtype: torch.dtype | None) -> str | None:
    return None if dtype is None else str(dtype).replace("torch.", "")


def _dtype(name: str | None) -> torch.dtype | None:
    return None if name is None else getattr(torch, name)


def layer_spec(module: nn.Module) -> dict:
    """JSON-able description of a quantized layer (enough to rebuild it empty)."""
    spec = {"in_features": module.in_features, "out_features": module.out_features,
            "bias": module.bias is not None, "compute_dtype": _dtype_name(module.compute_dtype),
            "weight_dtype": _dtype_name(module.weight_dtype), "blocksize": module.blocksize}
    if isinstance(module, Linear4bit):
        spec.update(bits=4, double_quant=module.double_quant)
    elif isinstance(module, Linear8bit):
        spec.update(bits=8, n_outlier_cols=0 if module.outlier_cols is None else module.outlier_cols.numel())
    else:
        raise TypeError(f"layer_spec: expected Linear4bit or Linear8bit, got {type(module).__name__}")
    return spec


def empty_layer(spec: dict) -> nn.Module:
    common = dict(compute_dtype=_dtype(spec["compute_dtype"]), weight_dtype=_dtype(spec["weight_dtype"]),
                  blocksize=spec["blocksize"])
    if spec["bits"] == 4:
        return Linear4bit(spec["in_features"], spec["out_features"], spec["bias"],
                          double_quant=spec["double_quant"], **common)
    if spec["bits"] == 8:
        return Linear8bit(spec["in_features"], spec["out_features"], spec["bias"],
                          n_outlier_cols=spec["n_outlier_cols"], **common)
    raise ValueError(f"empty_layer: bits must be 4 or 8, got {spec['bits']!r}")


def save_quantized(model: nn.Module, path: str | os.PathLike) -> None:
    """Write the whole model (quantized layers included) to one .safetensors file."""
    specs = {name: layer_spec(m) for name, m in model.named_modules() if isinstance(m, (Linear4bit, Linear8bit))}
    # save_model (not save_file) drops duplicate names of shared tensors (tied embeddings).
    save_model(model, str(path), metadata={METADATA_KEY: json.dumps(specs)})


def load_quantized(model: nn.Module, path: str | os.PathLike) -> nn.Module:
    """Load a file written by save_quantized into `model` (same architecture), in place.

    Layers listed in the file are replaced by empty quantized layers first, so `model`
    may be the plain float architecture.  Tensors land on the device of the model's
    parameters.  Every key must match (strict)."""
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
    if METADATA_KEY not in meta:
        raise ValueError(f"load_quantized: {path} has no {METADATA_KEY!r} metadata; was it written by save_quantized?")
    first = next(model.parameters(), None)
    device = first.device if first is not None else torch.device("cpu")
    for name, spec in json.loads(meta[METADATA_KEY]).items():
        n_in, n_out = in_out_features(model.get_submodule(name))     # a float Linear or Conv1D, or quantized
        if (n_in, n_out) != (spec["in_features"], spec["out_features"]):
            raise ValueError(f"load_quantized: {name} is {n_in}->{n_out} in the model, "
                             f"{spec['in_features']}->{spec['out_features']} in {path}")
        replace_module(model, name, empty_layer(spec).to(device))
    missing, unexpected = load_model(model, str(path), strict=True, device=str(device))
    assert not missing and not unexpected, (missing, unexpected)
    return model
