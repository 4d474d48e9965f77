"""Adapter files in Hugging Face PEFT's on-disk format: `adapter_config.json` + `adapter_model.safetensors`.

Tensor keys (module path as in `model.named_modules()`):

    base_model.model.<module>.lora_A.weight          (r, in)    all methods
    base_model.model.<module>.lora_B.weight          (out, r)   all methods
    base_model.model.<module>.lora_magnitude_vector  (out,)     DoRA (PEFT's name for our `lora_magnitude`)
    base_model.model.<module>.<name>                 any other adapter tensor under its own name:
                                                     sparse `mask_A` (r, in), `mask_B` (out, r);
                                                     adalora `lora_E` (r, 1), `rank_mask` (r,)
    base_model.model.<module>.<param>                parameters of `modules_to_save` (as PEFT)

The config (PEFT's LoRA fields, which config a file holds): lora/peft_config.py.

`fan_in_fan_out` says, as in PEFT, that the adapted layers store their weight (in, out)
(transformers' `Conv1D`, Hugging Face GPT-2): it is written true when they do. The
factors do not depend on it (`lora_A` is (r, in) and `lora_B` (out, r) in either
layout, in PEFT too), so a file loads whatever its flag says, and one from HF GPT-2
(Conv1D) loads into our GPT-2 (nn.Linear, same names) and back. PEFT does the same:
it resets the flag per layer from the layer's type, with a warning.

`modules_to_save` entries select modules as PEFT selects them (name ends with the
entry); on loading, an entry that selects nothing is ignored, as in PEFT.

Loading freezes the model unless is_trainable=True (PEFT's default), so save, load,
save writes the same file. Loading checks everything (config, file integrity, every
key, shape and dtype, finite values) before it changes the model, and restores the
model if the copy itself fails, so a failed load leaves the model as it was.

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
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from lora.base import AdapterLayer, check_finite
from lora.config import (ADAPTERS_ATTR, CONFIG_ATTR, DEFAULT_ADAPTER, AdapterSet, IA3Config, LoraConfig,
                         forget_adapters, remember_config, remembered_config)
from lora.files import replace_together
from lora.model import (CONTAINERS, adapter_layers, adapter_names, build_adapters, find_modules_to_save,
                        install_adapters, mark_trainable, method_of, modules_outside_adapters, restore_flags,
                        swap_modules)
from lora.multi import check_adapter_name
from lora.named import active_adapter, add_built_adapter, delete_adapter, unload
from lora.peft_config import (CONFIG_NAME, PAIRING_KEY, config_from_peft, pairing_digest,  # noqa: F401
                              read_config, resolve_config)

WEIGHTS_NAME = "adapter_model.safetensors"
PREFIX = "base_model.model."
# Our parameter name -> its name in PEFT files.
TO_FILE = {"lora_A": "lora_A.weight", "lora_B": "lora_B.weight", "lora_magnitude": "lora_magnitude_vector"}
# Sparse LoRA's masks: the factors are saved masked, so a reader that ignores the masks (PEFT) computes
# the same update even if the pruned entries of lora_A / lora_B have drifted since the last apply_masks_().
SPARSE_MASKS = {"lora_A": "mask_A", "lora_B": "mask_B"}


# --- saving ----------------------------------------------------------------------------------
def _adapter_tensors(layer: AdapterLayer) -> dict[str, torch.Tensor]:
    """The layer's own tensors (not its base's), by their attribute names."""
    return {k: v for k, v in layer.state_dict(keep_vars=True).items() if not k.startswith("base_layer.")}


def file_key(module: str, name: str) -> str:
    return f"{PREFIX}{module}.{TO_FILE.get(name, name)}"


def tensor_plan(model: nn.Module, layers: list[tuple[str, AdapterLayer]], config: LoraConfig
                ) -> list[tuple[str, torch.Tensor]]:
    """(file key, tensor in the model) for everything an adapter file holds: the adapters' own
    tensors, trained biases (bias="lora_only": the adapted layers', "all": every `bias`, under
    PEFT's names, e.g. `<module>.base_layer.bias`), and the parameters of `modules_to_save`.

    `layers` may be adapters not yet installed (loading onto a fresh model): their names
    are then still plain layers in `model`, and their keys are as after installation."""
    plan = []
    for module, layer in layers:
        for name, tensor in _adapter_tensors(layer).items():
            plan.append((file_key(module, name), tensor))
    if config.bias != "none":
        adapted = dict(layers)
        for name, module in modules_outside_adapters(model):
            if name in adapted:
                bias, key = getattr(adapted[name].base_layer, "bias", None), f"{name}.base_layer.bias"
            elif config.bias == "all" and not isinstance(module, CONTAINERS):
                bias, key = module._parameters.get("bias"), f"{name}.bias" if name else "bias"
            else:
                continue
            if isinstance(bias, torch.Tensor):
                plan.append((PREFIX + key, bias))
    saved = find_modules_to_save(model, config.modules_to_save, strict=False, targets=[n for n, _ in layers])
    for module, sub in saved:
        for name, p in sub.named_parameters():
            plan.append((f"{PREFIX}{module}.{name}", p))
    unique = dict(plan)  # a key met twice (a saved module that is also a bias holder) is one tensor
    return list(unique.items())




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


# --- loading ---------------------------------------------------------------------------------
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
