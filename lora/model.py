"""Model surgery: put adapters on the Linear layers of any nn.Module, count, merge, unmerge.

    model = add_lora_to_model(model, r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"])


walks `model.named_modules()`, and for every module whose dotted name matches a
target (the matching rules: lora/config.py) replaces it (`setattr` on its parent)
by an adapter wrapping it. Merging adapters into plain layers: lora/merge.py.

Linear-like = `nn.Linear`, a transformers `Conv1D` (Hugging Face GPT-2's `c_attn`,
`c_proj`, `c_fc`, weight stored (in, out); every adapter reads it through
`lora.base.base_weight`, so none needs to know), or a quantized stand-in with
`in_features`, `out_features` and `dequantize()` (lora imports neither transformers
nor quantization: duck typing).
"""
from __future__ import annotations

import copy
import dataclasses
from typing import Sequence

import torch
import torch.nn as nn

from lora.base import AdapterLayer, is_linear_like
from lora.config import (BIASES, DEFAULT_ADAPTER, METHODS, OUTPUT_LAYER_NAMES, IA3Config, LoraConfig,  # noqa: F401
                         _compile, adapter_set, make_config, name_matches, pattern_value, remember_config,
                         saved_name_matches)
from lora.multi import MultiAdapterLinear
from lora.dora import DoRALinear
from lora.hira import HiRALinear
from lora.ia3 import IA3Linear
from lora.layers import LoRALinear
from lora.sparse import SparseLoRALinear
from lora.svd import SVDLoRALinear

# Method name -> adapter class. "adalora" is AdaLoRA's SVD form P Λ Q (lora/svd.py).
ADAPTER_CLASSES: dict[str, type] = {
    "lora": LoRALinear,
    "sparse": SparseLoRALinear,
    "hira": HiRALinear,
    "dora": DoRALinear,
    "adalora": SVDLoRALinear,
}
assert tuple(ADAPTER_CLASSES) == METHODS, "lora.config.METHODS must list ADAPTER_CLASSES' keys"


# --- finding modules -------------------------------------------------------------------------
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


def restore_flags(flags: list[tuple[torch.Tensor, bool]]) -> None:
    for p, flag in flags:
        p.requires_grad_(flag)


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


def mark_only_lora_as_trainable(model: nn.Module, bias: str = "none") -> nn.Module:
    """Freeze everything but adapter parameters; bias="all" / "lora_only" also trains biases.
    A model without adapters is refused (it would freeze every parameter)."""
    if bias not in BIASES:
        raise ValueError(f"mark_only_lora_as_trainable: bias must be one of {BIASES}, got {bias!r}")
    if not adapter_layers(model):
        raise ValueError(f"mark_only_lora_as_trainable: {type(model).__name__} has no adapter layers, so this "
                         f"would freeze every parameter; add adapters first (lora.add_lora_to_model)")
    flags = [(p, p.requires_grad) for p in model.parameters()]
    try:
        for p in model.parameters():
            p.requires_grad_(False)
        for _, layer in adapter_layers(model):
            for p in layer.adapter_parameters():
                p.requires_grad_(True)
            if bias == "lora_only" and getattr(layer.base_layer, "bias", None) is not None:
                layer.base_layer.bias.requires_grad_(True)
        if bias == "all":
            for name, p in model.named_parameters():
                if name == "bias" or name.endswith(".bias"):
                    p.requires_grad_(True)
    except BaseException:
        restore_flags(flags)
        raise
    return model


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) with TRUE counts: a module with `true_param_count()` (a packed
    quantized layer) counts that, not its storage; shared (tied) tensors count once."""
    seen: set[int] = set()
    trainable = total = 0

    def visit(module: nn.Module) -> None:
        nonlocal trainable, total
        if callable(getattr(module, "true_param_count", None)):
            fresh = [p for p in module.parameters() if id(p) not in seen]
            seen.update(id(p) for p in module.parameters())
            total += int(module.true_param_count())
            trainable += sum(p.numel() for p in fresh if p.requires_grad)
            return
        for p in module.parameters(recurse=False):
            if id(p) not in seen:
                seen.add(id(p))
                total += p.numel()
                trainable += p.numel() if p.requires_grad else 0
        for child in module.children():
            visit(child)

    visit(model)
    return trainable, total


def lora_state_dict(model: nn.Module, modules_to_save: Sequence[str] = ()) -> dict[str, torch.Tensor]:
    """The adapter tensors (factors, magnitudes, masks: everything outside `base_layer`) by
    their model state-dict names, plus the parameters of `modules_to_save`."""
    state = {}
    for name, layer in adapter_layers(model):
        prefix = f"{name}." if name else ""
        for key, tensor in layer.state_dict(keep_vars=True).items():
            if not key.startswith("base_layer."):
                state[prefix + key] = tensor.detach()
    for name, module in find_modules_to_save(model, modules_to_save):
        for key, p in module.named_parameters():
            state[f"{name}.{key}"] = p.detach()
    return state
