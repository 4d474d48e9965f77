"""The adapter config as PEFT writes it: our LoraConfig <-> PEFT's LoRA fields (adapter_config.json,
or a PEFT LoraConfig object).

The file holds PEFT's LoRA fields (peft_type, r, lora_alpha, lora_dropout,
target_modules, rank_pattern, alpha_pattern, use_rslora, use_dora, bias, ...) and,
for methods other than lora/dora (PEFT tells those apart by `use_dora`), `"method"`.
Per-layer ranks and alphas as they are at save time (after any `resize`) go into
`rank_pattern` / `alpha_pattern` under full module names. `peft_type` is "LORA"
where PEFT computes the same function from the file (lora, dora, and sparse, whose
factors are stored masked; PEFT ignores the masks); HiRA and AdaLoRA's SVD
form get "NANOPEFT_HIRA" / "NANOPEFT_ADALORA", so PEFT refuses them instead of
silently loading a different function.

What a file holds is decided by a config: the one passed to save_adapter, else the one
the model remembers (add_lora_to_model and load_adapter keep it on the model), else one
inferred from the layers and the requires_grad flags (`resolve_config`).

The weights file records a digest of the config fields that give its tensors their
meaning (`pairing_digest`), so a config and weights from two different saves are told apart.
"""
from __future__ import annotations

import hashlib
import json
from collections import Counter
from pathlib import Path

import torch
import torch.nn as nn

from lora.base import AdapterLayer
from lora.layout import weight_layout
from lora.config import (CONFIG_ATTR, METHODS, IA3Config, LoraConfig, adapter_set, name_matches, pattern_value,
                         remembered_config)
from lora.model import CONTAINERS, method_of
from lora.targets import adapter_layers, modules_outside_adapters

CONFIG_NAME = "adapter_config.json"
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



def _infer_extras(model: nn.Module, layers) -> tuple[str, tuple[str, ...]]:
    """(bias, modules_to_save) as the model's requires_grad flags show them, for a model that
    remembers no config: the top-most modules that hold no adapter and own parameters, all of
    which train (so a wrapper such as `self_attn`, whose only parameters are its adapters' when
    the bases are quantized and hold buffers, is not one), and which biases train."""
    adapted = [n for n, _ in layers]
    saved: list[str] = []
    for name, module in modules_outside_adapters(model):
        if not name or isinstance(module, CONTAINERS) or any(a.startswith(name + ".") for a in adapted):
            continue
        params = list(module.parameters())
        if any(name.startswith(s + ".") for s in saved) or not params or not all(p.requires_grad for p in params):
            continue
        saved.append(name)
    adapted_bias = any(getattr(getattr(layer.base_layer, "bias", None), "requires_grad", False)
                       for _, layer in layers)
    other_bias = any(isinstance(m._parameters.get("bias"), torch.Tensor) and m._parameters["bias"].requires_grad
                     for n, m in modules_outside_adapters(model) if not isinstance(m, CONTAINERS)
                     and not any(n == s or n.startswith(s + ".") for s in saved))
    return ("all" if other_bias else "lora_only" if adapted_bias else "none"), tuple(saved)


def resolve_config(model: nn.Module, config: LoraConfig | None = None, adapter: str | None = None
                   ) -> tuple[LoraConfig, dict]:
    """The config to save for the adapters now in `model` and the matching adapter_config.json
    content. The config is the one given, else the one the model remembers (add_lora_to_model
    and load_adapter keep it), else, as a last resort, inferred from the layers and the
    requires_grad flags (which a frozen load or a hand-frozen head would mislead). `adapter`: the
    named adapter to describe (lora.named), by default the active one."""
    layers = adapter_layers(model, adapter)
    if not layers:
        which = f" named {adapter!r}" if adapter else ""
        raise ValueError(f"save_adapter: {type(model).__name__} has no adapter layers{which}")
    methods = {_method_of(layer) for _, layer in layers}
    if len(methods) != 1:
        raise ValueError(f"save_adapter: one adapter file holds one method, the model mixes {sorted(methods)}")
    method = methods.pop()
    names = [n for n, _ in layers]
    source = "config"
    record = adapter_set(model)
    if config is None and adapter is not None and record is not None and adapter in record.configs:
        config, source = record.configs[adapter], f"the config the model remembers for adapter {adapter!r}"
    if config is None and remembered_config(model) is not None:
        config, source = remembered_config(model), f"the config the model remembers (model.{CONFIG_ATTR})"
    if method == "ia3":
        return _ia3_meta(model, layers, config)
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


def _ia3_meta(model: nn.Module, layers: list, config: IA3Config | None) -> tuple[IA3Config, dict]:
    """PEFT's IA3 fields for the IA3 layers `layers` (target and feed-forward names exact when the
    config's do not say precisely which layers hold which kind)."""
    names = [n for n, _ in layers]
    ff = [n for n, layer in layers if layer.feedforward]
    if not isinstance(config, IA3Config):
        config = IA3Config(target_modules=names, feedforward_modules=ff,
                           modules_to_save=_infer_extras(model, layers)[1])
    targets, feedforward = config.target_modules, config.feedforward_modules
    if isinstance(targets, str) or any(not any(name_matches(n, t) for n in names) for t in targets) \
            or any(not any(name_matches(n, t) for t in targets) for n in names) \
            or any(config.is_feedforward(n) != layer.feedforward for n, layer in layers):
        targets, feedforward = names, ff
    meta = {
        "peft_type": "IA3",
        "target_modules": list(targets),
        "feedforward_modules": feedforward if isinstance(feedforward, str) else list(feedforward),
        "modules_to_save": list(config.modules_to_save) or None,
        "fan_in_fan_out": any(weight_layout(layer.base_layer) == "in_out" for _, layer in layers),
        "init_ia3_weights": True,
        "inference_mode": True,
    }
    return config, meta


def pairing_digest(meta: dict) -> str:
    """sha256 of the config fields in PAIRED_FIELDS (a hand edit of other fields keeps it)."""
    paired = {k: meta.get(k) for k in PAIRED_FIELDS}
    return hashlib.sha256(json.dumps(paired, sort_keys=True).encode()).hexdigest()



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
    if meta.get("peft_type") == "IA3":
        return _ia3_from_peft_fields(meta, where)
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


# Fields of PEFT's IA3Config this reads; any other set to a non-default value is refused.
IA3_FIELDS = ("target_modules", "feedforward_modules", "modules_to_save", "fan_in_fan_out", "init_ia3_weights")


def _ia3_from_peft_fields(meta: dict, where: str) -> IA3Config:
    for key, value in meta.items():
        if key not in IA3_FIELDS and key not in PEFT_BOOKKEEPING and value not in (None, False, [], {}, ""):
            raise ValueError(f"{where}: IA3 field {key}={value!r} is not supported; the fields nanopeft reads: "
                             f"{', '.join(IA3_FIELDS)}")
    if not isinstance(meta.get("fan_in_fan_out", False), bool):
        raise ValueError(f"{where}: fan_in_fan_out must be true or false, got {meta['fan_in_fan_out']!r}")
    if meta.get("target_modules") is None or meta.get("feedforward_modules") is None:
        raise ValueError(f"{where}: an IA3 config needs target_modules and feedforward_modules")
    try:
        return IA3Config(target_modules=meta["target_modules"], feedforward_modules=meta["feedforward_modules"],
                         modules_to_save=tuple(meta.get("modules_to_save") or ()))
    except (ValueError, TypeError) as err:
        raise ValueError(f"{where}: {err}") from None
