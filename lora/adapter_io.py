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

`modules_to_save` entries select modules as PEFT selects them (name ends with the
entry); on loading, an entry that selects nothing is ignored, as in PEFT.

What a file holds is decided by a config: the one passed to save_adapter, else the one
the model remembers (add_lora_to_model and load_adapter keep it on the model), else one
inferred from the layers and the requires_grad flags. Loading freezes the model unless
is_trainable=True (PEFT's default), so save, load, save writes the same file.

Loading checks everything (config, file integrity, every key, shape and dtype, finite
values) before it changes the model, and restores the model if the copy itself fails,
so a failed load leaves the model as it was.

Saving writes both files to temporaries first and then renames them into place; a
failure before the renames leaves the folder as it was, and a failed rename puts back
what the earlier rename replaced. A process killed between the two renames can still
leave a new file beside an old one: the weights file records, in its safetensors
metadata, a digest of the config fields that give its tensors their meaning (ranks,
alphas, scaling, init, method), and loading refuses a pair whose digests differ.
"""
from __future__ import annotations

import hashlib
import json
import warnings
from collections import Counter
from pathlib import Path

import torch
import torch.nn as nn
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from lora.base import AdapterLayer, check_finite, weight_layout
from lora.files import replace_together
from lora.model import (CONFIG_ATTR, METHODS, LoraConfig, adapter_layers, build_adapters, find_modules_to_save,
                        install_adapters, mark_trainable, method_of, modules_outside_adapters, name_matches,
                        pattern_value, remember_config, remembered_config, restore_flags)

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
# The config fields that give the tensors their meaning; their digest goes into the weights file.
# Only fields that change what the tensors mean without changing their keys or shapes: targets, bias
# and modules_to_save show in the keys (checked one by one), so editing those by hand stays possible.
PAIRED_FIELDS = ("peft_type", "method", "r", "lora_alpha", "rank_pattern", "alpha_pattern",
                 "use_rslora", "use_dora", "init_lora_weights")
PAIRING_KEY = "nanopeft_config_digest"
# PEFT options this loader does not implement: a file using them is refused, not half-understood.
UNSUPPORTED = {"layers_to_transform": None, "layers_pattern": None,
               "lora_bias": False, "use_qalora": False, "exclude_modules": None,
               "layer_replication": None, "target_parameters": None, "trainable_token_indices": None}


# --- saving ----------------------------------------------------------------------------------
def _method_of(layer: AdapterLayer) -> str:
    method = method_of(layer)
    if method is None:
        raise TypeError(f"save_adapter: no method is known for adapter class {type(layer).__name__}")
    return method


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
    saved = find_modules_to_save(model, config.modules_to_save, strict=False, targets=[n for n, _ in layers])
    for module, sub in saved:
        for name, p in sub.named_parameters():
            plan.append((f"{PREFIX}{module}.{name}", p))
    unique = dict(plan)  # a key met twice (a saved module that is also a bias holder) is one tensor
    return list(unique.items())


def _infer_extras(model: nn.Module, layers) -> tuple[str, tuple[str, ...]]:
    """(bias, modules_to_save) as the model's requires_grad flags show them, for a model that
    remembers no config: the top-most modules that hold no adapter and own parameters, all of
    which train (so a wrapper such as `self_attn`, whose only parameters are its adapters' when
    the bases are quantized and hold buffers, is not one), and which biases train."""
    adapted = [n for n, _ in layers]
    saved: list[str] = []
    for name, module in modules_outside_adapters(model):
        if not name or isinstance(module, AdapterLayer) or any(a.startswith(name + ".") for a in adapted):
            continue
        params = list(module.parameters())
        if any(name.startswith(s + ".") for s in saved) or not params or not all(p.requires_grad for p in params):
            continue
        saved.append(name)
    adapted_bias = any(getattr(getattr(layer.base_layer, "bias", None), "requires_grad", False)
                       for _, layer in layers)
    other_bias = any(isinstance(m._parameters.get("bias"), torch.Tensor) and m._parameters["bias"].requires_grad
                     for n, m in modules_outside_adapters(model) if not isinstance(m, AdapterLayer)
                     and not any(n == s or n.startswith(s + ".") for s in saved))
    return ("all" if other_bias else "lora_only" if adapted_bias else "none"), tuple(saved)


def resolve_config(model: nn.Module, config: LoraConfig | None = None) -> tuple[LoraConfig, dict]:
    """The config to save for the adapters now in `model` and the matching adapter_config.json
    content. The config is the one given, else the one the model remembers (add_lora_to_model
    and load_adapter keep it), else, as a last resort, inferred from the layers and the
    requires_grad flags (which a frozen load or a hand-frozen head would mislead)."""
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
    source = "config"
    if config is None and remembered_config(model) is not None:
        config, source = remembered_config(model), f"the config the model remembers (model.{CONFIG_ATTR})"
    if config is None:
        first = layers[0][1]
        bias, modules_to_save = _infer_extras(model, layers)
        config = LoraConfig(r=Counter(ranks.values()).most_common(1)[0][0],
                            lora_alpha=Counter(alphas.values()).most_common(1)[0][0],
                            lora_dropout=first.dropout_p, target_modules=names, method=method,
                            use_rslora=getattr(first, "use_rslora", False),
                            init=getattr(first, "init", "kaiming"), bias=bias, modules_to_save=modules_to_save)
    if config.method != method:
        raise ValueError(f"save_adapter: {source} has method {config.method!r} but the model's adapters are "
                         f"{method!r} ({type(layers[0][1]).__name__})")
    for n, layer in layers:
        if getattr(layer, "use_rslora", False) != config.use_rslora:
            raise ValueError(f"save_adapter: {n} has use_rslora={not config.use_rslora}, {source} says "
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


def pairing_digest(meta: dict) -> str:
    """sha256 of the config fields in PAIRED_FIELDS (a hand edit of other fields keeps it)."""
    paired = {k: meta.get(k) for k in PAIRED_FIELDS}
    return hashlib.sha256(json.dumps(paired, sort_keys=True).encode()).hexdigest()


def _write_weights(state: dict, metadata: dict, tmp: str) -> None:
    save_file(state, tmp, metadata=metadata)


def _write_config(text: str, tmp: str) -> None:
    Path(tmp).write_text(text)


def save_adapter(model: nn.Module, path, config: LoraConfig | None = None, *,
                 base_model_name_or_path: str | None = None, task_type: str | None = None,
                 revision: str | None = None) -> Path:
    """Write the model's adapters to the folder `path` (created if needed); returns the folder.

    `config` (by default the one the model remembers from add_lora_to_model / load_adapter)
    supplies target names, dropout, bias and modules_to_save; ranks and alphas are read from
    the layers. A model that remembers none gets all of it inferred (`resolve_config`).
    Parameters that train but that the file will not hold are named in a warning.
    All-or-nothing: everything is checked (a tensor holding NaN or inf is refused, by
    key) before the folder is touched, and the two files replace the old pair together
    (see the module docstring); a folder created for a save that fails is removed.
    """
    folder = Path(path)
    if folder.exists() and not folder.is_dir():
        raise NotADirectoryError(f"save_adapter: {folder} exists and is not a folder")
    config, meta = resolve_config(model, config)
    meta.update(base_model_name_or_path=base_model_name_or_path, task_type=task_type, revision=revision)
    layers = adapter_layers(model)
    # Sparse LoRA: store what it computes with, A * M_A and B * M_B
    masked = {file_key(module, name): getattr(layer, name) * getattr(layer, mask)
              for module, layer in layers for name, mask in SPARSE_MASKS.items()
              if isinstance(getattr(layer, mask, None), torch.Tensor)}
    plan = tensor_plan(model, layers, config)
    planned = {id(tensor) for _, tensor in plan}
    left_out = [n for n, p in model.named_parameters() if p.requires_grad and id(p) not in planned]
    if left_out:
        warnings.warn(f"save_adapter: {len(left_out)} trainable parameters are not in the adapter file "
                      f"(neither adapters, nor modules_to_save {list(config.modules_to_save)}, nor biases under "
                      f"bias={config.bias!r}): {left_out[:5]}{' ...' if len(left_out) > 5 else ''}")
    state = {key: masked.get(key, tensor).detach().cpu().clone().contiguous() for key, tensor in plan}
    for key, tensor in state.items():
        if tensor.is_floating_point():
            check_finite(tensor, f"save_adapter: {key}")
    text = json.dumps(meta, indent=2, sort_keys=True) + "\n"
    metadata = {"format": "pt", PAIRING_KEY: pairing_digest(meta)}
    created = [p for p in (folder, *folder.parents) if not p.exists()]   # deepest first
    try:
        folder.mkdir(parents=True, exist_ok=True)
        replace_together([(folder / WEIGHTS_NAME, lambda tmp: _write_weights(state, metadata, tmp)),
                          (folder / CONFIG_NAME, lambda tmp: _write_config(text, tmp))])
    except BaseException:
        for made in created:
            try:
                made.rmdir()   # only if still empty
            except OSError:
                break
        raise
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
    return _from_peft_fields(meta, f"load_adapter: {file}")


# Fields of a PEFT LoraConfig that say nothing about the adapters' function: ignored when converting one.
PEFT_BOOKKEEPING = ("task_type", "peft_type", "auto_mapping", "peft_version", "base_model_name_or_path",
                    "revision", "inference_mode")
# Fields _from_peft_fields reads (fan_in_fan_out only checked: each layer's type says its layout).
PEFT_CONVERTED = ("r", "lora_alpha", "lora_dropout", "target_modules", "rank_pattern", "alpha_pattern",
                  "use_rslora", "use_dora", "init_lora_weights", "bias", "modules_to_save", "fan_in_fan_out")


def config_from_peft(peft_config) -> LoraConfig:
    """Our LoraConfig for a PEFT `LoraConfig` object, duck-typed: `to_dict()` gives PEFT's fields.

    Converted field by field as a PEFT file is (`read_config`). Any other field whose value
    differs from a default-constructed object of the same class asks for something this
    library does not implement (layers_to_transform, lora_bias, ...) and is refused by name.
    """
    cls = type(peft_config)
    where = f"add_lora_to_model: config ({cls.__module__}.{cls.__qualname__})"
    meta = dict(peft_config.to_dict())
    peft_type = str(getattr(meta.get("peft_type"), "value", meta.get("peft_type")) or "LORA")
    if peft_type != "LORA":
        raise ValueError(f"{where}: peft_type {peft_type!r}; only LoRA configs (peft_type 'LORA', with or "
                         f"without use_dora) convert to a lora.LoraConfig")
    try:
        defaults = dict(cls().to_dict())
    except Exception:  # noqa: BLE001 - a class that needs arguments: compare with neutral values only
        defaults = {}
    for key, value in meta.items():
        if key in PEFT_CONVERTED or key in PEFT_BOOKKEEPING:
            continue
        if value not in (None, False, [], {}, "") and (key not in defaults or value != defaults[key]):
            default = f" (only its default, {defaults[key]!r})" if key in defaults else ""
            raise ValueError(f"{where}: field {key}={value!r} is not supported{default}; the fields nanopeft "
                             f"converts: {', '.join(PEFT_CONVERTED)}")
    if meta.get("target_modules") is None:
        raise ValueError(f"{where}: target_modules=None (PEFT then picks defaults by model type); "
                         f"give target_modules explicitly")
    init = meta.get("init_lora_weights", True)
    if init not in (True, "gaussian", "pissa"):   # False: PEFT starts B random, so the model changes at init
        raise ValueError(f"{where}: init_lora_weights={init!r} is not supported; supported: True "
                         f"(kaiming A, zero B), 'gaussian', 'pissa'")
    return _from_peft_fields({**meta, "peft_type": peft_type}, where)


def _from_peft_fields(meta: dict, where: str) -> LoraConfig:
    """LoraConfig from PEFT's field names (an adapter_config.json, or a PEFT LoraConfig's to_dict())."""
    method = meta.get("method") or ("dora" if meta.get("use_dora") else "lora")
    if method not in METHODS:
        raise ValueError(f"{where}: unknown method {method!r}; known methods: {', '.join(METHODS)}")
    peft_type = meta.get("peft_type")
    if peft_type != PEFT_TYPES[method]:
        raise ValueError(f"{where}: peft_type {peft_type!r} with method {method!r}; "
                         f"expected {PEFT_TYPES[method]!r} (only LoRA-family adapters are supported)")
    if not isinstance(meta.get("fan_in_fan_out", False), bool):
        raise ValueError(f"{where}: fan_in_fan_out must be true or false, "
                         f"got {meta['fan_in_fan_out']!r}")
    for key, neutral in UNSUPPORTED.items():
        if meta.get(key, neutral) not in (neutral, [], {}, ""):
            raise ValueError(f"{where}: PEFT option {key}={meta[key]!r} is not supported")
    raw_init = meta.get("init_lora_weights", True)
    if raw_init == "pissa":
        init = "pissa"  # deterministic from W0, so a fresh model gets the same residual base
    elif raw_init in (True, False, None, "gaussian"):
        # only the starting values of A and B differ, and a file overwrites those
        init = "gaussian" if raw_init == "gaussian" and method in ("lora", "sparse") else "kaiming"
    else:  # e.g. "pissa_niter_4", "olora", "loftq": they rewrite the base in ways not reproduced here
        raise ValueError(f"{where}: init_lora_weights={raw_init!r} is not supported "
                         f"(it changes the base weights); supported: true, false, 'gaussian', 'pissa'")
    targets = meta.get("target_modules")
    if isinstance(targets, (set, frozenset)):   # a PEFT LoraConfig object holds a set
        targets = sorted(targets)
    if targets is None:
        raise ValueError(f"{where}: has no target_modules")
    try:
        return LoraConfig(r=meta["r"], lora_alpha=meta["lora_alpha"],
                          lora_dropout=meta.get("lora_dropout", 0.0), target_modules=targets, method=method,
                          rank_pattern=dict(meta.get("rank_pattern") or {}),
                          alpha_pattern=dict(meta.get("alpha_pattern") or {}),
                          use_rslora=bool(meta.get("use_rslora", False)), init=init,
                          bias=meta.get("bias", "none"), modules_to_save=tuple(meta.get("modules_to_save") or ()))
    except KeyError as err:
        raise ValueError(f"{where}: lacks the field {err}") from None
    except (ValueError, TypeError) as err:
        raise ValueError(f"{where}: {err}") from None


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


def _targets(model: nn.Module, config: LoraConfig) -> tuple[list, bool]:
    """(module name, layer) pairs to fill, and whether they are new (not yet in the model)."""
    existing = adapter_layers(model)
    if existing:
        for name, layer in existing:
            if layer.merged:
                raise ValueError(f"load_adapter: {name!r} is merged into its base; unmerge first "
                                 f"(lora.unmerge_lora_weights(model))")
            if method_of(layer) != config.method:
                raise ValueError(f"load_adapter: the file holds {config.method!r} adapters, the model has "
                                 f"{type(layer).__name__} at {name!r}")
            rslora = getattr(layer, "use_rslora", False)
            if layer.alpha != config.alpha_for(name) or rslora != config.use_rslora:
                raise ValueError(f"load_adapter: {name!r} has alpha={layer.alpha}, use_rslora="
                                 f"{rslora}; the file says alpha={config.alpha_for(name)}, "
                                 f"use_rslora={config.use_rslora}")
        return existing, False
    return build_adapters(model, config, copy_bases=config.init == "pissa"), True


def load_adapter(model: nn.Module, path, *, is_trainable: bool = False) -> nn.Module:
    """Load the adapter folder `path` into `model` and return it.

    A model without adapters gets them added from the saved config first (as
    add_lora_to_model would); a model with adapters must match the file exactly.
    The whole model is then frozen, as PEFT's `is_trainable=False` leaves it (for
    inference); `is_trainable=True` trains what the file's config trains (adapters,
    modules_to_save, biases). The model remembers the file's config, so saving it
    again writes the same file. Everything is checked before anything is changed.
    """
    config = read_config(path)
    file_state = read_tensors(path)
    grad_flags = [(p, p.requires_grad) for p in model.parameters()]
    try:
        layers, new = _targets(model, config)   # new adapters are built aside (build_adapters)
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
    try:
        with torch.no_grad():
            for (_, dest), value in zip(plan, values):
                _copy_into(dest, value)
        if new:
            install_adapters(model, layers, config)
    except BaseException:
        with torch.no_grad():
            for (_, dest), old in zip(plan, backups):
                dest.copy_(old)
        restore_flags(grad_flags)
        raise
    if is_trainable:
        mark_trainable(model, config)
    else:
        model.requires_grad_(False)
    remember_config(model, config)
    return model
