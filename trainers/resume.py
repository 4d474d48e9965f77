"""Training checkpoints: what `train(..., out_dir=...)` saves every `checkpoint_every` steps,
and how `train(..., resume=True)` puts a model, optimizer, allocator and RNG back.

A checkpoint (out_dir/checkpoint.pt, written atomically) holds the trainable parameters,
the adapter layers' buffers (masks), every low-rank layer's rank, the optimizer, the
allocator, the RNG states, the data position and the logs: enough to continue to the same
losses, bit for bit, as a run that never stopped. Loading is all-or-nothing: everything
that can be compared with the model is compared first, and a failure halfway puts the
layers, values, allocator, scaler and RNG back (`_load_checkpoint`).
"""
from __future__ import annotations

import random
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn as nn

from allocation.resize import restore_layer, snapshot_layer
from lora.targets import adapter_layers
from trainers.optim import make_optimizer
from trainers.results import atomic_torch_save

if TYPE_CHECKING:                      # trainers.train imports this module
    from trainers.train import TrainConfig


def _low_rank_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    return [(name, layer) for name, layer in adapter_layers(model) if hasattr(layer, "resize")]


def _adapter_buffers(model: nn.Module) -> dict[str, torch.Tensor]:
    """Buffers that belong to adapters (sparsity masks, AdaLoRA's rank mask), not to the bases."""
    out = {}
    for name, layer in adapter_layers(model):
        for bname, buf in layer.named_buffers():
            if not bname.startswith("base_layer."):
                out[f"{name}.{bname}"] = buf
    return out


def _rng_state() -> dict:
    return {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _save_checkpoint(path: Path, model, optimizer, allocator, scaler, *, step: int, position: dict,
                     loss_log: list, eval_log: list, cfg: TrainConfig) -> None:
    trainable = {n: p.detach().to("cpu", copy=True) for n, p in model.named_parameters() if p.requires_grad}
    bad = [n for n, t in trainable.items() if not torch.isfinite(t).all()]
    if bad:  # never replace a good checkpoint with a broken state
        raise RuntimeError(f"checkpoint at step {step}: parameters {bad[:3]} hold NaN/inf; "
                           f"kept the previous checkpoint {str(path)!r}")
    names = {id(p): n for n, p in model.named_parameters()}
    state = {
        "step": step, "position": dict(position), "config": asdict(cfg),
        "trainable": trainable,
        "adapter_buffers": {n: b.detach().to("cpu", copy=True) for n, b in _adapter_buffers(model).items()},
        "ranks": {n: int(layer.rank) for n, layer in _low_rank_layers(model)},
        "adapter_types": {n: type(layer).__name__ for n, layer in adapter_layers(model)},
        "optimizer": optimizer.state_dict(),
        "optimizer_param_names": [[names[id(p)] for p in g["params"]] for g in optimizer.param_groups],
        "allocator": allocator.state_dict() if allocator is not None else None,
        "scaler": scaler.state_dict() if scaler is not None else None,
        "rng": _rng_state(), "loss_log": list(loss_log), "eval_log": list(eval_log),
    }
    atomic_torch_save(path, state)


CHECKPOINT_KEYS = ("step", "position", "config", "trainable", "adapter_buffers", "ranks", "optimizer",
                   "optimizer_param_names", "allocator", "scaler", "rng", "loss_log", "eval_log")
RANKED_DIMS = {"lora_A": 0, "lora_E": 0, "lora_B": 1}   # the rank's dimension in the factors (lora/base.py, svd.py)


def _read_checkpoint(path: Path) -> dict:
    """The checkpoint's dict; ValueError naming the file when it is empty, truncated or not ours."""
    if not path.exists():
        raise FileNotFoundError(f"resume: no checkpoint at {str(path)!r} (train with checkpoint_every > 0 first)")
    if path.stat().st_size == 0:
        raise ValueError(f"resume: {str(path)!r} is empty (0 bytes), not a checkpoint; delete it and train "
                         f"without resume")
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)   # our own file: holds RNG tuples
    except Exception as error:
        raise ValueError(f"resume: cannot read {str(path)!r}: truncated, or not a checkpoint written by train() "
                         f"({type(error).__name__}: {error})") from error
    missing = [k for k in CHECKPOINT_KEYS if k not in state] if isinstance(state, dict) else list(CHECKPOINT_KEYS)
    if missing:
        raise ValueError(f"resume: {str(path)!r} is not a training checkpoint written by train(): "
                         f"it lacks the key(s) {missing}")
    return state


def _check_checkpoint(state: dict, model: nn.Module, allocator, where: str) -> dict[str, int]:
    """Compare the checkpoint's adapters (names, methods, ranks, shapes) and trainable parameters
    with the model before anything changes; returns the layers to resize, {name: rank}."""
    adapters = dict(adapter_layers(model))
    layers = dict(_low_rank_layers(model))
    saved_types = state.get("adapter_types")
    if saved_types is not None:
        for name in sorted(set(saved_types) | set(adapters)):
            theirs, ours = saved_types.get(name), type(adapters[name]).__name__ if name in adapters else None
            if theirs != ours:
                raise ValueError(f"resume: {where}: " + (
                    f"the model has an adapter {name!r} ({ours}) that the checkpoint lacks" if theirs is None else
                    f"the checkpoint has an adapter {name!r} ({theirs}) that the model lacks" if ours is None else
                    f"adapter {name!r} is a {theirs} in the checkpoint, a {ours} in the model"))
    ranks = state["ranks"]
    extra, absent = sorted(set(ranks) - set(layers)), sorted(set(layers) - set(ranks))
    if extra or absent:
        raise ValueError(f"resume: {where}: low-rank layers differ: in the checkpoint only {extra[:5]}, "
                         f"in the model only {absent[:5]}")
    for name, rank in ranks.items():
        if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
            raise ValueError(f"resume: {where}: ranks[{name!r}] must be a positive int, got {rank!r}")
    resize = {name: rank for name, rank in ranks.items() if layers[name].rank != rank}
    current = {n: p for n, p in model.named_parameters() if p.requires_grad}
    saved = state["trainable"]
    missing, extra = sorted(set(current) - set(saved)), sorted(set(saved) - set(current))
    if missing or extra:
        raise ValueError(f"resume: {where}: trainable parameters differ from the checkpoint's: "
                         f"missing from it {missing[:5]}, unexpected in it {extra[:5]}")
    for name, p in current.items():   # the shapes a resize to the saved ranks will give
        owner, _, leaf = name.rpartition(".")
        shape = list(p.shape)
        if owner in resize and leaf in RANKED_DIMS:
            shape[RANKED_DIMS[leaf]] = resize[owner]
        if owner not in resize or leaf in RANKED_DIMS:
            if tuple(saved[name].shape) != tuple(shape):
                raise ValueError(f"resume: {where}: trainable[{name!r}] has shape {tuple(saved[name].shape)}, "
                                 f"the model's is {tuple(shape)}" + (" at the saved rank" if owner in resize else ""))
    buffers = _adapter_buffers(model)
    if set(buffers) != set(state["adapter_buffers"]):
        raise ValueError(f"resume: {where}: adapter buffers differ: in the checkpoint only "
                         f"{sorted(set(state['adapter_buffers']) - set(buffers))[:5]}, in the model only "
                         f"{sorted(set(buffers) - set(state['adapter_buffers']))[:5]}")
    names = [n for group in state["optimizer_param_names"] for n in group]
    unknown = [n for n in names if n not in current]
    if unknown or len(set(names)) != len(names):
        raise ValueError(f"resume: {where}: optimizer_param_names must name each trainable parameter once; "
                         f"unknown or repeated: {unknown[:5] or names}")
    if (allocator is None) != (state["allocator"] is None):
        raise ValueError(f"resume: {where} was written " + ("with" if allocator is None else "without") +
                         " an allocator, the run resumes " + ("without" if allocator is None else "with") +
                         " one; pass the same allocator as the run that wrote it")
    return resize


def _check_after_resize(state: dict, model: nn.Module, where: str) -> None:
    """Exact shapes, once the layers have the saved ranks (the optimizer's moments included)."""
    params = dict(model.named_parameters())
    tensors = {**{("trainable", n): t for n, t in state["trainable"].items()},
               **{("adapter_buffers", n): t for n, t in state["adapter_buffers"].items()}}
    live = {**{("trainable", n): params[n] for n in state["trainable"]}, **{
        ("adapter_buffers", n): b for n, b in _adapter_buffers(model).items()}}
    for (key, name), t in tensors.items():
        if not torch.is_tensor(t) or t.shape != live[key, name].shape:
            raise ValueError(f"resume: {where}: {key}[{name!r}] has shape {tuple(getattr(t, 'shape', ()))}, "
                             f"the model's is {tuple(live[key, name].shape)}")
    names = [n for group in state["optimizer_param_names"] for n in group]
    for index, entry in state["optimizer"].get("state", {}).items():
        for k, v in entry.items():
            if torch.is_tensor(v) and v.dim() > 0 and (index >= len(names) or v.shape != params[names[index]].shape):
                what = names[index] if index < len(names) else f"#{index}"
                raise ValueError(f"resume: {where}: optimizer state {k!r} of {what} has shape {tuple(v.shape)}, "
                                 f"the parameter's is {tuple(params[what].shape) if what in params else 'unknown'}")


def _load_checkpoint(path: Path, model, allocator, scaler, cfg: TrainConfig):
    """Restore a checkpoint into `model` and return (optimizer, state), all-or-nothing.

    Everything that can be compared is compared first (adapters, ranks, trainable names and
    shapes, buffers, optimizer parameter names, whether an allocator ran). Then, in this order:
    resize to the saved ranks (a dynamic allocator may have resized layers, so the shapes
    differ from a fresh model's), exact shape checks, optimizer, allocator, scaler, the
    parameter and buffer values, and the RNG last (resizing draws random numbers). If any
    of it fails, the layers (same Parameter objects), values, allocator, scaler and RNG are
    put back before the error goes on."""
    state = _read_checkpoint(path)
    where = repr(str(path))
    resize = _check_checkpoint(state, model, allocator, where)
    layers = dict(_low_rank_layers(model))
    current = {n: p for n, p in model.named_parameters() if p.requires_grad}
    buffers = _adapter_buffers(model)
    layer_snaps = {name: snapshot_layer(layers[name]) for name in resize}   # objects, values, scaling
    values = [(t, t.detach().clone()) for n, t in list(current.items()) + list(buffers.items())
              if n.rpartition(".")[0] not in resize]
    backups = {"rng": _rng_state(), "allocator": allocator.state_dict() if allocator is not None else None,
               "scaler": scaler.state_dict() if scaler is not None else None}
    try:
        keep = bool(getattr(getattr(allocator, "config", None), "keep_scaling", False))   # alpha follows r
        for name, rank in resize.items():
            layers[name].resize(rank, keep_scaling=keep)
        _check_after_resize(state, model, where)
        params = dict(model.named_parameters())
        order = [params[n] for group in state["optimizer_param_names"] for n in group]
        optimizer = make_optimizer(model, lr=cfg.lr, weight_decay=cfg.weight_decay, paged=cfg.paged_adamw,
                                   params=order)
        for key, target in (("optimizer", optimizer), ("allocator", allocator), ("scaler", scaler)):
            if target is not None and state[key] is not None:
                try:
                    target.load_state_dict(state[key])
                except (ValueError, KeyError, TypeError, IndexError) as error:
                    raise ValueError(f"resume: {where}: its {key!r} state does not load "
                                     f"({type(error).__name__}: {error})") from error
        with torch.no_grad():
            for name, p in model.named_parameters():
                if p.requires_grad:
                    p.copy_(state["trainable"][name])
            for name, buf in _adapter_buffers(model).items():
                buf.copy_(state["adapter_buffers"][name])
        _set_rng_state(state["rng"])
    except BaseException:
        for name, snap in layer_snaps.items():
            restore_layer(layers[name], snap)
        with torch.no_grad():
            for t, saved in values:
                t.copy_(saved)
        if allocator is not None:
            allocator.load_state_dict(backups["allocator"])
        if scaler is not None:
            scaler.load_state_dict(backups["scaler"])
        _set_rng_state(backups["rng"])
        raise
    return optimizer, state
