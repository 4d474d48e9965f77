"""Loading adapters: `load_adapter` (one folder, optionally as a named adapter) and `load_adapters`.

Loading freezes the model unless is_trainable=True (PEFT's default), so save, load,
save writes the same file. Loading checks everything (config, file integrity, every
key, shape and dtype, finite values) before it changes the model, and restores the
model if the copy itself fails, so a failed load leaves the model as it was.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn as nn
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file

from lora.adapter_format import PREFIX, WEIGHTS_NAME, tensor_plan
from lora.checks import check_finite
from lora.config import (ADAPTERS_ATTR, CONFIG_ATTR, DEFAULT_ADAPTER, AdapterSet, IA3Config, forget_adapters,
                         remember_config, remembered_config)
from lora.model import build_adapters, install_adapters, mark_trainable, method_of, swap_modules
from lora.targets import adapter_layers, adapter_names
from lora.trainable import restore_flags
from lora.multi import check_adapter_name
from lora.named import active_adapter, add_built_adapter, delete_adapter, unload
from lora.peft_config import CONFIG_NAME, PAIRING_KEY, pairing_digest, read_config


def read_tensors(path) -> dict[str, torch.Tensor]:
    """The tensors of the weights file, keys with PEFT's prefix. Refuses a damaged file, a
    floating tensor holding NaN or inf (naming the key), and a file written with another
    config than the one beside it (see PAIRING_KEY)."""
    file = Path(path) / WEIGHTS_NAME
    if not file.exists():
        raise FileNotFoundError(f"load_adapter: no {WEIGHTS_NAME} in {Path(path)}")
    try:
        state = load_file(str(file))
        with safe_open(str(file), "pt") as handle:
            metadata = handle.metadata() or {}
    except (SafetensorError, OSError, ValueError, RuntimeError) as err:
        raise ValueError(f"load_adapter: {file} is truncated or corrupt ({err})") from None
    digest = metadata.get(PAIRING_KEY)
    config_file = Path(path) / CONFIG_NAME
    if digest is not None and config_file.exists():
        try:
            meta = json.loads(config_file.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError):
            meta = None   # read_config names that problem
        if isinstance(meta, dict) and pairing_digest(meta) != digest:
            raise ValueError(f"load_adapter: {file} was written together with another {CONFIG_NAME} than the "
                             f"one in {Path(path)} (their ranks, alphas, scaling, init or method differ): a save "
                             f"interrupted between its two files, or files from two saves; save again")
    for key, tensor in state.items():
        if tensor.is_floating_point():
            check_finite(tensor, f"load_adapter: {file}: {key}")
    return {(k if k.startswith(PREFIX) else PREFIX + k): v for k, v in state.items()}


def _copy_into(dest: torch.Tensor, value: torch.Tensor) -> None:
    dest.copy_(value)


def _check_kind(path, key: str, value: torch.Tensor, dest: torch.Tensor) -> None:
    """A file tensor must be of the destination's kind: floating for factors, bool for masks,
    and AdaLoRA's float `rank_mask` must hold only 0 and 1."""
    if dest.is_floating_point() != value.is_floating_point() or (dest.dtype == torch.bool) != (value.dtype == torch.bool):
        raise ValueError(f"load_adapter: {path}: {key} is {value.dtype} in the file, the model holds "
                         f"{dest.dtype} there")
    if key.endswith(".rank_mask") and not ((value == 0) | (value == 1)).all():
        raise ValueError(f"load_adapter: {path}: {key} must hold only 0 and 1, got {value.unique().tolist()}")


def _targets(model: nn.Module, config, adapter: str | None) -> tuple[list, str]:
    """(module name, layer) pairs to fill, and how they come: "existing" (in the model), "new" (built
    aside for a model without adapters) or "named" (built aside as one more named adapter)."""
    names = adapter_names(model)
    if names and (adapter is None or adapter in names):
        existing = adapter_layers(model, adapter)
        for name, layer in existing:
            if layer.merged:
                raise ValueError(f"load_adapter: {name!r} is merged into its base; unmerge first "
                                 f"(lora.unmerge_lora_weights(model))")
            if method_of(layer) != config.method:
                raise ValueError(f"load_adapter: the file holds {config.method!r} adapters, the model has "
                                 f"{type(layer).__name__} at {name!r}")
            if isinstance(config, IA3Config):
                if layer.feedforward != config.is_feedforward(name):
                    raise ValueError(f"load_adapter: {name!r} has feedforward={layer.feedforward}, the file "
                                     f"says {config.is_feedforward(name)}")
                continue
            rslora = getattr(layer, "use_rslora", False)
            if layer.alpha != config.alpha_for(name) or rslora != config.use_rslora:
                raise ValueError(f"load_adapter: {name!r} has alpha={layer.alpha}, use_rslora="
                                 f"{rslora}; the file says alpha={config.alpha_for(name)}, "
                                 f"use_rslora={config.use_rslora}")
        return existing, "existing"
    pissa = getattr(config, "init", None) == "pissa"
    if names:
        if pissa:
            raise ValueError("load_adapter: a PiSSA adapter rewrites the base weight, which the model's other "
                             "adapters share; load it into a model without adapters")
        return build_adapters(model, config, shared=True), "named"
    return build_adapters(model, config, copy_bases=pissa), "new"


def load_adapter(model: nn.Module, path, *, adapter: str | None = None, is_trainable: bool = False) -> nn.Module:
    """Load the adapter folder `path` into `model` and return it.

    A model without adapters gets them added from the saved config first (as
    add_lora_to_model would); a model with adapters must match the file exactly.
    `adapter` names it (lora.named): an existing adapter of that name is filled from
    the file, else it is added as one more adapter over the same base (the active one
    stays active, as PEFT's load_adapter leaves it).
    The whole model is then frozen, as PEFT's `is_trainable=False` leaves it (for
    inference); `is_trainable=True` trains what the (active) config trains (adapters,
    modules_to_save, biases). The model remembers the file's config, so saving it
    again writes the same file. Everything is checked before anything is changed.
    """
    if adapter is not None:
        check_adapter_name(adapter, "load_adapter")
    config = read_config(path)
    file_state = read_tensors(path)
    grad_flags = [(p, p.requires_grad) for p in model.parameters()]
    old_attrs = {k: model.__dict__[k] for k in (CONFIG_ATTR, ADAPTERS_ATTR) if k in model.__dict__}
    try:
        layers, how = _targets(model, config, adapter)   # new adapters are built aside (build_adapters)
        plan = tensor_plan(model, layers, config)  # (file key, destination tensor)
        expected = {key for key, _ in plan}
        values = []
        for key, dest in plan:
            if key not in file_state:
                raise ValueError(f"load_adapter: {path}: the model expects {key} {tuple(dest.shape)}, "
                                 f"the file does not have it (targets or method differ)")
            if tuple(file_state[key].shape) != tuple(dest.shape):
                raise ValueError(f"load_adapter: {path}: shape mismatch at {key}: file "
                                 f"{tuple(file_state[key].shape)}, model {tuple(dest.shape)}")
            _check_kind(path, key, file_state[key], dest)
            values.append(file_state[key].to(device=dest.device, dtype=dest.dtype))
        extra = [k for k in file_state if k not in expected]
        if extra:
            raise ValueError(f"load_adapter: {path}: the file has {extra[0]}, which the model does not "
                             f"expect ({len(extra)} unexpected keys; targets differ)")
        backups = [dest.detach().clone() for _, dest in plan]   # adapter-sized: put back on failure
    except BaseException:
        restore_flags(grad_flags)  # building adapters froze bases: undo
        raise
    installed = False
    try:
        with torch.no_grad():
            for (_, dest), value in zip(plan, values):
                _copy_into(dest, value)
        if how == "new":
            install_adapters(model, layers, config)
            installed = True
            if adapter is not None:
                model.__dict__[ADAPTERS_ATTR] = AdapterSet({adapter: config}, adapter)
        elif how == "named":
            add_built_adapter(model, adapter, config, layers)
            installed = True
        if how != "named" and (adapter is None or adapter == active_adapter(model)):
            remember_config(model, config)
        if is_trainable:
            mark_trainable(model, remembered_config(model) or config)
        else:
            model.requires_grad_(False)
    except BaseException:
        with torch.no_grad():
            for (_, dest), old in zip(plan, backups):
                dest.copy_(old)
        if installed and how == "new":
            swap_modules(model, [(name, layer.base_layer) for name, layer in layers])
        elif installed and how == "named":
            delete_adapter(model, adapter)
        forget_adapters(model)
        model.__dict__.update(old_attrs)
        restore_flags(grad_flags)
        raise
    return model


def load_adapters(model: nn.Module, path, *, is_trainable: bool = False) -> nn.Module:
    """Load every adapter of a folder PEFT's save_pretrained (or `save_adapters`) wrote: `path`
    itself as "default" if it holds an adapter, and each subfolder that holds one under the
    subfolder's name. The model must hold no adapters; if any load fails, every adapter is
    removed again and the flags restored, so the model is left as it was."""
    folder = Path(path)
    if adapter_names(model):
        raise ValueError(f"load_adapters: {type(model).__name__} already has adapters {adapter_names(model)}; "
                         f"use load_adapter(model, path, adapter=name) for one more")
    names = ([DEFAULT_ADAPTER] if (folder / CONFIG_NAME).exists() else []) + sorted(
        p.name for p in folder.iterdir() if p.is_dir() and (p / CONFIG_NAME).exists()) if folder.is_dir() else []
    if not names:
        raise FileNotFoundError(f"load_adapters: no {CONFIG_NAME} in {folder} or its subfolders")
    flags = [(p, p.requires_grad) for p in model.parameters()]
    try:
        for name in names:
            load_adapter(model, folder if name == DEFAULT_ADAPTER else folder / name, adapter=name,
                         is_trainable=is_trainable)
    except BaseException:
        if adapter_names(model):
            unload(model)
        restore_flags(flags)
        raise
    return model
