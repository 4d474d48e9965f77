"""Many adapters on one frozen base: add, switch, delete, disable, unload, and mixed batches.

    add_adapter(model, "sst2", LoraConfig(r=8, target_modules=["q_proj", "v_proj"]))
    add_adapter(model, "agnews", LoraConfig(r=4, target_modules=["q_proj"]))
    set_adapter(model, "agnews")                  # computes and (if the model trains) trains
    with disable_adapters(model): base = model(x) # exactly the base model inside
    with mixed_batch(model, ["sst2", "__base__", "agnews"]): y = model(x)   # one adapter per example
    delete_adapter(model, "sst2")                 # one left: plain adapter layers again

How a model holds them (the DESIGN note in lora/multi.py): with one adapter, plain
adapter layers (exactly what add_lora_to_model makes); with two or more, a
MultiAdapterLinear at every adapted module, holding the base once and one ordinary
adapter layer per name that targets it. Every change here rebuilds that layout
(`_install`): the new containers are built aside, swapped in last, and every step
is undone if a later one fails (all-or-nothing). The names, their configs and the
active one are remembered on the model (lora.config.AdapterSet); an adapter added
without a name is "default", as in PEFT.

What "active" means everywhere else: `adapter_layers(model)` lists the active
adapter's layers, so allocators, merging, saving and `mark_only_lora_as_trainable`
act on it alone. A merged adapter lives in the shared base weight, so switching,
adding, deleting, disabling and mixed batches refuse a merged model (unmerge first).
`modules_to_save` are one set of modules shared by every adapter (PEFT keeps a copy
per adapter; here they are the model's own modules).
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Sequence

import torch.nn as nn

from lora.base import AdapterLayer
from lora.config import (ADAPTERS_ATTR, CONFIG_ATTR, DEFAULT_ADAPTER, AdapterSet, IA3Config, LoraConfig,
                         adapter_set, forget_adapters, make_config)
from lora.model import CONTAINERS, _add_adapters, build_adapters, mark_trainable, swap_modules
from lora.targets import adapter_layers, adapter_names, modules_outside_adapters
from lora.trainable import restore_flags
from lora.multi import BASE_NAME, MultiAdapterLinear, check_adapter_name, is_shared, own_base, share_base

Layout = dict  # module name -> (base layer, {adapter name: layer})


def list_adapters(model: nn.Module) -> list[str]:
    """The adapters' names, in the order they were added."""
    return adapter_names(model)


def active_adapter(model: nn.Module) -> str | None:
    record = adapter_set(model)
    return record.active if record else (adapter_names(model) or [None])[0]


def _containers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    return [(n, m) for n, m in modules_outside_adapters(model) if isinstance(m, CONTAINERS)]


def _layout(model: nn.Module) -> Layout:
    """What the model holds now: per adapted module, its base and its adapters by name."""
    names = adapter_names(model)
    layout = {}
    for name, module in _containers(model):
        if not name:
            raise ValueError("named adapters: the model itself is an adapter layer; wrap it in a module")
        adapters = dict(module.adapters) if isinstance(module, MultiAdapterLinear) else {names[0]: module}
        layout[name] = (module.base_layer, adapters)
    return layout


def _check_unmerged(model: nn.Module, who: str) -> None:
    merged = [n for n, m in _containers(model) if m.merged]
    if merged:
        raise RuntimeError(f"{who}: {merged[0]!r} is merged into its base weight, which every adapter shares; "
                           f"unmerge first (lora.unmerge_lora_weights(model))")


def _record(model: nn.Module) -> AdapterSet:
    """The model's record, or (not yet stored) one for an adapter added without a name."""
    record = adapter_set(model)
    if record is not None:
        return AdapterSet(dict(record.configs), record.active)
    config = model.__dict__.get(CONFIG_ATTR)
    if config is None:
        from lora.peft_config import resolve_config   # infers it from the layers, as save_adapter does
        config = resolve_config(model)[0]
    return AdapterSet({DEFAULT_ADAPTER: config}, DEFAULT_ADAPTER)


def _named(model: nn.Module, name: str, who: str) -> tuple[bool, AdapterSet]:
    """What set_adapter and delete_adapter check first (`name` exists, nothing is merged), then
    (whether the adapters train now, a copy of the model's record)."""
    names = adapter_names(model)
    if name not in names:
        raise ValueError(f"{who}: no adapter named {name!r}; the model's adapters: {names}")
    _check_unmerged(model, who)
    return _trains(model), _record(model)


def _trains(model: nn.Module) -> bool:
    """Whether the model's adapters train now (a model loaded for inference stays frozen)."""
    return any(p.requires_grad for _, layer in adapter_layers(model) for p in layer.adapter_parameters())


def _install(model: nn.Module, layout: Layout, record: AdapterSet | None, trains: bool) -> None:
    """Put `layout` in place: a MultiAdapterLinear per module when the record names two or more
    adapters, the plain layer with one, the base with none; then store the record and set which
    parameters train (the active adapter's, if `trains`; else none). All-or-nothing."""
    several = record is not None and len(record.configs) > 1
    active = record.active if record else None
    flags = [(p, p.requires_grad) for p in model.parameters()]
    old_modules = [(n, model.get_submodule(n)) for n in layout]
    old_attrs = {k: model.__dict__[k] for k in (CONFIG_ATTR, ADAPTERS_ATTR) if k in model.__dict__}
    toggled: list[tuple[AdapterLayer, bool]] = []      # (layer, shared now) for the undo
    try:
        replacements = []
        for name, (base, adapters) in layout.items():
            if not adapters:
                replacements.append((name, base))
            elif several:
                for layer in adapters.values():
                    if not is_shared(layer):
                        share_base(layer)
                        toggled.append((layer, True))
                replacements.append((name, MultiAdapterLinear(base, adapters, active)))
            else:
                (layer,) = adapters.values()
                if is_shared(layer):
                    own_base(layer)
                    toggled.append((layer, False))
                replacements.append((name, layer))
        swap_modules(model, replacements)
        try:
            forget_adapters(model)
            if record is not None:
                model.__dict__[ADAPTERS_ATTR] = record
                model.__dict__[CONFIG_ATTR] = record.configs[record.active]
                _set_training(model, record.configs[record.active], trains)
        except BaseException:
            swap_modules(model, old_modules)
            raise
    except BaseException:
        for layer, shared in reversed(toggled):
            (own_base if shared else share_base)(layer)
        forget_adapters(model)
        model.__dict__.update(old_attrs)
        restore_flags(flags)
        raise


def _set_training(model: nn.Module, config, trains: bool) -> None:
    """The active adapter (and what its config trains) trains if `trains`; every adapter is frozen if not."""
    if trains:
        mark_trainable(model, config)
    else:
        for _, module in _containers(model):
            for p in (module.adapters.parameters() if isinstance(module, MultiAdapterLinear)
                      else module.adapter_parameters()):
                p.requires_grad_(False)


def add_built_adapter(model: nn.Module, name: str, config, built: list[tuple[str, AdapterLayer]]) -> nn.Module:
    """Install adapters built aside (around the model's own bases) as the adapter `name`; the active
    adapter stays active (as in PEFT), and the new one trains only once made active."""
    record = _record(model)
    layout = _layout(model)
    for module, layer in built:
        base, adapters = layout.get(module, (layer.base_layer, {}))
        layout[module] = (base, {**adapters, name: layer})
    record.configs[name] = config
    _install(model, layout, record, _trains(model))
    return model


def add_adapter(model: nn.Module, name: str, config: LoraConfig | IA3Config | None = None,
                **overrides) -> nn.Module:
    """Add an adapter called `name` (LoraConfig or IA3Config; `overrides` as in add_lora_to_model).

    On a model without adapters it is add_lora_to_model (or add_ia3_to_model) and becomes active.
    Otherwise the active adapter stays active; the new one is built around the SAME base layers
    (a target may or may not hold other adapters already) and installed as lora/multi.py describes.
    """
    check_adapter_name(name, "add_adapter")
    if not isinstance(config, IA3Config):
        config = make_config(config, **overrides)
    names = adapter_names(model)
    if name in names:
        raise ValueError(f"add_adapter: the model already has an adapter named {name!r} (adapters: {names})")
    if not names:
        _add_adapters(model, config)
        model.__dict__[ADAPTERS_ATTR] = AdapterSet({name: config}, name)
        return model
    _check_unmerged(model, "add_adapter")
    if getattr(config, "init", None) == "pissa":
        raise ValueError("add_adapter: init='pissa' rewrites the base weight, which the other adapters share; "
                         "use init='kaiming' or 'gaussian' for a second adapter")
    flags = [(p, p.requires_grad) for p in model.parameters()]
    built = build_adapters(model, config, shared=True)   # restores flags itself if it fails
    try:
        return add_built_adapter(model, name, config, built)
    except BaseException:
        restore_flags(flags)
        raise


def set_adapter(model: nn.Module, name: str) -> nn.Module:
    """Make `name` the adapter that computes (and, if the model's adapters train, the one that trains)."""
    trains, record = _named(model, name, "set_adapter")
    record.active = name
    multis = [m for _, m in _containers(model) if isinstance(m, MultiAdapterLinear)]
    old_active = [m.active for m in multis]
    old_attrs = {k: model.__dict__[k] for k in (CONFIG_ATTR, ADAPTERS_ATTR) if k in model.__dict__}
    flags = [(p, p.requires_grad) for p in model.parameters()]
    try:
        for m in multis:
            m.active = name
        model.__dict__[ADAPTERS_ATTR] = record
        model.__dict__[CONFIG_ATTR] = record.configs[name]
        _set_training(model, record.configs[name], trains)
    except BaseException:
        for m, active in zip(multis, old_active):
            m.active = active
        forget_adapters(model)
        model.__dict__.update(old_attrs)
        restore_flags(flags)
        raise
    return model


def delete_adapter(model: nn.Module, name: str) -> nn.Module:
    """Remove the adapter `name` (the next remaining one becomes active if it was). With one adapter
    left the model holds plain adapter layers again; deleting the last one leaves the base model."""
    trains, record = _named(model, name, "delete_adapter")
    del record.configs[name]
    if record.active == name and record.configs:
        record.active = next(iter(record.configs))
    layout = {m: (base, {k: v for k, v in adapters.items() if k != name})
              for m, (base, adapters) in _layout(model).items()}
    _install(model, layout, record if record.configs else None, trains)
    return model


def unload(model: nn.Module) -> nn.Module:
    """Remove every adapter, returning the base model with its plain layers (unmerging any merged
    adapter first, exactly). merge_and_unload: lora.merge_lora_weights."""
    for _, layer in adapter_layers(model):
        if layer.merged:
            layer.unmerge()
    _check_unmerged(model, "unload")
    layout = {m: (base, {}) for m, (base, _) in _layout(model).items()}
    _install(model, layout, None, False)
    return model


@contextmanager
def disable_adapters(model: nn.Module):
    """Inside, the model computes exactly the base model (every adapted module is swapped for its
    base layer); on leaving, even by an exception, the adapters are put back as they were."""
    _check_unmerged(model, "disable_adapters")
    containers = _containers(model)
    swap_modules(model, [(n, m.base_layer) for n, m in containers])
    try:
        yield model
    finally:
        swap_modules(model, containers)


@contextmanager
def mixed_batch(model: nn.Module, names: Sequence[str]):
    """Inside, example b of every forward goes through adapter names[b] ("__base__": the base model).

    The batched computation is MultiAdapterLinear.mixed_forward (lora/multi.py). A model with one
    adapter is held in the container form for the duration. Restored on leaving, even by an exception."""
    names = tuple(names)
    known = adapter_names(model)
    unknown = sorted({n for n in names if n not in known and n != BASE_NAME})
    if unknown:
        raise ValueError(f"mixed_batch: unknown adapter names {unknown}; the model's adapters: {known} "
                         f"(and {BASE_NAME!r} for none)")
    _check_unmerged(model, "mixed_batch")
    temporary = [(n, m) for n, m in _containers(model) if isinstance(m, AdapterLayer)]
    for _, layer in temporary:                     # one adapter: held in a container for the batch
        share_base(layer)
    try:
        swap_modules(model, [(n, MultiAdapterLinear(layer.base_layer, {known[0]: layer}, known[0]))
                             for n, layer in temporary])
    except BaseException:
        for _, layer in temporary:
            own_base(layer)
        raise
    multis = [m for _, m in _containers(model)]
    try:
        for m in multis:
            m.batch_adapters = names
        yield model
    finally:
        for m in multis:
            m.batch_adapters = None
        if temporary:
            swap_modules(model, temporary)
            for _, layer in temporary:
                own_base(layer)
