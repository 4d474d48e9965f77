"""Adapter files in Hugging Face PEFT's on-disk format: `adapter_config.json` + `adapter_model.safetensors`.

Tensor keys (module path as in `model.named_modules()`):

    base_model.model.<module>.lora_A.weight          (r, in)    all methods
    base_model.model.<module>.lora_B.weight          (out, r)   all methods
    base_model.model.<module>.lora_magnitude_vector  (out,)     DoRA (PEFT's name for our `lora_magnitude`)
    base_model.model.<module>.<name>                 any other adapter tensor under its own name:
                                                     sparse `mask_A` (r, in), `mask_B` (out, r);
                                                     adalora `lora_E` (r, 1), `rank_mask` (r,)
    base_model.model.<module>.<param>                parameters of `modules_to_save` (as PEFT)

The config holds PEFT's LoRA fields (peft_type, r, lora_alpha, lora_dropout,
target_modules, rank_pattern, alpha_pattern, use_rslora, use_dora, bias, ...) and,
for methods other than lora/dora (PEFT tells those apart by `use_dora`), `"method"`.
Per-layer ranks and alphas as they are at save time (after any `resize`) go into
`rank_pattern` / `alpha_pattern` under full module names. `peft_type` is "LORA"
where PEFT computes the same function from the file (lora, dora, and sparse, whose
factors are stored masked; PEFT ignores the masks); HiRA and AdaLoRA's SVD
form get "NANOPEFT_HIRA" / "NANOPEFT_ADALORA", so PEFT refuses them instead of
silently loading a different function.

`fan_in_fan_out` says, as in PEFT, that the adapted layers store their weight (in, out)
(transformers' `Conv1D`, Hugging Face GPT-2): it is written true when they do. The
factors do not depend on it (`lora_A` is (r, in) and `lora_B` (out, r) in either
layout, in PEFT too), so a file loads whatever its flag says, and one from HF GPT-2
(Conv1D) loads into our GPT-2 (nn.Linear, same names) and back. PEFT does the same:
it resets the flag per layer from the layer's type, with a warning.

Loading checks everything (config, file integrity, every key and shape) before it
changes the model, so a failed load leaves the model as it was.
"""
from __future__ import annotations

import glob
import json
import os
import secrets
from collections import Counter
from pathlib import Path

import torch
import torch.nn as nn
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from lora.base import AdapterLayer, weight_layout
from lora.model import (ADAPTER_CLASSES, METHODS, LoraConfig, adapter_layers, build_adapters, find_modules_to_save,
                        install_adapters, modules_outside_adapters, name_matches, pattern_value)

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PREFIX = "base_model.model."
# Our parameter name -> its name in PEFT files.
TO_FILE = {"lora_A": "lora_A.weight", "lora_B": "lora_B.weight", "lora_magnitude": "lora_magnitude_vector"}
# Sparse LoRA's masks: the factors are saved masked, so a reader that ignores the masks (PEFT) computes
# the same update even if the pruned entries of lora_A / lora_B have drifted since the last apply_masks_().
SPARSE_MASKS = {"lora_A": "mask_A", "lora_B": "mask_B"}
PEFT_TYPES = {"lora": "LORA", "dora": "LORA", "sparse": "LORA",
              "hira": "NANOPEFT_HIRA", "adalora": "NANOPEFT_ADALORA"}
INIT_TO_PEFT = {"kaiming": True, "gaussian": "gaussian", "pissa": "pissa"}
# PEFT options this loader does not implement: a file using them is refused, not half-understood.
UNSUPPORTED = {"layers_to_transform": None, "layers_pattern": None,
               "lora_bias": False, "use_qalora": False, "exclude_modules": None,
               "layer_replication": None, "target_parameters": None, "trainable_token_indices": None}


# --- saving ----------------------------------------------------------------------------------
def _method_of(layer: AdapterLayer) -> str:
    for method, cls in ADAPTER_CLASSES.items():
        if type(layer) is cls:
            return method
    raise TypeError(f"save_adapter: no method is known for adapter class {type(layer).__name__}")


def _exact_pattern(values: dict[str, object], default, what: str) -> dict:
    """A PEFT pattern dict that gives each name exactly its value (first matching key wins)."""
    pattern = {n: v for n, v in values.items() if v != default}
    if any(pattern_value(pattern, n, default) != v for n, v in values.items()):
        # A full name can be the dotted suffix of another: list every name, longest first.
        pattern = dict(sorted(values.items(), key=lambda kv: -len(kv[0])))
        if any(pattern_value(pattern, n, default) != v for n, v in values.items()):
            raise ValueError(f"save_adapter: cannot express the per-layer {what} as a PEFT pattern")
    return pattern


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
            elif config.bias == "all" and not isinstance(module, AdapterLayer):
                bias, key = module._parameters.get("bias"), f"{name}.bias" if name else "bias"
            else:
                continue
            if isinstance(bias, torch.Tensor):
                plan.append((PREFIX + key, bias))
    for module, sub in find_modules_to_save(model, config.modules_to_save):
        for name, p in sub.named_parameters():
            plan.append((f"{PREFIX}{module}.{name}", p))
    unique = dict(plan)  # a key met twice (a saved module that is also a bias holder) is one tensor
    return list(unique.items())


def _infer_extras(model: nn.Module, layers) -> tuple[str, tuple[str, ...]]:
    """(bias, modules_to_save) as the model's requires_grad flags show them: the top-most
    modules outside the adapters whose parameters all train, and which biases train."""
    saved: list[str] = []
    for name, module in modules_outside_adapters(model):
        params = list(module.parameters())
        if not name or isinstance(module, AdapterLayer) or not params:
            continue
        if any(name.startswith(s + ".") for s in saved) or not all(p.requires_grad for p in params):
            continue
        saved.append(name)
    adapted_bias = any(getattr(getattr(layer.base_layer, "bias", None), "requires_grad", False)
                       for _, layer in layers)
    other_bias = any(isinstance(m._parameters.get("bias"), torch.Tensor) and m._parameters["bias"].requires_grad
                     for n, m in modules_outside_adapters(model) if not isinstance(m, AdapterLayer)
                     and not any(n == s or n.startswith(s + ".") for s in saved))
    return ("all" if other_bias else "lora_only" if adapted_bias else "none"), tuple(saved)


def resolve_config(model: nn.Module, config: LoraConfig | None = None) -> tuple[LoraConfig, dict]:
    """The config to save for the adapters now in `model` (given, or inferred from the layers
    and the requires_grad flags) and the matching adapter_config.json content."""
    layers = adapter_layers(model)
    if not layers:
        raise ValueError(f"save_adapter: {type(model).__name__} has no adapter layers")
    methods = {_method_of(layer) for _, layer in layers}
    if len(methods) != 1:
        raise ValueError(f"save_adapter: one adapter file holds one method, the model mixes {sorted(methods)}")
    method = methods.pop()
    names = [n for n, _ in layers]
    ranks = {n: layer.rank for n, layer in layers}
    alphas = {n: layer.alpha for n, layer in layers}
    if config is None:
        first = layers[0][1]
        bias, modules_to_save = _infer_extras(model, layers)
        config = LoraConfig(r=Counter(ranks.values()).most_common(1)[0][0],
                            lora_alpha=Counter(alphas.values()).most_common(1)[0][0],
                            lora_dropout=first.dropout_p, target_modules=names, method=method,
                            use_rslora=getattr(first, "use_rslora", False),
                            init=getattr(first, "init", "kaiming"), bias=bias, modules_to_save=modules_to_save)
    if config.method != method:
        raise ValueError(f"save_adapter: config.method is {config.method!r} but the model's adapters are "
                         f"{method!r} ({type(layers[0][1]).__name__})")
    for n, layer in layers:
        if getattr(layer, "use_rslora", False) != config.use_rslora:
            raise ValueError(f"save_adapter: {n} has use_rslora={not config.use_rslora}, the config says "
                             f"{config.use_rslora}")
    targets = config.target_modules
    if isinstance(targets, str) or any(not any(name_matches(n, t) for n in names) for t in targets) \
            or any(not any(name_matches(n, t) for t in targets) for n in names):
        targets = names  # the exact set of adapted modules: unambiguous for PEFT and for us
    meta = {
        "peft_type": PEFT_TYPES[method],
        "r": config.r,
        "lora_alpha": config.lora_alpha,
        "lora_dropout": config.lora_dropout,
        "target_modules": list(targets),
        "rank_pattern": _exact_pattern(ranks, config.r, "ranks"),
        "alpha_pattern": _exact_pattern(alphas, config.lora_alpha, "alphas"),
        "use_rslora": config.use_rslora,
        "use_dora": method == "dora",
        "init_lora_weights": INIT_TO_PEFT[config.init],
        "bias": config.bias,
        "modules_to_save": list(config.modules_to_save) or None,
        "fan_in_fan_out": any(weight_layout(layer.base_layer) == "in_out" for _, layer in layers),
        "inference_mode": True,
        "layers_to_transform": None,
        "layers_pattern": None,
    }
    if method not in ("lora", "dora"):  # PEFT knows those two by use_dora; "method" would only warn there
        meta["method"] = method
    return config, meta


def _atomic_write(path: Path, write) -> None:
    """write(tmp_path), then rename over `path`: readers see the old file or the new one.

    The temporary `.NAME.PID.RANDOM.tmp` sits beside `path` (a rename is atomic only within one
    file system). It is created with mode 0o666, so the kernel applies the user's umask and the
    file gets the same permissions as any other the user writes (mkstemp's private 0o600 would
    hide results from colleagues on a shared machine). A writer killed before its rename leaves
    its temporary behind; the next write of the same file removes those whose process is gone.
    Every reader of a results folder ignores names that start with '.'."""
    path = Path(path)
    _remove_stale_temps(path)
    while True:
        tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
        try:
            os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
            break
        except FileExistsError:                   # another writer drew the same name: draw again
            continue
    try:
        wanted = tmp.stat().st_mode & 0o777
        write(tmp)
        if tmp.stat().st_mode & 0o777 != wanted:  # a writer that makes its own file (safetensors: 0o600)
            tmp.chmod(wanted)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _remove_stale_temps(path: Path) -> None:
    """Delete `.NAME.PID.*.tmp` siblings of `path` left by writers that no longer run (on this
    machine); a live writer's temporary, or one we cannot attribute, is left alone."""
    for tmp in path.parent.glob(f".{glob.escape(path.name)}.*.tmp"):
        parts = tmp.name[len(path.name) + 2:].split(".")          # [pid, random, "tmp"]
        if len(parts) != 3 or not parts[0].isdigit() or int(parts[0]) == os.getpid():
            continue
        try:
            os.kill(int(parts[0]), 0)             # signal 0: only asks whether the process exists
        except ProcessLookupError:
            tmp.unlink(missing_ok=True)
        except OSError:                           # it exists but belongs to another user
            pass


def save_adapter(model: nn.Module, path, config: LoraConfig | None = None, *,
                 base_model_name_or_path: str | None = None, task_type: str | None = None,
                 revision: str | None = None) -> Path:
    """Write the model's adapters to the folder `path` (created if needed); returns the folder.

    `config` (the one given to add_lora_to_model) supplies target names, dropout, bias and
    modules_to_save; ranks and alphas are read from the layers. Without a config, all of it
    is inferred from the layers and from which parameters train.
    Each file is written to a temporary file and renamed into place.
    """
    folder = Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    config, meta = resolve_config(model, config)
    meta.update(base_model_name_or_path=base_model_name_or_path, task_type=task_type, revision=revision)
    layers = adapter_layers(model)
    # Sparse LoRA: store what it computes with, A * M_A and B * M_B
    masked = {file_key(module, name): getattr(layer, name) * getattr(layer, mask)
              for module, layer in layers for name, mask in SPARSE_MASKS.items()
              if isinstance(getattr(layer, mask, None), torch.Tensor)}
    state = {key: masked.get(key, tensor).detach().cpu().clone().contiguous()
             for key, tensor in tensor_plan(model, layers, config)}
    _atomic_write(folder / WEIGHTS_NAME, lambda tmp: save_file(state, tmp, metadata={"format": "pt"}))
    _atomic_write(folder / CONFIG_NAME,
                  lambda tmp: Path(tmp).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n"))
    return folder


# --- loading ---------------------------------------------------------------------------------
def read_config(path) -> LoraConfig:
    """The LoraConfig an adapter folder describes (ours or PEFT's LoRA/DoRA)."""
    file = Path(path) / CONFIG_NAME
    if not file.exists():
        raise FileNotFoundError(f"load_adapter: no {CONFIG_NAME} in {Path(path)}")
    try:
        meta = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"load_adapter: {file} is not valid JSON ({err})") from None
    if not isinstance(meta, dict):
        raise ValueError(f"load_adapter: {file} must hold a JSON object, got {type(meta).__name__}")
    method = meta.get("method") or ("dora" if meta.get("use_dora") else "lora")
    if method not in METHODS:
        raise ValueError(f"load_adapter: {file}: unknown method {method!r}; known methods: {', '.join(METHODS)}")
    peft_type = meta.get("peft_type")
    if peft_type != PEFT_TYPES[method]:
        raise ValueError(f"load_adapter: {file}: peft_type {peft_type!r} with method {method!r}; "
                         f"expected {PEFT_TYPES[method]!r} (only LoRA-family adapters are supported)")
    if not isinstance(meta.get("fan_in_fan_out", False), bool):
        raise ValueError(f"load_adapter: {file}: fan_in_fan_out must be true or false, "
                         f"got {meta['fan_in_fan_out']!r}")
    for key, neutral in UNSUPPORTED.items():
        if meta.get(key, neutral) not in (neutral, [], {}, ""):
            raise ValueError(f"load_adapter: {file}: PEFT option {key}={meta[key]!r} is not supported")
    raw_init = meta.get("init_lora_weights", True)
    if raw_init == "pissa":
        init = "pissa"  # deterministic from W0, so a fresh model gets the same residual base
    elif raw_init in (True, False, None, "gaussian"):
        # only the starting values of A and B differ, and the file overwrites those
        init = "gaussian" if raw_init == "gaussian" and method in ("lora", "sparse") else "kaiming"
    else:  # e.g. "pissa_niter_4", "olora", "loftq": they rewrite the base in ways not reproduced here
        raise ValueError(f"load_adapter: {file}: init_lora_weights={raw_init!r} is not supported "
                         f"(it changes the base weights); supported: true, false, 'gaussian', 'pissa'")
    targets = meta.get("target_modules")
    if targets is None:
        raise ValueError(f"load_adapter: {file} has no target_modules")
    try:
        return LoraConfig(r=meta["r"], lora_alpha=meta["lora_alpha"],
                          lora_dropout=meta.get("lora_dropout", 0.0), target_modules=targets, method=method,
                          rank_pattern=dict(meta.get("rank_pattern") or {}),
                          alpha_pattern=dict(meta.get("alpha_pattern") or {}),
                          use_rslora=bool(meta.get("use_rslora", False)), init=init,
                          bias=meta.get("bias", "none"), modules_to_save=tuple(meta.get("modules_to_save") or ()))
    except KeyError as err:
        raise ValueError(f"load_adapter: {file} lacks the field {err}") from None
    except (ValueError, TypeError) as err:
        raise ValueError(f"load_adapter: {file}: {err}") from None


def read_tensors(path) -> dict[str, torch.Tensor]:
    file = Path(path) / WEIGHTS_NAME
    if not file.exists():
        raise FileNotFoundError(f"load_adapter: no {WEIGHTS_NAME} in {Path(path)}")
    try:
        state = load_file(str(file))
    except (SafetensorError, OSError, ValueError, RuntimeError) as err:
        raise ValueError(f"load_adapter: {file} is truncated or corrupt ({err})") from None
    return {(k if k.startswith(PREFIX) else PREFIX + k): v for k, v in state.items()}


def _targets(model: nn.Module, config: LoraConfig) -> tuple[list, bool]:
    """(module name, layer) pairs to fill, and whether they are new (not yet in the model)."""
    existing = adapter_layers(model)
    if existing:
        for name, layer in existing:
            if layer.merged:
                raise ValueError(f"load_adapter: {name!r} is merged into its base; unmerge first "
                                 f"(lora.unmerge_lora_weights(model))")
            if type(layer) is not ADAPTER_CLASSES.get(config.method):
                raise ValueError(f"load_adapter: the file holds {config.method!r} adapters, the model has "
                                 f"{type(layer).__name__} at {name!r}")
            rslora = getattr(layer, "use_rslora", False)
            if layer.alpha != config.alpha_for(name) or rslora != config.use_rslora:
                raise ValueError(f"load_adapter: {name!r} has alpha={layer.alpha}, use_rslora="
                                 f"{rslora}; the file says alpha={config.alpha_for(name)}, "
                                 f"use_rslora={config.use_rslora}")
        return existing, False
    return build_adapters(model, config, copy_bases=config.init == "pissa"), True


def load_adapter(model: nn.Module, path) -> nn.Module:
    """Load the adapter folder `path` into `model` and return it.

    A model without adapters gets them added from the saved config first (as
    add_lora_to_model would); a model with adapters must match the file exactly.
    Everything is checked before anything is changed.
    """
    config = read_config(path)
    file_state = read_tensors(path)
    grad_flags = [(p, p.requires_grad) for p in model.parameters()]
    try:
        layers, new = _targets(model, config)
        plan = tensor_plan(model, layers, config)  # (file key, destination tensor)
        expected = {key for key, _ in plan}
        for key, dest in plan:
            if key not in file_state:
                raise ValueError(f"load_adapter: {path}: the model expects {key} {tuple(dest.shape)}, "
                                 f"the file does not have it (targets or method differ)")
            if tuple(file_state[key].shape) != tuple(dest.shape):
                raise ValueError(f"load_adapter: {path}: shape mismatch at {key}: file "
                                 f"{tuple(file_state[key].shape)}, model {tuple(dest.shape)}")
        extra = [k for k in file_state if k not in expected]
        if extra:
            raise ValueError(f"load_adapter: {path}: the file has {extra[0]}, which the model does not "
                             f"expect ({len(extra)} unexpected keys; targets differ)")
    except BaseException:
        for p, flag in grad_flags:  # building adapters froze bases: undo
            p.requires_grad_(flag)
        raise
    with torch.no_grad():
        for key, dest in plan:
            dest.copy_(file_state[key])
    if new:
        install_adapters(model, layers, config)
    return model
