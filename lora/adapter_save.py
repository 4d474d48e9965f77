"""Saving adapters: `save_adapter` (one adapter per folder) and `save_adapters` (PEFT's layout).

Saving writes both files to temporaries first and then renames them into place; a
failure before the renames leaves the folder as it was, and a failed rename puts back
what the earlier rename replaced. A process killed between the two renames can still
leave a new file beside an old one: the weights file records, in its safetensors
metadata, a digest of the config fields that give its tensors their meaning (ranks,
alphas, scaling, init, method), and loading refuses a pair whose digests differ.
"""
from __future__ import annotations

import json
import warnings
from pathlib import Path

import torch
import torch.nn as nn
from safetensors.torch import save_file

from lora.adapter_format import SPARSE_MASKS, WEIGHTS_NAME, file_key, tensor_plan
from lora.checks import check_finite
from lora.config import DEFAULT_ADAPTER, LoraConfig
from lora.files import replace_together
from lora.model import CONTAINERS
from lora.targets import adapter_layers, adapter_names, modules_outside_adapters
from lora.peft_config import CONFIG_NAME, PAIRING_KEY, pairing_digest, resolve_config


def _write_weights(state: dict, metadata: dict, tmp: str) -> None:
    save_file(state, tmp, metadata=metadata)


def _write_config(text: str, tmp: str) -> None:
    Path(tmp).write_text(text)


def save_adapter(model: nn.Module, path, config: LoraConfig | None = None, *, adapter: str | None = None,
                 base_model_name_or_path: str | None = None, task_type: str | None = None,
                 revision: str | None = None) -> Path:
    """Write the model's adapters to the folder `path` (created if needed); returns the folder.

    `adapter`: which named adapter (lora.named) to write, by default the active one; the folder
    then holds that adapter alone, as PEFT writes each adapter (`save_adapters` writes them all).
    `config` (by default the one the model remembers from add_lora_to_model / load_adapter)
    supplies target names, dropout, bias and modules_to_save; ranks and alphas are read from
    the layers. A model that remembers none gets all of it inferred (`resolve_config`).
    Parameters that train but that the file will not hold are named in a warning.
    All-or-nothing: everything is checked (a tensor holding NaN or inf is refused, by
    key) before the folder is touched, and the two files replace the old pair together
    (see the module docstring); a folder created for a save that fails is removed.
    """
    folder = Path(path)
    extra = dict(base_model_name_or_path=base_model_name_or_path, task_type=task_type, revision=revision)
    _write_folders(folder, [_prepare_save(model, folder, config, adapter, extra)])
    return folder


def save_adapters(model: nn.Module, path, **meta) -> Path:
    """Write every named adapter the way PEFT's save_pretrained lays them out: the one named
    "default" in `path` itself, each other in `path/<name>/`. All files are replaced together
    (lora.files.replace_together), so a failure leaves every folder as it was. `meta`:
    base_model_name_or_path=, task_type=, revision= as in save_adapter."""
    folder = Path(path)
    names = adapter_names(model)
    if not names:
        raise ValueError(f"save_adapters: {type(model).__name__} has no adapters")
    plans = [_prepare_save(model, folder if name == DEFAULT_ADAPTER else folder / name, None, name, meta)
             for name in names]
    _write_folders(folder, plans)
    return folder


def _prepare_save(model: nn.Module, folder: Path, config, adapter: str | None, extra: dict):
    """(folder, tensors, config text, safetensors metadata) for one adapter; checks everything."""
    if folder.exists() and not folder.is_dir():
        raise NotADirectoryError(f"save_adapter: {folder} exists and is not a folder")
    if adapter is not None and adapter not in adapter_names(model):
        raise ValueError(f"save_adapter: no adapter named {adapter!r}; the model's adapters: "
                         f"{adapter_names(model)}")
    config, meta = resolve_config(model, config, adapter)
    meta.update(extra)
    layers = adapter_layers(model, adapter)
    # Sparse LoRA: store what it computes with, A * M_A and B * M_B
    masked = {file_key(module, name): getattr(layer, name) * getattr(layer, mask)
              for module, layer in layers for name, mask in SPARSE_MASKS.items()
              if isinstance(getattr(layer, mask, None), torch.Tensor)}
    plan = tensor_plan(model, layers, config)
    planned = {id(tensor) for _, tensor in plan}
    in_adapters = {id(p) for _, m in modules_outside_adapters(model) if isinstance(m, CONTAINERS)
                   for p in m.parameters()}
    left_out = [n for n, p in model.named_parameters()
                if p.requires_grad and id(p) not in planned and (adapter is None or id(p) not in in_adapters)]
    if left_out:
        warnings.warn(f"save_adapter: {len(left_out)} trainable parameters are not in the adapter file "
                      f"(neither adapters, nor modules_to_save {list(config.modules_to_save)}, nor biases under "
                      f"bias={config.bias!r}): {left_out[:5]}{' ...' if len(left_out) > 5 else ''}")
    state = {key: masked.get(key, tensor).detach().cpu().clone().contiguous() for key, tensor in plan}
    for key, tensor in state.items():
        if tensor.is_floating_point():
            check_finite(tensor, f"save_adapter: {key}")
    text = json.dumps(meta, indent=2, sort_keys=True) + "\n"
    return folder, state, text, {"format": "pt", PAIRING_KEY: pairing_digest(meta)}


def _write_folders(root: Path, plans: list) -> None:
    """Write every (folder, state, text, metadata) pair, all files replaced together; folders this
    call created are removed again if it fails."""
    created = [p for p in (*[f for f, *_ in plans][::-1], root, *root.parents) if not p.exists()]
    created = sorted(set(created), key=lambda p: -len(p.parts))                  # deepest first
    files = []
    for folder, state, text, metadata in plans:
        files += [(folder / WEIGHTS_NAME, lambda tmp, s=state, m=metadata: _write_weights(s, m, tmp)),
                  (folder / CONFIG_NAME, lambda tmp, t=text: _write_config(t, tmp))]
    try:
        for folder, *_ in plans:
            folder.mkdir(parents=True, exist_ok=True)
        replace_together(files)
    except BaseException:
        for made in created:
            try:
                made.rmdir()   # only if still empty
            except OSError:
                pass
        raise
