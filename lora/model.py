"""Model surgery: put adapters on the Linear layers of any nn.Module.

    model = add_lora_to_model(model, r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"])


walks `model.named_modules()`, and for every module whose dotted name matches a
target (the matching rules: lora/config.py) replaces it (`setattr` on its parent)
by an adapter wrapping it. Merging adapters into plain layers: lora/merge.py.

Linear-like = `nn.Linear`, a transformers `Conv1D` (Hugging Face GPT-2's `c_attn`,
`c_proj`, `c_fc`, weight stored (in, out); every adapter reads it through
`lora.base.base_weight`, so none needs to know), or a quantized stand-in with
`in_features`, `out_features` and `dequantize()` (lora imports neither transformers
nor quantization: duck typing).

Finding the targets: lora/targets.py; what trains and counting: lora/trainable.py (both
re-exported here, where the rest of the project imports them from).
"""
from __future__ import annotations

import copy
import dataclasses

import torch.nn as nn

from lora.base import AdapterLayer
from lora.config import (METHODS, IA3Config, LoraConfig, make_config, name_matches, pattern_value,
                         remember_config)
from lora.dora import DoRALinear
from lora.hira import HiRALinear
from lora.ia3 import IA3Linear
from lora.layers import LoRALinear
from lora.sparse import SparseLoRALinear
from lora.svd import SVDLoRALinear
from lora.targets import (CONTAINERS, adapter_layers, adapter_names, find_modules_to_save,  # noqa: F401
                          find_targets, modules_outside_adapters)
from lora.trainable import count_parameters, lora_state_dict, mark_only_lora_as_trainable, restore_flags  # noqa: F401

# Method name -> adapter class. "adalora" is AdaLoRA's SVD form P Λ Q (lora/svd.py).
ADAPTER_CLASSES: dict[str, type] = {
    "lora": LoRALinear,
    "sparse": SparseLoRALinear,
    "hira": HiRALinear,
    "dora": DoRALinear,
    "adalora": SVDLoRALinear,
}
assert tuple(ADAPTER_CLASSES) == METHODS, "lora.config.METHODS must list ADAPTER_CLASSES' keys"


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def swap_modules(model: nn.Module, replacements: list[tuple[str, nn.Module]]) -> None:
    """Put each (dotted name, module) in place; if any setattr fails, put the old ones back."""
    old = [(name, model.get_submodule(name)) for name, _ in replacements]
    try:
        for name, module in replacements:
            _set_submodule(model, name, module)
    except BaseException:
        for name, module in old:   # (putting back one that was never replaced changes nothing)
            _set_submodule(model, name, module)
        raise


# --- surgery ---------------------------------------------------------------------------------
def adapter_class(method: str) -> type:
    if method not in ADAPTER_CLASSES:
        raise ValueError(f"unknown method {method!r}; known methods: {', '.join(METHODS)}")
    return ADAPTER_CLASSES[method]


def method_of(layer: AdapterLayer) -> str | None:
    """The method an adapter implements: that of the nearest class in its MRO that ADAPTER_CLASSES
    names (a subclass such as quantization's QLoRALinear is a "lora" adapter), "ia3", or None."""
    methods = {cls: method for method, cls in ADAPTER_CLASSES.items()}
    methods[IA3Linear] = "ia3"
    return next((methods[cls] for cls in type(layer).__mro__ if cls in methods), None)


def make_adapter(base: nn.Module, config: LoraConfig, name: str = "") -> AdapterLayer:
    """One adapter of `config.method` around `base`, with the rank/alpha `name` gets from the patterns."""
    if isinstance(config, IA3Config):
        return IA3Linear(base, feedforward=config.is_feedforward(name))
    cls = adapter_class(config.method)
    kwargs = dict(rank=config.rank_for(name), alpha=config.alpha_for(name), dropout=config.lora_dropout)
    if config.use_rslora:  # passed only when asked for, so a class without rsLoRA says so (TypeError)
        kwargs["use_rslora"] = True
    if config.init != "kaiming":
        kwargs["init"] = config.init
    return cls(base, **kwargs)


def build_adapters(model: nn.Module, config: LoraConfig, copy_bases: bool = False, shared: bool = False
                   ) -> list[tuple[str, AdapterLayer]]:
    """The adapters `config` puts on `model`, built but NOT installed (see `install_adapters`).

    Building leaves `model` as it was if any adapter fails: each adapter wraps the model's
    own base layer and freezes it (those flags are restored on failure), except where the
    adapter would rewrite its base (init="pissa", or `copy_bases`): it then wraps a copy,
    and the model's layer is only dropped when the adapter is installed. (So PiSSA briefly
    holds W0 and its residual side by side; a weight tied to another module keeps W0 there.)
    An adapter's error names the target it was built for. `shared`: a target that already holds
    adapters gets one more around the same base (lora.named.add_adapter), not a copy.
    """
    if not isinstance(config, IA3Config):
        adapter_class(config.method)  # unknown method: fail before touching anything
    copy_bases = copy_bases or getattr(config, "init", None) == "pissa"
    flags = [(p, p.requires_grad) for p in model.parameters()]
    built = []
    try:
        for name in find_targets(model, config, adapted_ok=shared):
            base = model.get_submodule(name)
            base = base.base_layer if isinstance(base, CONTAINERS) else base
            try:
                built.append((name, make_adapter(copy.deepcopy(base) if copy_bases else base, config, name)))
            except (ValueError, TypeError) as err:
                if type(err) not in (ValueError, TypeError):
                    raise
                raise type(err)(f"target {name!r}: {err}") from err
    except BaseException:
        restore_flags(flags)  # the constructors that succeeded froze their bases
        raise
    return built


def install_adapters(model: nn.Module, adapters: list[tuple[str, AdapterLayer]],
                     config: LoraConfig) -> nn.Module:
    """Put built adapters in place (setattr on the parent) and set what trains (`mark_trainable`);
    all-or-nothing."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    old = [(name, model.get_submodule(name)) for name, _ in adapters]
    swap_modules(model, adapters)
    try:
        mark_trainable(model, config)
    except BaseException:
        swap_modules(model, old)
        restore_flags(flags)
        raise
    return model


def mark_trainable(model: nn.Module, config: LoraConfig) -> nn.Module:
    """Train what `config` trains: the adapters, the biases its `bias` names and its
    `modules_to_save` (an entry that selects nothing is skipped, as PEFT does); freeze the rest."""
    mark_only_lora_as_trainable(model, bias=config.bias)
    for _, module in find_modules_to_save(model, config.modules_to_save, strict=False):
        module.requires_grad_(True)
    return model


def add_lora_to_model(model: nn.Module, config: LoraConfig | None = None, **overrides) -> nn.Module:
    """Wrap every target layer of `model` in an adapter (in place); only adapters stay trainable
    (and `modules_to_save`, and biases per `bias`).

    `config` is a LoraConfig (or a PEFT LoraConfig, converted); `overrides` are LoraConfig
    fields (or rank=, alpha=, dropout=) applied over it. The model remembers the resulting
    config (`remembered_config`), so save_adapter writes what was asked for here.
    Returns the same model object. All-or-nothing: every adapter is built (and checked) on
    the side before the first one is put in place, so a failure leaves `model` as it was.
    A model that already holds adapters is refused, whatever the targets.
    """
    return _add_adapters(model, make_config(config, **overrides))


def add_ia3_to_model(model: nn.Module, config: IA3Config | None = None, **overrides) -> nn.Module:
    """Wrap every target layer of `model` in an IA3Linear (lora/ia3.py), input-side for the targets
    `feedforward_modules` names, output-side for the others; only the vectors (and `modules_to_save`)
    train. `overrides` are IA3Config fields. Remembered, all-or-nothing and refused on a model
    that holds adapters, as add_lora_to_model."""
    config = dataclasses.replace(config or IA3Config(), **overrides)
    if isinstance(config.feedforward_modules, tuple):
        targets = find_targets(model, config)
        for entry in config.feedforward_modules:
            if not any(name_matches(t, entry) for t in targets):
                raise ValueError(f"add_ia3_to_model: feedforward_modules entry {entry!r} is not one of the "
                                 f"targets {targets} (PEFT: feedforward_modules must be a subset of target_modules)")
    return _add_adapters(model, config)


def _add_adapters(model: nn.Module, config: LoraConfig | IA3Config) -> nn.Module:
    existing = [name for name, m in modules_outside_adapters(model) if isinstance(m, CONTAINERS)]
    if existing:
        shown = existing if len(existing) <= 6 else existing[:6] + [f"... ({len(existing) - 6} more)"]
        raise ValueError(f"add_lora_to_model: {type(model).__name__} already has adapters ({len(existing)} "
                         f"adapter layers: {shown}); to fill them from a file use lora.load_adapter(model, path), "
                         f"to add other adapters start from a fresh model (or lora.merge_lora_weights(model) first)")
    targets = find_targets(model, config)
    find_modules_to_save(model, config.modules_to_save, targets=targets)  # check names before any change
    if isinstance(config, LoraConfig):
        check_patterns(config, targets)
    flags = [(p, p.requires_grad) for p in model.parameters()]
    adapters = build_adapters(model, config)             # changes nothing in model if it fails
    try:
        install_adapters(model, adapters, config)
    except BaseException:
        restore_flags(flags)                             # building froze the bases
        raise
    remember_config(model, config)
    return model


def check_patterns(config: LoraConfig, targets: list[str]) -> None:
    """Every rank_pattern / alpha_pattern key must match one of the adapted modules: a typo
    would otherwise silently give that layer the default rank or alpha. (PEFT ignores such
    keys; load_adapter does too, so files written elsewhere still load.)"""
    for what, pattern in (("rank_pattern", config.rank_pattern), ("alpha_pattern", config.alpha_pattern)):
        for key in pattern:
            if not any(pattern_value({key: True}, name, False) for name in targets):
                shown = targets if len(targets) <= 12 else targets[:12] + [f"... ({len(targets) - 12} more)"]
                raise ValueError(f"add_lora_to_model: {what} key {key!r} matches none of the adapted modules "
                                 f"(it must match the end of a name at a dot boundary); adapted modules: {shown}")
