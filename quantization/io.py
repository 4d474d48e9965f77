"""Save and load quantized models as safetensors, bit for bit.

The file holds the model's state dict (packed codes, scales, float parameters) and, in
the safetensors header metadata under "nanopeft.quantization", a JSON map from each
quantized layer's dotted name to what is needed to rebuild an empty layer of the right
shape.

Loading is all-or-nothing.  It reads every tensor of the file, checks the whole file
against the model (each listed layer exists with the same in/out features and bias,
every key of the model after the swap is in the file with the same shape, nothing
else is), builds the quantized layers on the side and fills them, and only then copies
the float tensors in and swaps the layers in.  A bad file or a model that does not
match it raises ValueError naming the file and the layer or key, and leaves the model
as it was.
"""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import torch
import torch.nn as nn
from safetensors import safe_open
from safetensors.torch import save_model

from .layers import Linear4bit, Linear8bit, in_out_features
from .model import replace_module
from .nf4 import BLOCKSIZES, FLOAT_DTYPES

METADATA_KEY = "nanopeft.quantization"
_DTYPE_NAMES = {str(d).replace("torch.", ""): d for d in FLOAT_DTYPES}


def _dtype_name(dtype: torch.dtype | None) -> str | None:
    return None if dtype is None else str(dtype).replace("torch.", "")


def _dtype(name: str | None) -> torch.dtype | None:
    if name is None:
        return None
    if name not in _DTYPE_NAMES:
        raise ValueError(f"dtype must be one of {sorted(_DTYPE_NAMES)} or null, got {name!r}")
    return _DTYPE_NAMES[name]


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


def _check_spec(spec) -> None:
    """Field by field, so a damaged header fails with the field's name."""
    if not isinstance(spec, dict):
        raise ValueError(f"expected a JSON object, got {spec!r}")
    need = {"bits", "in_features", "out_features", "bias", "compute_dtype", "weight_dtype", "blocksize"}
    bits = spec.get("bits")
    need |= {4: {"double_quant"}, 8: {"n_outlier_cols"}}.get(bits, set()) if isinstance(bits, int) else set()
    missing = sorted(need - set(spec))
    if missing:
        raise ValueError(f"missing field(s) {missing}")
    if spec["bits"] not in (4, 8) or isinstance(spec["bits"], bool):
        raise ValueError(f"bits must be 4 or 8, got {spec['bits']!r}")
    for key in ("in_features", "out_features"):
        if isinstance(spec[key], bool) or not isinstance(spec[key], int) or spec[key] < 1:
            raise ValueError(f"{key} must be a positive int, got {spec[key]!r}")
    for key in ("bias",) + (("double_quant",) if spec["bits"] == 4 else ()):
        if not isinstance(spec[key], bool):
            raise ValueError(f"{key} must be true or false, got {spec[key]!r}")
    if spec["blocksize"] not in BLOCKSIZES + ((None,) if spec["bits"] == 8 else ()):
        raise ValueError(f"blocksize must be one of {BLOCKSIZES}, got {spec['blocksize']!r}")


def empty_layer(spec: dict) -> nn.Module:
    """An all-zero quantized layer of the shape `spec` (from layer_spec) describes."""
    _check_spec(spec)
    common = dict(compute_dtype=_dtype(spec["compute_dtype"]), weight_dtype=_dtype(spec["weight_dtype"]),
                  blocksize=spec["blocksize"])
    if spec["bits"] == 4:
        return Linear4bit(spec["in_features"], spec["out_features"], spec["bias"],
                          double_quant=spec["double_quant"], **common)
    return Linear8bit(spec["in_features"], spec["out_features"], spec["bias"],
                      n_outlier_cols=spec["n_outlier_cols"], **common)


def save_quantized(model: nn.Module, path: str | os.PathLike) -> None:
    """Write the whole model (quantized layers included) to one .safetensors file."""
    specs = {name: layer_spec(m) for name, m in model.named_modules() if isinstance(m, (Linear4bit, Linear8bit))}
    # Written beside the target and renamed over it: a process killed mid-write leaves the old
    # file (or none), never a truncated one.  (quantization may not import trainers.results'
    # atomic writer, which does the same.)
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        # save_model (not save_file) drops duplicate names of shared tensors (tied embeddings).
        save_model(model, tmp, metadata={METADATA_KEY: json.dumps(specs)})
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def read_quantized(path: str | os.PathLike, device: torch.device | str = "cpu") -> tuple[dict, dict]:
    """(layer specs, every tensor) of a file written by save_quantized; ValueError naming the file
    when it is empty, truncated, not safetensors, or has no (or a damaged) quantization header."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"load_quantized: no file {str(path)!r}")
    if path.stat().st_size == 0:
        raise ValueError(f"load_quantized: {str(path)!r} is empty (0 bytes); expected a .safetensors file "
                         f"written by save_quantized")
    try:
        with safe_open(str(path), framework="pt", device=str(device)) as f:
            meta = f.metadata() or {}
            tensors = {key: f.get_tensor(key) for key in f.keys()}
    except Exception as error:   # safetensors raises its own SafetensorError, or OSError
        raise ValueError(f"load_quantized: cannot read {str(path)!r}: not a safetensors file, or truncated "
                         f"({type(error).__name__}: {error})") from error
    if METADATA_KEY not in meta:
        raise ValueError(f"load_quantized: {str(path)!r} has no {METADATA_KEY!r} metadata; "
                         f"was it written by save_quantized?")
    try:
        specs = json.loads(meta[METADATA_KEY])
    except json.JSONDecodeError as error:
        raise ValueError(f"load_quantized: {str(path)!r}: metadata {METADATA_KEY!r} is not valid JSON "
                         f"({error})") from error
    if not isinstance(specs, dict):
        raise ValueError(f"load_quantized: {str(path)!r}: metadata {METADATA_KEY!r} must map layer names to "
                         f"layer descriptions, got {type(specs).__name__}")
    for name, spec in specs.items():
        try:
            _check_spec(spec)
            _dtype(spec["compute_dtype"]), _dtype(spec["weight_dtype"])
        except ValueError as error:
            raise ValueError(f"load_quantized: {str(path)!r}: metadata {METADATA_KEY!r}, layer {name!r}: "
                             f"{error}") from None
    return specs, tensors


def _alias_groups(state: dict[str, torch.Tensor]) -> list[list[str]]:
    """Names of the same storage (tied weights) grouped; save_model writes one name per group."""
    groups: dict = {}
    for key, t in state.items():
        ident = (t.device, t.data_ptr(), t.dtype, tuple(t.shape), t.stride()) if t.numel() else ("empty", key)
        groups.setdefault(ident, []).append(key)
    return list(groups.values())


def _build_layers(model: nn.Module, specs: dict, tensors: dict, where: str, device) -> dict[str, nn.Module]:
    """The quantized layers the file describes, filled from its tensors, built beside the model."""
    built = {}
    for name, spec in specs.items():
        try:
            old = model.get_submodule(name)
        except AttributeError:
            raise ValueError(f"load_quantized: {where} has a quantized layer {name!r}, the model has no module "
                             f"of that name") from None
        try:
            shape = in_out_features(old)                 # a float Linear or Conv1D, or quantized
        except AttributeError:
            raise ValueError(f"load_quantized: {name} is a {type(old).__name__} in the model, not a linear layer; "
                             f"{where} holds a quantized linear layer there") from None
        if shape != (spec["in_features"], spec["out_features"]):
            raise ValueError(f"load_quantized: {name} is {shape[0]}->{shape[1]} in the model, "
                             f"{spec['in_features']}->{spec['out_features']} in {where}")
        if (getattr(old, "bias", None) is not None) != spec["bias"]:
            raise ValueError(f"load_quantized: {name} has {'a' if old.bias is not None else 'no'} bias in the "
                             f"model, {'a' if spec['bias'] else 'no'} bias in {where}")
        try:
            layer = empty_layer(spec).to(device)
        except (ValueError, TypeError) as error:
            raise ValueError(f"load_quantized: {where}: layer {name!r}: {error}") from None
        own = {k: tensors.get(f"{name}.{k}") for k in layer.state_dict()}
        for key, value in own.items():
            expected = layer.state_dict()[key]
            if value is None:
                raise ValueError(f"load_quantized: {where} lacks the tensor {name}.{key}")
            if value.shape != expected.shape or (value.dtype != expected.dtype and not expected.is_floating_point()):
                raise ValueError(f"load_quantized: {where}: {name}.{key} is {value.dtype} {tuple(value.shape)}, "
                                 f"expected {expected.dtype} {tuple(expected.shape)} from its layer description")
        layer.load_state_dict(own, strict=True)
        try:   # the packed tensor checks its storage against its metadata; scales must be finite
            layer.nf4() if isinstance(layer, Linear4bit) else layer.int8()
            for key in layer._float_constants:
                if getattr(layer, key) is not None and not bool(torch.isfinite(getattr(layer, key)).all()):
                    raise ValueError(f"{key} holds NaN/inf")
        except (ValueError, TypeError) as error:
            raise ValueError(f"load_quantized: {where}: layer {name!r}: {error}") from None
        built[name] = layer
    return built


def load_quantized(model: nn.Module, path: str | os.PathLike) -> nn.Module:
    """Load a file written by save_quantized into `model` (same architecture), in place.

    Layers listed in the file are replaced by quantized layers, so `model` may be the
    plain float architecture.  Tensors land on the device of the model's parameters.
    Every key must match (strict).  All-or-nothing (module docstring): on any error the
    model keeps its weights and modules."""
    first = next(model.parameters(), None)
    device = first.device if first is not None else torch.device("cpu")
    specs, tensors = read_quantized(path, device)
    where = repr(str(path))
    built = _build_layers(model, specs, tensors, where, device)
    # The rest of the model: every tensor outside the replaced layers, one name per tied group.
    rest = {k: v for k, v in model.state_dict().items() if not any(k.startswith(n + ".") for n in specs)}
    new_keys = {f"{n}.{k}" for n, layer in built.items() for k in layer.state_dict()}
    unexpected = sorted(k for k in tensors if k not in rest and k not in new_keys)
    missing = [g[0] for g in _alias_groups(rest) if not any(k in tensors for k in g)]
    wrong = [f"{k}: {tuple(tensors[k].shape)} in the file, {tuple(v.shape)} in the model"
             for k, v in rest.items() if k in tensors and tensors[k].shape != v.shape]
    if unexpected or missing or wrong:
        problems = [f"{what}: {', '.join(keys[:8])}" + (" ..." if len(keys) > 8 else "")
                    for what, keys in (("missing from the file", missing), ("unexpected in the file", unexpected),
                                       ("wrong shape", wrong)) if keys]
        raise ValueError(f"load_quantized: {where} does not fit {type(model).__name__}: " + " | ".join(problems))
    # Commit: copy the float tensors, then swap the layers in; undone if anything fails on the way.
    copies = [(rest[k], tensors[k]) for k in rest if k in tensors]
    backup = [(dst, dst.detach().clone()) for dst, _ in copies]
    old_layers = {}
    try:
        with torch.no_grad():
            for dst, src in copies:
                dst.copy_(src)
        for name, layer in built.items():
            old_layers[name] = model.get_submodule(name)
            replace_module(model, name, layer)
    except BaseException:
        with torch.no_grad():
            for dst, saved in backup:
                dst.copy_(saved)
        for name, old in old_layers.items():
            replace_module(model, name, old)
        raise
    return model
