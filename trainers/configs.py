"""The experiment matrix's named configurations: method x quantization x allocation.

    exp = CONFIGS["B-Q4"]                                   # QLoRA: NF4 base + LoRA r=8
    exp = dataclasses.replace(CONFIGS["SADRA"], target_modules="all-linear")   # any field, by name

A configuration names a recipe; `trainers.prepare.prepare` turns a model into what it
trains and `trainers.experiments.run_experiment` runs it. The recipes live here and only
here (STYLE rule 15): the command line, tutorials and tests start from a name and change
single fields (`--rank 16`, `--targets all-linear`), and the run's config.json records
every field as used.

Methods and where they come from:
  LoRA (Hu et al. 2021), QLoRA = NF4 + double quantization under LoRA (Dettmers et al. 2023),
  AdaLoRA (Zhang et al. 2023), DoRA (Liu et al. 2024), HiRA (Huang et al. 2025), IA3 (Liu et al. 2022),
  Sparse LoRA (L1 + magnitude pruning of the factors), SADRA (this project: one-shot
  Hutchinson Hessian-trace ranks, Hutchinson 1989 / Yao et al. 2020 "PyHessian"), DRaFT-Q
  (this project: EMA-curvature dynamic ranks under a memory cap on a 4-bit base).

Text forms (the command line's; `parse_field` reads them):
  target_modules  "q_proj,v_proj" (names: exact or dotted suffix), "all-linear", or a regex
                  matching the whole dotted name (any of  * + ? ( ) [ ] | \\ ^ $  marks one)
  quant           "4", "8", "mixed" (8/4 by Hutchinson sensitivity), "none", or a fixed
                  pattern "c_attn=8,c_fc=4" (exact name, dotted suffix or regex -> bits;
                  layers no pattern matches stay float)
  rank_pattern    "c_attn=4,transformer.h.1.attn.c_attn=16" ({name regex: rank}, PEFT's rule)
  dicts may also be given as JSON: '{"c_attn": 8}'
"""
from __future__ import annotations

import json
import numbers
from dataclasses import dataclass

SIGNALS = ("grad_sq", "spread", "secant")   # allocation.curvature.SIGNALS (checked equal in the tests)
METHODS = ("lora", "sparse", "hira", "dora", "adalora", "ia3", "full")
ALLOCATIONS = ("uniform", "adalora", "hutchinson", "curvature", "manual")
QUANTS = (None, 4, 8, "mixed")            # or a {layer pattern: 4 | 8} dict
ALL_LINEAR = "all-linear"
REGEX_MARKS = set("*+?()[]|\\^$")


@dataclass
class ExperimentConfig:
    name: str                              # the configuration's name, e.g. "B-Q4"
    method: str = "lora"                   # "lora" | "sparse" | "hira" | "dora" | "adalora" | "ia3" | "full"
    r: int = 8                             # rank (the start rank of adaptive allocations; AdaLoRA's init_r)
    lora_alpha: float = 16                 # scaling = lora_alpha / r
    target_modules: tuple | str | None = None  # names, "all-linear" or a regex; None: the family's attention
                                           # projections (PEFT's defaults, trainers.prepare.DEFAULT_TARGETS)
    quant: int | str | dict | None = None  # None | 4 (NF4 + double quant) | 8 | "mixed" (8/4 by sensitivity)
                                           # | {layer pattern: 4 | 8} (unmatched layers stay float)
    allocation: str = "uniform"            # "uniform" | "adalora" | "hutchinson" | "curvature" | "manual"
    rank_pattern: dict | None = None       # manual: {module name or pattern: rank}; None: a depth ramp
    description: str = ""
    target_r: int | None = None            # AdaLoRA: average rank at the end of the budget schedule; None: the
                                           # budget rank (--budget-rank), so it ends at uniform's parameter count
    lora_dropout: float = 0.0
    mixed_high_fraction: float = 0.5       # "mixed": base budget = all-4-bit + this share of the 8-bit extra
    sparsity: float = 0.5                  # "sparse": final fraction of zeros in A and B
    l1: float = 1e-4                       # "sparse": L1 coefficient on the factors
    alpha_per_rank: float | None = None    # alpha = this * r in every layer, so alpha / r stays the same when
                                           # ranks differ; None: lora_alpha everywhere
    lr_scale: float = 1.0                  # this method's lr = TrainConfig.lr * lr_scale (HiRA wants ~10x LoRA's)
    r_min: int | None = None               # hutchinson, curvature, the depth ramp: smallest rank; None: 2
                                           # (ramp: budget rank // 4)
    r_max: int | None = None               # ... largest rank; None: 4 x the budget rank
    tinit: int | None = None               # AdaLoRA: warm-up steps before pruning; None: 10 % of the steps
    tfinal: int | None = None              # AdaLoRA: final steps with the mask frozen; None: 20 % of the steps
    delta_t: int | None = None             # AdaLoRA: steps between maskings; None: 1 % of the steps (>= 1)
    orth_reg_weight: float = 0.1           # AdaLoRA: orthogonality regulariser weight (the paper's 0.1)
    interval: int | None = None            # curvature: steps between rank decisions; None: 10 decisions a run
    n_change: int | None = None            # curvature: layers grown per decision; None: a third of the layers
    memory_cap_bytes: int | None = None    # curvature: cap on adapter training bytes; None: uniform budget rank's
    signal: str = "grad_sq"                # curvature: "grad_sq", "spread" or "secant" (allocation/curvature.py)

    def __post_init__(self):
        from trainers.config_checks import check_floats, check_ints
        if self.method not in METHODS:
            raise ValueError(f"{self.name}: method must be one of {METHODS}, got {self.method!r}")
        if self.signal not in SIGNALS:
            raise ValueError(f"{self.name}: signal must be one of {SIGNALS}, got {self.signal!r}")
        if self.allocation not in ALLOCATIONS:
            raise ValueError(f"{self.name}: allocation must be one of {ALLOCATIONS}, got {self.allocation!r}")
        if isinstance(self.quant, dict):
            bad = {k: v for k, v in self.quant.items() if not isinstance(k, str) or isinstance(v, bool) or v not in (4, 8)}
            if not self.quant or bad:
                raise ValueError(f"{self.name}: a quant pattern maps layer names to 4 or 8 bits, got {self.quant!r}")
        elif isinstance(self.quant, bool) or self.quant not in QUANTS:
            raise ValueError(f"{self.name}: quant must be one of {QUANTS} or a {{layer pattern: 4 | 8}} dict, "
                             f"got {self.quant!r}")
        if self.method == "full" and (self.quant is not None or self.allocation != "uniform"):
            raise ValueError(f"{self.name}: full fine-tuning trains every weight, so it takes no quantized base "
                             f"and no rank allocation")
        if self.method == "ia3" and (self.quant is not None or self.allocation != "uniform"):
            raise ValueError(f"{self.name}: IA3 has no rank to allocate and is run on the float base here")
        if (self.method == "adalora") != (self.allocation == "adalora"):
            raise ValueError(f"{self.name}: method 'adalora' and allocation 'adalora' go together")
        check_ints(self, ("r",), minimum=1)
        check_ints(self, ("target_r", "r_min", "r_max", "delta_t", "interval", "n_change", "memory_cap_bytes"),
                   minimum=1, optional=True)
        check_ints(self, ("tinit", "tfinal"), minimum=0, optional=True)
        check_floats(self, ("lora_alpha", "lr_scale"), above=0)
        check_floats(self, ("alpha_per_rank",), above=0, optional=True)
        check_floats(self, ("orth_reg_weight", "l1"), minimum=0)
        check_floats(self, ("lora_dropout", "sparsity"), minimum=0)
        for name in ("lora_dropout", "sparsity"):
            if getattr(self, name) >= 1:
                raise ValueError(f"{self.name}: {name} must be < 1, got {getattr(self, name)!r}")
        check_floats(self, ("mixed_high_fraction",), minimum=0, maximum=1)
        if self.r_min is not None and self.r_max is not None and self.r_min > self.r_max:
            raise ValueError(f"{self.name}: r_min ({self.r_min}) must be <= r_max ({self.r_max})")
        if self.rank_pattern and self.allocation != "manual":
            raise ValueError(f"{self.name}: rank_pattern is used only with allocation='manual' (the other "
                             f"allocations choose the ranks), got allocation={self.allocation!r}")
        if self.rank_pattern is not None:
            bad = {k: v for k, v in dict(self.rank_pattern).items()
                   if not isinstance(k, str) or isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < 1}
            if bad:
                raise ValueError(f"{self.name}: rank_pattern maps name patterns to ranks >= 1; bad entries: {bad}")
        if isinstance(self.target_modules, str):        # "all-linear" or a regex: one string, not its letters
            if not self.target_modules:
                raise ValueError(f"{self.name}: target_modules is an empty string")
        elif self.target_modules is not None:
            self.target_modules = tuple(self.target_modules)
            if not self.target_modules or not all(isinstance(t, str) and t for t in self.target_modules):
                raise ValueError(f"{self.name}: target_modules must be module names, 'all-linear' or a regex, "
                                 f"got {self.target_modules!r}")


_C = ExperimentConfig
CONFIGS: dict[str, ExperimentConfig] = {c.name: c for c in [
    _C("B-FP", description="LoRA r=8 on the full-precision base (baseline)"),
    _C("B-Q4", quant=4, description="QLoRA: NF4 + double-quantized base, LoRA r=8"),
    _C("B-Ada", method="adalora", allocation="adalora", r=12,
       description="AdaLoRA: SVD-form adapters from r=12 pruned by importance to the budget rank (8) on average"),
    _C("Joint-1", method="adalora", allocation="adalora", r=12, target_r=4, quant=4,
       description="adaptive ranks (AdaLoRA 12->4) on an NF4 base"),
    _C("Joint-2", method="adalora", allocation="adalora", r=12, target_r=4, quant="mixed",
       description="adaptive ranks (AdaLoRA 12->4) on a mixed 8/4-bit base chosen by Hutchinson sensitivity"),
    _C("Joint-3", allocation="manual", quant="mixed",
       description="manual rank pattern (a depth ramp at the r=8 budget unless given) + mixed 8/4-bit base"),
    _C("SADRA", allocation="hutchinson", alpha_per_rank=2.0,
       description="one-shot ranks from Hutchinson Hessian traces, r in [2, 32] at the uniform r=8 budget, "
                   "alpha = 2 r (uniform's alpha / r)"),
    _C("DRaFT-Q", allocation="curvature", r=8, quant=4, alpha_per_rank=2.0, r_min=4, r_max=16, signal="spread",
       description="EMA-curvature dynamic ranks from r=8 within [4, 16] under the r=8 memory cap, NF4 base, "
                   "alpha = 2 r kept through resizes"),
    _C("Sparse-LoRA", method="sparse", description="LoRA r=8 with L1 and magnitude pruning of A and B"),
    _C("HiRA", method="hira", lr_scale=10.0,
       description="HiRA: high-rank update W0 * (B A), r=8, lr x 10 (at LoRA's lr it barely moves: tutorial 5)"),
    _C("DoRA", method="dora", description="DoRA: magnitude and direction, LoRA r=8 on the direction"),
    _C("IA3", method="ia3", description="IA3: learned vectors rescaling keys, values and the feed-forward input"),
    _C("Full-FT", method="full", description="full fine-tuning: every weight trains (reference)"),
]}
del _C


def get_config(name: str) -> ExperimentConfig:
    if name not in CONFIGS:
        raise KeyError(f"unknown config {name!r}; known configs: {', '.join(CONFIGS)}")
    return CONFIGS[name]


# ----------------------------------------------------------------------------- text forms

def parse_targets(text: str) -> tuple[str, ...] | str | None:
    """"all-linear", a regex (a string with a regex mark), comma-separated module names, or
    "none" (the model family's default)."""
    text = text.strip()
    if text.lower() in ("none", "default"):
        return None                                    # the model family's default targets
    if text == ALL_LINEAR or REGEX_MARKS & set(text):
        return text
    names = tuple(n.strip() for n in text.split(",") if n.strip())
    if not names:
        raise ValueError(f"--targets: expected module names, {ALL_LINEAR!r} or a regex, got {text!r}")
    return names


def parse_mapping(text: str, flag: str, value_type=int) -> dict:
    """'key=value,key=value' or a JSON object -> {key: value_type(value)}."""
    text = text.strip()
    try:
        pairs = json.loads(text).items() if text.startswith("{") else \
            [item.rsplit("=", 1) for item in text.split(",") if item.strip()]
        out = {}
        for pair in pairs:
            key, value = pair
            number = float(value)
            if value_type is int and number != int(number):
                raise ValueError(value)
            out[str(key).strip()] = value_type(number)
    except (ValueError, TypeError, AttributeError):
        raise ValueError(f"{flag}: expected 'name=value,name=value' or a JSON object of names to "
                         f"{value_type.__name__}s, got {text!r}") from None
    if not out:
        raise ValueError(f"{flag}: expected at least one 'name=value', got {text!r}")
    return out


def parse_bits(text: str) -> int | str | dict | None:
    """"4", "8", "mixed", "none", or a {layer pattern: bits} mapping (parse_mapping)."""
    word = text.strip().lower()
    if word in ("none", "16", "32", "float"):
        return None
    if word in ("4", "8"):
        return int(word)
    if word == "mixed":
        return "mixed"
    return parse_mapping(text, "--bits")


def parse_optional_number(kind):
    """A type function: "none" -> None, else kind(text)."""
    def parse(text: str):
        if text.strip().lower() == "none":
            return None
        return kind(text)
    parse.__name__ = kind.__name__
    return parse


# Fields whose text form is not a plain number or word, with their parsers and short flags.
FIELD_PARSERS = {"target_modules": parse_targets, "quant": parse_bits,
                 "rank_pattern": lambda text: parse_mapping(text, "--rank-pattern")}
FIELD_FORMS = {"target_modules": "q_proj,v_proj | all-linear | a regex | none (the family's default)",
               "quant": "4 | 8 | mixed | none | c_attn=8,c_fc=4 (unmatched layers stay float)",
               "rank_pattern": "c_attn=4,h.1.attn.c_attn=16 (with --allocation manual)"}
FLAG_ALIASES = {"r": "--rank", "lora_alpha": "--alpha", "target_modules": "--targets", "quant": "--bits"}
NOT_FLAGS = ("name", "description")          # what a configuration is called, not what it does
