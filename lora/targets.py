"""Finding modules: the adapter layers a model holds, and the modules a config selects.

Adapters hide what they wrap: `modules_outside_adapters` lists `named_modules()` without
anything inside an adapter layer or a MultiAdapterLinear, so the names seen here are the
model's own (a base layer stands under the name of the module it replaced).
`find_targets` applies `target_modules` (the matching rules: lora/config.py) and
`find_modules_to_save` applies `modules_to_save` (PEFT's suffix rule); both refuse, with
the candidate names, what selects nothing or something that cannot take an adapter.
"""
from __future__ import annotations

from typing import Sequence

import torch.nn as nn

from lora.base import AdapterLayer
from lora.layout import is_linear_like
from lora.config import (DEFAULT_ADAPTER, OUTPUT_LAYER_NAMES, LoraConfig, _compile, adapter_set, name_matches,
                         saved_name_matches)
from lora.multi import MultiAdapterLinear

# What holds adapters: a single adapter layer, or the container of named ones (lora/multi.py).
CONTAINERS = (AdapterLayer, MultiAdapterLinear)


def adapter_layers(model: nn.Module, adapter: str | None = None) -> list[tuple[str, AdapterLayer]]:
    """Every adapter layer of the ACTIVE adapter (or of the one named `adapter`), (dotted name of
    the adapted module, layer), in module order. With one adapter these are the model's adapter
    layers; with several, the entries of each MultiAdapterLinear under that name, listed under the
    container's name (so file keys and allocators see the same names as with one adapter)."""
    single = adapter is None or adapter in adapter_names(model)[:1]
    result = []
    for name, module in modules_outside_adapters(model):
        if isinstance(module, MultiAdapterLinear):
            key = adapter or module.active
            if key in module.adapters:
                result.append((name, module.adapters[key]))
        elif isinstance(module, AdapterLayer) and single:
            result.append((name, module))
    return result


def adapter_names(model: nn.Module) -> list[str]:
    """The names of the model's adapters, in the order they were added ([] without adapters);
    an adapter added without a name is "default"."""
    record = adapter_set(model)
    if record is not None:
        return list(record.configs)
    has = any(isinstance(m, CONTAINERS) for m in model.modules())
    return [DEFAULT_ADAPTER] if has else []


def modules_outside_adapters(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """named_modules() without anything inside an adapter (its base_layer, dropout, ...) or inside
    a MultiAdapterLinear."""
    inside: list[str] = []
    result = []
    for name, module in model.named_modules():
        if any(name.startswith(prefix + "." if prefix else "") for prefix in inside):
            continue
        if isinstance(module, CONTAINERS):
            inside.append(name)
        result.append((name, module))
    return result


def _candidates_message(modules: list[tuple[str, nn.Module]]) -> str:
    names = [n for n, m in modules if n and (is_linear_like(m) or isinstance(m, CONTAINERS))]
    if not names:
        return "the model has no Linear-like modules"
    short = sorted({n.rsplit(".", 1)[-1] for n in names})
    shown = names if len(names) <= 12 else names[:12] + [f"... ({len(names) - 12} more)"]
    return f"Linear-like module names: {short}; full names: {shown}"


def find_targets(model: nn.Module, config: LoraConfig, adapted_ok: bool = False) -> list[str]:
    """Dotted names of the modules `config.target_modules` selects (rules: lora/config.py).
    A module that already holds adapters is refused, unless `adapted_ok` (adding a named adapter:
    lora.named), where it stands for its base layer."""
    modules = modules_outside_adapters(model)
    if adapted_ok:
        modules = [(n, m.base_layer if isinstance(m, CONTAINERS) else m) for n, m in modules]
    saved = config.modules_to_save

    def excluded(name: str) -> bool:
        return any(saved_name_matches(name, m) for m in saved)

    targets = config.target_modules
    if targets == "all-linear":
        chosen = [n for n, m in modules if n and is_linear_like(m) and not excluded(n)
                  and n.rsplit(".", 1)[-1] not in OUTPUT_LAYER_NAMES]
        if not chosen:
            raise ValueError(f"add_lora_to_model: target_modules='all-linear' found no Linear-like layer "
                             f"in {type(model).__name__}")
    elif isinstance(targets, str):
        regex = _compile(targets, "target_modules")
        chosen = [n for n, _ in modules if n and regex.fullmatch(n) and not excluded(n)]
        if not chosen:
            raise ValueError(f"add_lora_to_model: target_modules regex {targets!r} matches no module "
                             f"(it must match the whole dotted name). {_candidates_message(modules)}")
    else:
        chosen = []
        for entry in targets:
            hits = [n for n, _ in modules if n and name_matches(n, entry) and not excluded(n)]
            if not hits:
                raise ValueError(f"add_lora_to_model: target module {entry!r} matches no module "
                                 f"(exact name or dotted suffix). {_candidates_message(modules)}")
            chosen += [n for n in hits if n not in chosen]
        order = {n: i for i, (n, _) in enumerate(modules)}
        chosen.sort(key=order.__getitem__)
    by_name = dict(modules)
    for name in chosen:
        module = by_name[name]
        if isinstance(module, CONTAINERS):
            raise ValueError(f"add_lora_to_model: {name!r} already has an adapter "
                             f"({type(module).__name__}); use load_adapter or a fresh model")
        if not is_linear_like(module):
            raise TypeError(f"add_lora_to_model: target {name!r} is a {type(module).__name__}, not a "
                            f"Linear-like layer (nn.Linear, Conv1D, or in_features/out_features/dequantize()). "
                            f"{_candidates_message(modules)}")
    return chosen


def find_modules_to_save(model: nn.Module, names: Sequence[str], *, strict: bool = True,
                         targets: Sequence[str] = ()) -> list[tuple[str, nn.Module]]:
    """(name, module) for every module `names` selects: outside the adapters, its name ending with
    an entry (PEFT's rule, `saved_name_matches`); top-most only, in module order (a module inside
    a selected one is saved with it).

    strict: an entry that selects nothing is an error (in add_lora_to_model a typo would leave
    a head frozen); loading passes strict=False and ignores such entries, as PEFT does (its
    sequence-classification configs list both "classifier" and "score"; a model has one).
    A selected module must not hold an adapter (already in `model`, or one of `targets`):
    it would be trained in full, base weights included, and saved twice."""
    modules = [(n, m) for n, m in modules_outside_adapters(model) if n and not isinstance(m, CONTAINERS)]
    chosen: set[str] = set()
    for entry in names:
        hits = {n for n, _ in modules if saved_name_matches(n, entry)}
        if strict and not hits:
            raise ValueError(f"modules_to_save: {entry!r} matches no module (a module is selected when its "
                             f"name ends with the entry); module names: "
                             f"{sorted({n.rsplit('.', 1)[-1] for n, _ in modules})}")
        chosen |= hits
    found = [(n, m) for n, m in modules if n in chosen and not any(n.startswith(c + ".") for c in chosen)]
    adapted = [n for n, _ in adapter_layers(model)] + list(targets)
    for name, _ in found:
        inner = [a for a in adapted if a.startswith(name + ".")]
        if inner:
            raise ValueError(f"modules_to_save: {name!r} holds the adapter (or target) {inner[0]!r}; a module "
                             f"trained and saved in full cannot also hold adapters")
    return found
