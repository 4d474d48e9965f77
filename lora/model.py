"""Model surgery: put adapters on the Linear layers of any nn.Module, count, merge, unmerge.

    model = add_lora_to_model(model, r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"])

walks `model.named_modules()`, and for every module whose dotted name matches a
target replaces it (`setattr` on its parent) by an adapter wrapping it. Names and
matching follow Hugging Face PEFT, so a `LoraConfig` here means what it means there:

- `target_modules` a str: a regex that must match the WHOLE dotted name
  (`re.fullmatch`), e.g. r".*\\.(q|v)_proj";
  a list: an entry matches a name equal to it or ending in "." + entry
  ("q_proj" matches "model.layers.0.self_attn.q_proj", not "my_q_proj");
  "all-linear": every Linear-like layer except `lm_head` and `modules_to_save`.
- `modules_to_save` entries: PEFT's rule, which is looser than target_modules': a
  module is selected when its name ends with the entry ("classifier" selects
  "pre_classifier" too), and only top-most selected modules count.
- `rank_pattern` / `alpha_pattern` keys: a regex matching the end of the name at
  a dot boundary (`re.match(rf"(.*\\.)?({key})$", name)`); the first key (in dict
  order) that matches wins, else `r` / `lora_alpha`.

Linear-like = `nn.Linear`, a transformers `Conv1D` (Hugging Face GPT-2's `c_attn`,
`c_proj`, `c_fc`, weight stored (in, out); every adapter reads it through
`lora.base.base_weight`, so none needs to know), or a quantized stand-in with
`in_features`, `out_features` and `dequantize()` (lora imports neither transformers
nor quantization: duck typing).
"""
from __future__ import annotations

import copy
import dataclasses
import re
from dataclasses import dataclass, field
from typing import Sequence, Union

import torch
import torch.nn as nn

from lora.base import (AdapterLayer, base_weight, check_alpha, check_dropout, check_finite, check_flag, check_rank,
                       is_linear_like, weight_layout)
from lora.dora import DoRALinear
from lora.hira import HiRALinear
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
METHODS = tuple(ADAPTER_CLASSES)
INITS = ("kaiming", "gaussian", "pissa")
BIASES = ("none", "all", "lora_only")
# Short names accepted by add_lora_to_model(**overrides) besides the field names.
ALIASES = {"rank": "r", "alpha": "lora_alpha", "dropout": "lora_dropout"}
# Layers "all-linear" never adapts: the output projection to the vocabulary (as PEFT).
OUTPUT_LAYER_NAMES = ("lm_head",)

TargetModules = Union[str, Sequence[str]]


@dataclass
class LoraConfig:
    r: int = 8                              # default rank of every adapter
    lora_alpha: float = 16                  # scaling = lora_alpha / r (or / sqrt(r) with use_rslora)
    lora_dropout: float = 0.0               # dropout on the adapter's input (before A)
    target_modules: TargetModules = "all-linear"  # list (exact / dotted suffix), regex str, or "all-linear"
    method: str = "lora"                    # one of METHODS
    rank_pattern: dict = field(default_factory=dict)   # {name regex: rank} per-layer ranks
    alpha_pattern: dict = field(default_factory=dict)  # {name regex: alpha} per-layer alphas
    use_rslora: bool = False                # rsLoRA scaling alpha / sqrt(r) (Kalajdzievski 2023)
    init: str = "kaiming"                   # A's init: "kaiming", "gaussian" or "pissa" (lora, sparse)
    bias: str = "none"                      # which biases train: "none", "all", "lora_only"
    modules_to_save: Sequence[str] = ()     # extra modules trained in full and saved (e.g. "classifier"); an
                                            # entry selects every module whose name ENDS with it (PEFT's rule,
                                            # so "classifier" also selects DistilBERT's "pre_classifier")

    def __post_init__(self):
        check_rank(self.r, "LoraConfig.r")
        check_alpha(self.lora_alpha, "LoraConfig.lora_alpha")
        check_dropout(self.lora_dropout, "LoraConfig.lora_dropout")
        check_flag(self.use_rslora, "LoraConfig.use_rslora")
        if self.method not in METHODS:
            raise ValueError(f"LoraConfig.method: unknown method {self.method!r}; known methods: "
                             f"{', '.join(METHODS)}")
        if self.init not in INITS:
            raise ValueError(f"LoraConfig.init must be one of {INITS}, got {self.init!r}")
        if self.init != "kaiming" and self.method not in ("lora", "sparse"):
            raise ValueError(f"LoraConfig.init={self.init!r} is only for methods 'lora' and 'sparse', "
                             f"got method {self.method!r}")
        if self.use_rslora and self.method == "adalora":
            raise ValueError("LoraConfig.use_rslora is not available for method 'adalora' "
                             "(its scaling is alpha / r)")
        if self.bias not in BIASES:
            raise ValueError(f"LoraConfig.bias must be one of {BIASES}, got {self.bias!r}")
        if isinstance(self.target_modules, str):
            _compile(self.target_modules, "LoraConfig.target_modules")
        else:
            self.target_modules = tuple(self.target_modules)
            if not self.target_modules or not all(isinstance(t, str) for t in self.target_modules):
                raise ValueError(f"LoraConfig.target_modules must be a regex string or a non-empty list "
                                 f"of names, got {self.target_modules!r}")
        if isinstance(self.modules_to_save, str):
            self.modules_to_save = (self.modules_to_save,)
        self.modules_to_save = tuple(self.modules_to_save or ())
        for key, value in self.rank_pattern.items():
            _compile(key, "LoraConfig.rank_pattern key")
            check_rank(value, f"LoraConfig.rank_pattern[{key!r}]")
        for key, value in self.alpha_pattern.items():
            _compile(key, "LoraConfig.alpha_pattern key")
            check_alpha(value, f"LoraConfig.alpha_pattern[{key!r}]")

    def rank_for(self, name: str) -> int:
        return pattern_value(self.rank_pattern, name, self.r)

    def alpha_for(self, name: str) -> float:
        return pattern_value(self.alpha_pattern, name, self.lora_alpha)


def _compile(pattern: str, what: str) -> re.Pattern:
    try:
        return re.compile(pattern)
    except re.error as err:
        raise ValueError(f"{what}: {pattern!r} is not a valid regex ({err})") from None


def pattern_value(pattern: dict, name: str, default):
    """PEFT's rule: the first key that matches the end of `name` at a dot boundary."""
    for key, value in pattern.items():
        if re.match(rf"(.*\.)?({key})$", name):
            return value
    return default


def name_matches(name: str, entry: str) -> bool:
    """A list entry: the exact name, or a dotted suffix of it."""
    return name == entry or name.endswith("." + entry)


def saved_name_matches(name: str, entry: str) -> bool:
    """A `modules_to_save` entry, as PEFT matches it (`key.endswith(entry)` in peft.utils.other._set_trainable):
    any name that ends with the entry, at a dot boundary or not."""
    return name.endswith(entry)


def make_config(config=None, **overrides) -> LoraConfig:
    """`config` (or the defaults) with `overrides` applied; accepts rank/alpha/dropout as aliases.

    `config` may also be a PEFT `LoraConfig` (anything with `to_dict()` giving PEFT's fields):
    it is converted field by field, and a field set to something this library does not
    implement is refused by name (lora.adapter_io.config_from_peft)."""
    if config is None:
        config = LoraConfig()
    elif not isinstance(config, LoraConfig):
        if not callable(getattr(config, "to_dict", None)):
            cls = type(config)
            raise TypeError(f"add_lora_to_model: config must be a lora.LoraConfig or a PEFT LoraConfig "
                            f"(an object with to_dict()), got {cls.__module__}.{cls.__qualname__}")
        from lora.adapter_io import config_from_peft   # adapter_io imports this module: import on use
        config = config_from_peft(config)
    fields = {f.name for f in dataclasses.fields(LoraConfig)}
    changes = {}
    for key, value in overrides.items():
        key = ALIASES.get(key, key)
        if key not in fields:
            raise TypeError(f"add_lora_to_model: unknown option {key!r}; options are "
                            f"{sorted(fields)} (and aliases {sorted(ALIASES)})")
        changes[key] = value
    return dataclasses.replace(config, **changes)


# --- finding modules -------------------------------------------------------------------------
def adapter_layers(model: nn.Module) -> list[tuple[str, AdapterLayer]]:
    """Every adapter in the model, (dotted name, layer), in module order."""
    return [(name, m) for name, m in model.named_modules() if isinstance(m, AdapterLayer)]


def modules_outside_adapters(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """named_modules() without anything inside an adapter (its base_layer, dropout, ...)."""
    inside: list[str] = []
    result = []
    for name, module in model.named_modules():
        if any(name.startswith(prefix + "." if prefix else "") for prefix in inside):
            continue
        if isinstance(module, AdapterLayer):
            inside.append(name)
        result.append((name, module))
    return result


def _candidates_message(modules: list[tuple[str, nn.Module]]) -> str:
    names = [n for n, m in modules if n and (is_linear_like(m) or isinstance(m, AdapterLayer))]
    if not names:
        return "the model has no Linear-like modules"
    short = sorted({n.rsplit(".", 1)[-1] for n in names})
    shown = names if len(names) <= 12 else names[:12] + [f"... ({len(names) - 12} more)"]
    return f"Linear-like module names: {short}; full names: {shown}"


def find_targets(model: nn.Module, config: LoraConfig) -> list[str]:
    """Dotted names of the modules `config.target_modules` selects; errors as described above."""
    modules = modules_outside_adapters(model)
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
        if isinstance(module, AdapterLayer):
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
    names (a subclass such as quantization's QLoRALinear is a "lora" adapter), or None."""
    methods = {cls: method for method, cls in ADAPTER_CLASSES.items()}
    return next((methods[cls] for cls in type(layer).__mro__ if cls in methods), None)


def make_adapter(base: nn.Module, config: LoraConfig, name: str = "") -> AdapterLayer:
    """One adapter of `config.method` around `base`, with the rank/alpha `name` gets from the patterns."""
    cls = adapter_class(config.method)
    kwargs = dict(rank=config.rank_for(name), alpha=config.alpha_for(name), dropout=config.lora_dropout)
    if config.use_rslora:  # passed only when asked for, so a class without rsLoRA says so (TypeError)
        kwargs["use_rslora"] = True
    if config.init != "kaiming":
        kwargs["init"] = config.init
    return cls(base, **kwargs)


def build_adapters(model: nn.Module, config: LoraConfig, copy_bases: bool = False
                   ) -> list[tuple[str, AdapterLayer]]:
    """The adapters `config` puts on `model`, built but NOT installed (see `install_adapters`).

    Building leaves `model` as it was if any adapter fails: each adapter wraps the model's
    own base layer and freezes it (those flags are restored on failure), except where the
    adapter would rewrite its base (init="pissa", or `copy_bases`): it then wraps a copy,
    and the model's layer is only dropped when the adapter is installed. (So PiSSA briefly
    holds W0 and its residual side by side; a weight tied to another module keeps W0 there.)
    An adapter's error names the target it was built for.
    """
    adapter_class(config.method)  # unknown method: fail before touching anything
    copy_bases = copy_bases or config.init == "pissa"
    flags = [(p, p.requires_grad) for p in model.parameters()]
    built = []
    try:
        for name in find_targets(model, config):
            base = model.get_submodule(name)
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
    config = make_config(config, **overrides)
    existing = [name for name, _ in adapter_layers(model)]
    if existing:
        shown = existing if len(existing) <= 6 else existing[:6] + [f"... ({len(existing) - 6} more)"]
        raise ValueError(f"add_lora_to_model: {type(model).__name__} already has adapters ({len(existing)} "
                         f"adapter layers: {shown}); to fill them from a file use lora.load_adapter(model, path), "
                         f"to add other adapters start from a fresh model (or lora.merge_lora_weights(model) first)")
    targets = find_targets(model, config)
    find_modules_to_save(model, config.modules_to_save, targets=targets)  # check names before any change
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
    modules = [(n, m) for n, m in modules_outside_adapters(model) if n and not isinstance(m, AdapterLayer)]
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


# --- the config a model's adapters were made with ---------------------------------------------
CONFIG_ATTR = "nanopeft_config"


def remember_config(model: nn.Module, config: LoraConfig) -> None:
    """Keep `config` on the root module (add_lora_to_model and load_adapter do this), as a plain
    attribute: deepcopy and pickling carry it, state_dict does not (the adapter file holds it)."""
    setattr(model, CONFIG_ATTR, config)


def remembered_config(model: nn.Module) -> LoraConfig | None:
    """The config `model`'s adapters were added or loaded with, or None."""
    config = model.__dict__.get(CONFIG_ATTR)
    return config if isinstance(config, LoraConfig) else None


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


# --- merging ---------------------------------------------------------------------------------
@torch.no_grad()
def merged_linear(layer: AdapterLayer, name: str = "") -> nn.Module:
    """A plain layer computing what `layer` computes: W0 (dequantized) + delta W, summed in
    float32 and stored in the dtype of the weight the base stands for: an nn.Linear's own, a
    quantized layer's `weight_dtype` (its weight before quantization) or else float32, so
    the model's activations meet the dtype they met before quantizing.

    An nn.Linear, except for a Conv1D base: then a copy of that Conv1D holding the merged
    weight in its own (in, out) layout, so the model's state dict keeps its checkpoint's
    shapes (a merged Hugging Face GPT-2 still saves and loads as one)."""
    base = layer.base_layer
    W = base_weight(base).float()                                     # (out, in)
    if not layer.merged:
        W = W + layer.get_delta_weight().float()
    check_finite(W, f"merge_lora_weights: the merged weight W0 + delta W of {name or type(layer).__name__}")
    if weight_layout(base) == "in_out":
        merged = copy.deepcopy(base)
        base_weight(merged).copy_(W)                                  # through the (out, in) view
        return merged.requires_grad_(False)
    if isinstance(base, nn.Linear):
        dtype = base.weight.dtype
    else:
        dtype = getattr(base, "weight_dtype", None) or torch.float32
    bias = getattr(base, "bias", None)
    linear = nn.Linear(layer.in_features, layer.out_features, bias=bias is not None,
                       device=W.device, dtype=dtype)
    linear.weight.copy_(W)
    if bias is not None:
        linear.bias.copy_(bias)
    linear.requires_grad_(False)
    return linear


def merge_lora_weights(model: nn.Module) -> nn.Module:
    """Replace every adapter by a plain nn.Linear holding W0 + delta W (works for quantized
    bases: W0 is dequantized; a Conv1D base stays a Conv1D, see `merged_linear`). The result
    holds no adapter; it is returned (the same object unless `model` itself is an adapter).
    All-or-nothing: every merged layer is built (and checked finite) before the first is put in place."""
    layers = adapter_layers(model)
    if layers and not layers[0][0]:
        return merged_linear(layers[0][1])
    swap_modules(model, [(name, merged_linear(layer, name)) for name, layer in layers])
    model.__dict__.pop(CONFIG_ATTR, None)          # no adapters left to describe
    return model


def merge_adapters(model: nn.Module) -> nn.Module:
    """Call `merge()` on every adapter (in place into float bases, nn.Linear or Conv1D; quantized bases refuse).
    All-or-nothing: if one adapter cannot merge, those merged by this call are unmerged (exact)."""
    layers = [(name, layer) for name, layer in adapter_layers(model) if not layer.merged]
    for name, layer in layers:   # refuse a quantized base before merging anything
        try:
            layer._check_mergeable()
        except RuntimeError as err:
            raise RuntimeError(f"merge_adapters: {name}: {err}") from None
    try:
        for name, layer in layers:
            try:
                layer.merge()
            except ValueError as err:  # a non-finite merged weight
                raise ValueError(f"merge_adapters: {name}: {err}") from None
    except BaseException:
        for _, layer in layers:
            if layer.merged:
                layer.unmerge()
        raise
    return model


def unmerge_lora_weights(model: nn.Module) -> nn.Module:
    """Undo `merge_adapters`: call `unmerge()` on every in-place merged adapter.
    All-or-nothing: if one fails, those unmerged by this call are merged again."""
    layers = [layer for _, layer in adapter_layers(model) if layer.merged]
    try:
        for layer in layers:
            layer.unmerge()
    except BaseException:
        for layer in layers:
            if not layer.merged:
                layer.merge()
        raise
    return model
