"""LoraConfig: which layers get adapters, of which method, rank and alpha; name matching as in PEFT.

Names and matching follow Hugging Face PEFT, so a `LoraConfig` here means what it means there:

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

A model remembers the config its adapters were made with (`remember_config`), so
saving writes what was asked for.
"""
from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from typing import Sequence, Union

import torch.nn as nn

from lora.checks import check_alpha, check_dropout, check_flag, check_rank

# The methods lora.model.ADAPTER_CLASSES maps to layer classes. "adalora" is AdaLoRA's SVD form (lora/svd.py).
METHODS = ("lora", "sparse", "hira", "dora", "adalora")
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
    implement is refused by name (lora.peft_config.config_from_peft)."""
    if config is None:
        config = LoraConfig()
    elif not isinstance(config, LoraConfig):
        if not callable(getattr(config, "to_dict", None)):
            cls = type(config)
            raise TypeError(f"add_lora_to_model: config must be a lora.LoraConfig or a PEFT LoraConfig "
                            f"(an object with to_dict()), got {cls.__module__}.{cls.__qualname__}")
        from lora.peft_config import config_from_peft   # peft_config imports this module: import on use
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


@dataclass
class IA3Config:
    """IA3 (Liu et al. 2022, arXiv:2205.05638): which layers get a learned rescaling vector (lora/ia3.py).
    Fields and matching as PEFT's IA3Config."""
    target_modules: TargetModules = ("k_proj", "v_proj", "down_proj")  # as LoraConfig.target_modules
    feedforward_modules: TargetModules = ("down_proj",)   # of the targets, those whose INPUT is rescaled
                                                          # (the others rescale their output); same matching
    modules_to_save: Sequence[str] = ()     # as LoraConfig.modules_to_save
    bias: str = "none"                      # IA3 trains no biases (the field lets the shared surgery read it)
    method: str = "ia3"

    def __post_init__(self):
        if self.bias != "none" or self.method != "ia3":
            raise ValueError(f"IA3Config: bias must be 'none' and method 'ia3', got {self.bias!r}, {self.method!r}")
        for what in ("target_modules", "feedforward_modules"):
            value = getattr(self, what)
            if isinstance(value, str):
                _compile(value, f"IA3Config.{what}")
            else:
                value = tuple(value)
                if not all(isinstance(t, str) for t in value) or (what == "target_modules" and not value):
                    raise ValueError(f"IA3Config.{what} must be a regex string or a list of names, got {value!r}")
                setattr(self, what, value)
        if isinstance(self.modules_to_save, str):
            self.modules_to_save = (self.modules_to_save,)
        self.modules_to_save = tuple(self.modules_to_save or ())

    def is_feedforward(self, name: str) -> bool:
        """Whether the target `name` rescales its input (PEFT: regex fullmatch, or a name suffix)."""
        ff = self.feedforward_modules
        if isinstance(ff, str):
            return re.fullmatch(ff, name) is not None
        return any(name_matches(name, entry) for entry in ff)


# --- the config a model's adapters were made with ---------------------------------------------
CONFIG_ATTR = "nanopeft_config"


# Named adapters (lora.named): a model with a record knows its adapters' names and configs.
ADAPTERS_ATTR = "nanopeft_adapters"
DEFAULT_ADAPTER = "default"   # the name of an adapter added without one (PEFT's)


@dataclass
class AdapterSet:
    """The named adapters of a model: name -> config (in the order they were added), and the active one."""
    configs: dict
    active: str


def remember_config(model: nn.Module, config: LoraConfig | IA3Config) -> None:
    """Keep `config` on the root module (add_lora_to_model and load_adapter do this), as a plain
    attribute: deepcopy and pickling carry it, state_dict does not (the adapter file holds it).
    It is the ACTIVE adapter's config (also recorded under its name when the model has named adapters)."""
    record = adapter_set(model)
    if record is not None:
        record.configs[record.active] = config
    setattr(model, CONFIG_ATTR, config)


def remembered_config(model: nn.Module) -> LoraConfig | IA3Config | None:
    """The config `model`'s (active) adapters were added or loaded with, or None."""
    config = model.__dict__.get(CONFIG_ATTR)
    return config if isinstance(config, (LoraConfig, IA3Config)) else None


def adapter_set(model: nn.Module) -> AdapterSet | None:
    """The record of the model's named adapters, or None (a model that never had a name given)."""
    record = model.__dict__.get(ADAPTERS_ATTR)
    return record if isinstance(record, AdapterSet) else None


def forget_adapters(model: nn.Module) -> None:
    """Drop the config and the names (the model holds no adapter any more)."""
    model.__dict__.pop(CONFIG_ATTR, None)
    model.__dict__.pop(ADAPTERS_ATTR, None)
