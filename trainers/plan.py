"""Will it fit? The peak memory of one fine-tuning step of a causal LM, counted before building it.

    python -m trainers plan --model llama-7b --method qlora --rank 16 --batch 1 --seq 512
    python -m trainers plan --model gpt2-xl --method full --batch 4 --seq 1024 --grad-checkpointing

The model is built on the meta device (shapes, no storage), so a 13B model plans in a
second; parameters, quantized layers and adapter targets are read off that model with the
project's own rules (experiments.linear_layers, quantization.plan_quantization,
lora.find_targets), and priced with allocation.budget.

Weights, adapters, gradients, optimizer states (N params, dtype bytes w)
    frozen float params     N w                    (embeddings, norms, lm_head, unquantized Linears)
    quantized Linear (o,i)  budget.base_bytes      NF4 + double quant: 4 + 8/64 + 32/(64*256) bits/weight
                                                   plus per-tensor constants (quantization.nf4); int8: o i + 4 o
    adapters                budget.adapter_params  r (i + o) (+ o for DoRA, + r for AdaLoRA), plus the
                                                   Sparse LoRA masks (1 byte each) and AdaLoRA's rank mask
    gradients, moments      budget.adamw_bytes     N w each for weights and grads, 2 N w for AdamW's m, v;
                                                   --paged-adamw moves m, v to (pinned) host memory

Activations saved for backward: per token and per block, what autograd keeps for the blocks
in trainers/models, after Korthikanti et al. 2022 (arXiv:2205.05198), with checkpointing and
without; the table and its derivation are in trainers/plan_activations.py. Symbols below: a the
compute-dtype bytes, f = 4, B sequences of T tokens, N = B T, V the vocabulary.

The peak. Gradients are set to None after each step (the loop's zero_grad), the logits are
held until backward returns, and activations are freed as gradients appear, so the step's
peak is the largest of
    backward start   weights + moments + activations + logits (N V a) + 2 N V f (loss gradients)
    lm_head backward weights + moments + activations - log-probs + 2 logits + lm_head's weight gradient
    backward end     weights + moments + gradients + logits
    optimizer step   weights + moments + gradients + step temporaries (torch's foreach AdamW on
                     a GPU: one trainable-sized buffer; the CPU's per-tensor loop: the largest tensor)
The estimate is checked against measured peaks in fresh processes (trainers/plan_check.py).
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
from dataclasses import dataclass, field

import torch
import torch.nn as nn

from allocation.budget import adamw_bytes, adapter_cap_from_total, adapter_params, base_bytes, dtype_bytes
from lora.config import LoraConfig
from lora.targets import find_targets
from quantization.model import plan_quantization
from trainers.experiments import DEFAULT_TARGETS, MODEL_PRESETS
from trainers.prepare import linear_layers
from trainers.models import GPT2Config, LlamaConfig, build_model
from trainers.plan_activations import F32, activation_bytes

METHODS = ("full", "lora", "qlora", "sparse", "hira", "dora", "adalora")
DEVICES = ("cuda", "mps", "cpu")
GiB = 1024 ** 3
PAGED_CHUNK = 1 << 20          # trainers.optim.PagedAdamW's default chunk_size (elements)

# Named full-size configs (published shapes; built on the meta device only).
NAMED_MODELS = {
    "gpt2": ("gpt2", GPT2Config()),                                               # 124M
    "gpt2-medium": ("gpt2", GPT2Config(n_layer=24, n_head=16, n_embd=1024)),      # 355M
    "gpt2-large": ("gpt2", GPT2Config(n_layer=36, n_head=20, n_embd=1280)),       # 774M
    "gpt2-xl": ("gpt2", GPT2Config(n_layer=48, n_head=25, n_embd=1600)),          # 1.5B
    "stories260K": ("llama", LlamaConfig.stories260k()),
    "tinyllama": ("llama", LlamaConfig.tinyllama()),                              # 1.1B
    "llama-7b": ("llama", LlamaConfig(dim=4096, n_layers=32, n_heads=32, n_kv_heads=32, hidden_dim=11008,
                                      max_seq_len=4096)),                         # Llama-2-7B
    "llama-13b": ("llama", LlamaConfig(dim=5120, n_layers=40, n_heads=40, n_kv_heads=40, hidden_dim=13824,
                                       max_seq_len=4096)),                        # Llama-2-13B
}
PRESET_VOCAB = 512             # what a from-scratch preset gets from its trained tokenizer (load_model)


@dataclass
class PlanConfig:
    model: str = "llama-7b"           # a name in NAMED_MODELS or a from-scratch preset (MODEL_PRESETS)
    method: str = "qlora"             # one of METHODS; qlora = lora on an NF4 base
    rank: int = 16                    # adapter rank r
    bits: int | None = None           # frozen base of an adapter method: None (float), 4 or 8 (qlora: 4)
    batch: int = 1                    # sequences per micro-batch B
    seq: int = 512                    # tokens per sequence T
    target_modules: str = ""          # comma-separated; "" = the family's defaults; "all-linear"
    dtype: str = "float32"            # parameters (frozen float weights and what trains)
    compute_dtype: str = ""           # activations (autocast); "" = dtype
    grad_checkpointing: bool = False  # recompute each block in backward
    paged_adamw: bool = False         # AdamW moments in host memory (trainers.optim.PagedAdamW)
    foreach: bool = True              # step temporaries of torch's foreach AdamW (GPU); False: CPU loop
    device: str = "cuda"              # where the step runs, one of DEVICES; "cpu": LLaMA at head size <= 8
                                      # runs trainers/models/attention.py's kernel, which keeps less


@dataclass
class MemoryPlan:
    config: PlanConfig
    n_params: int                                          # true parameter count (quantized ones included)
    trainable: int                                         # trainable parameters
    weights: dict[str, int] = field(default_factory=dict)  # frozen and trained base weights by kind
    adapters: int = 0                                      # adapter parameters and masks
    gradients: int = 0
    optimizer: int = 0                                     # AdamW moments on the device
    optimizer_host: int = 0                                # ... in host memory (paged)
    activations: int = 0                                   # saved for backward, as configured
    activations_plain: int = 0                             # without checkpointing
    activations_checkpointed: int = 0                      # with checkpointing
    logits: int = 0
    log_probs: int = 0                                     # part of the activations
    head_grad: int = 0                                     # lm_head's weight gradient (if it trains)
    step_temp: int = 0
    phases: dict[str, int] = field(default_factory=dict)   # peak candidates (see the module docstring)

    @property
    def total(self) -> int:
        return max(self.phases.values())

    @property
    def peak_phase(self) -> str:
        return max(self.phases, key=self.phases.get)

    @property
    def adapter_training_bytes(self) -> int:
        """What the rank controller caps: adapter weights + their gradients + their moments."""
        if self.config.method == "full":
            return 0
        n = self.trainable
        w = dtype_bytes(self.config.dtype)
        return self.adapters + n * w + (2 * n * F32 if not self.config.paged_adamw else 0)

    def controller_cap(self, total_bytes: int) -> int:
        """`ControllerConfig.memory_cap_bytes` that keeps this step under `total_bytes`. Plan at
        the controller's r_max: the adapters' own activations grow with the rank."""
        if self.config.method == "full":
            raise ValueError("controller_cap: full fine-tuning has no adapters whose ranks a controller could cap")
        return adapter_cap_from_total(total_bytes, self.total - self.adapter_training_bytes)

    def __str__(self) -> str:
        c = self.config
        ckpt = "with" if c.grad_checkpointing else "without"
        other = self.activations_plain if c.grad_checkpointing else self.activations_checkpointed
        rows = [(f"weights {kind}", b) for kind, b in self.weights.items()]
        if c.method != "full":
            rows.append((f"adapters ({c.method}, r={c.rank})", self.adapters))
        rows += [("gradients", self.gradients),
                 ("optimizer states (AdamW m, v)" + (": in host memory" if c.paged_adamw else ""), self.optimizer),
                 (f"activations {ckpt} checkpointing", self.activations),
                 (f"activations {'without' if c.grad_checkpointing else 'with'} checkpointing", other),
                 ("logits", self.logits), (f"peak ({self.peak_phase})", self.total)]
        if self.optimizer_host:
            rows.append(("host memory (paged AdamW moments)", self.optimizer_host))
        width = max(len(name) for name, _ in rows) + 2
        rank = "" if c.method == "full" else f" r={c.rank},"
        head = (f"{c.model}, {c.method},{rank} batch {c.batch} x seq {c.seq}, params {c.dtype}, compute "
                f"{c.compute_dtype or c.dtype}: {self.n_params / 1e6:,.1f}M parameters, "
                f"{self.trainable / 1e6:,.3f}M trainable")
        return "\n".join([head] + [f"  {name:<{width}}{_gib(b)}" for name, b in rows])


def _gib(n: int) -> str:
    return f"{n / GiB:9.3f} GiB"


# ----------------------------------------------------------------------------- the model

def model_config(name: str, seq: int):
    """(family, config) for a named model or a preset, with a context of at least `seq`."""
    if name in NAMED_MODELS:
        family, config = NAMED_MODELS[name]
        context = config.block_size if family == "gpt2" else config.max_seq_len
        if seq > context:
            raise ValueError(f"plan: --seq {seq} is longer than {name}'s context of {context} tokens")
        return family, config
    if name in MODEL_PRESETS:
        family, overrides = MODEL_PRESETS[name]
        if family not in ("gpt2", "llama"):
            raise ValueError(f"plan: {name} is a {family} model; the planner covers causal LMs (GPT-2, LLaMA)")
        length = "block_size" if family == "gpt2" else "max_seq_len"
        cls = GPT2Config if family == "gpt2" else LlamaConfig
        return family, cls.tiny(**{**overrides, "vocab_size": PRESET_VOCAB, length: seq})
    known = list(NAMED_MODELS) + [n for n, (f, _) in MODEL_PRESETS.items() if f in ("gpt2", "llama")]
    raise ValueError(f"plan: unknown model {name!r}; known: {', '.join(known)}")


def meta_model(family: str, config) -> nn.Module:
    """The LM built on the meta device: real module tree and shapes, no storage."""
    with torch.device("meta"):
        return build_model(family, config)


def _check(cfg: PlanConfig) -> None:
    if cfg.method not in METHODS:
        raise ValueError(f"plan: method must be one of {METHODS}, got {cfg.method!r}")
    if cfg.bits not in (None, 4, 8) or (cfg.method == "full" and cfg.bits is not None):
        raise ValueError(f"plan: bits must be None, 4 or 8 (and None for full fine-tuning), got {cfg.bits!r}")
    if cfg.device not in DEVICES:
        raise ValueError(f"plan: device must be one of {DEVICES}, got {cfg.device!r}")
    if min(cfg.rank, cfg.batch, cfg.seq) < 1:
        raise ValueError(f"plan: rank, batch and seq must be >= 1, got {cfg.rank}, {cfg.batch}, {cfg.seq}")


# ----------------------------------------------------------------------------- the plan

def plan_memory(cfg: PlanConfig, model: nn.Module | None = None) -> MemoryPlan:
    """The memory plan of `cfg`. `model`: plan this GPT-2 or LLaMA LM (real or meta, no adapters
    yet) instead of the one `cfg.model` names."""
    _check(cfg)
    if model is None:
        family, config = model_config(cfg.model, cfg.seq)
        model = meta_model(family, config)
    else:
        config = getattr(model, "config", None)
        if not isinstance(config, (GPT2Config, LlamaConfig)) or not hasattr(model, "lm_head"):
            raise TypeError(f"plan_memory: expected a GPT-2 or LLaMA LM from trainers.models, got "
                            f"{type(model).__name__}")
        family = "gpt2" if isinstance(config, GPT2Config) else "llama"
    method = "lora" if cfg.method == "qlora" else cfg.method
    bits = 4 if cfg.method == "qlora" else cfg.bits
    w, a = dtype_bytes(cfg.dtype), dtype_bytes(cfg.compute_dtype or cfg.dtype)
    full = method == "full"

    targets: list[str] = []
    if not full:
        tm = cfg.target_modules or ",".join(DEFAULT_TARGETS[family])
        tm = tm if tm == "all-linear" else [t.strip() for t in tm.split(",") if t.strip()]
        targets = find_targets(model, LoraConfig(r=cfg.rank, target_modules=tm, method=method))
    quantized = plan_quantization(model, {n: bits for n in linear_layers(model)}) if bits else {}

    plan = MemoryPlan(cfg, 0, 0)
    seen: set[int] = set()
    largest = 0
    for name, module in model.named_modules():
        for pname, p in module.named_parameters(recurse=False):
            if id(p) in seen:
                continue                                    # tied (GPT-2's lm_head = wte)
            seen.add(id(p))
            plan.n_params += p.numel()
            if name in quantized and pname == "weight":
                kind = "nf4" if quantized[name] == 4 else "int8"
                out_f, in_f = p.shape
                plan.weights[kind] = plan.weights.get(kind, 0) + base_bytes(in_f, out_f, quantized[name])
                continue
            kind = f"{cfg.dtype} ({'trained' if full else 'frozen'})"
            plan.weights[kind] = plan.weights.get(kind, 0) + p.numel() * w
            if full:
                plan.trainable += p.numel()
                largest = max(largest, p.numel())
    for name in targets:
        out_f, in_f = model.get_submodule(name).weight.shape
        n = adapter_params(in_f, out_f, cfg.rank, method)
        plan.trainable += n
        largest = max(largest, out_f * cfg.rank, in_f * cfg.rank)
        masks = cfg.rank * (in_f + out_f) if method == "sparse" else (cfg.rank * F32 if method == "adalora" else 0)
        plan.adapters += n * w + masks

    parts = adamw_bytes(plan.trainable, cfg.dtype)             # torch's AdamW: moments in the params' dtype
    plan.gradients = parts["grads"]
    plan.optimizer_host = parts["moments"] if cfg.paged_adamw else 0
    plan.optimizer = 0 if cfg.paged_adamw else parts["moments"]
    plan.step_temp = (3 * min(largest, PAGED_CHUNK) * w if cfg.paged_adamw
                      else (plan.trainable if cfg.foreach else largest) * w)

    acts = activation_bytes(family, config, model, cfg, method, targets, quantized, a, w)
    plan.activations_plain, plan.activations_checkpointed, plan.log_probs = acts
    plan.activations = plan.activations_checkpointed if cfg.grad_checkpointing else plan.activations_plain
    N, V = cfg.batch * cfg.seq, config.vocab_size
    plan.logits = N * V * a
    plan.head_grad = model.lm_head.weight.numel() * w if full else 0
    base = sum(plan.weights.values()) + plan.adapters + plan.optimizer
    plan.phases = {
        "backward start": base + plan.activations + plan.logits + 2 * N * V * F32,
        "lm_head backward": base + plan.activations - plan.log_probs + 2 * plan.logits + plan.head_grad,
        "backward end": base + plan.gradients + plan.logits,
        "optimizer step": base + plan.gradients + plan.step_temp,
    }
    return plan



# ----------------------------------------------------------------------------- command line

def build_parser() -> argparse.ArgumentParser:
    presets = [n for n, (f, _) in MODEL_PRESETS.items() if f in ("gpt2", "llama")]
    parser = argparse.ArgumentParser(
        prog="python -m trainers plan", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Will it fit? Peak memory of one training step: weights (by dtype/bits), adapters, "
                    "gradients, optimizer states, activations (with and without checkpointing), total.",
        epilog=f"models:\n  named (meta device): {', '.join(NAMED_MODELS)}\n  presets: {', '.join(presets)}\n"
               f"methods: {', '.join(METHODS)}\n\nThe formulas are in the docstrings of trainers/plan.py and trainers/plan_activations.py.")
    for f in dataclasses.fields(PlanConfig):
        flag = "--" + f.name.replace("_", "-")
        if f.type in ("bool", bool):
            parser.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=f.default)
        elif f.name == "bits":
            parser.add_argument(flag, dest=f.name, type=int, choices=(4, 8), default=None)
        else:
            kind = {"int": int, "str": str}.get(str(f.type), str)
            parser.add_argument(flag, dest=f.name, type=kind, default=f.default, metavar=f.name.upper(),
                                choices={"method": METHODS, "device": DEVICES}.get(f.name),
                                help=f"(default {f.default!r})")
    parser.add_argument("--budget-gib", type=float, default=None,
                        help="also print the rank controller's memory_cap_bytes under this total (GiB)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    budget = args.budget_gib
    cfg = PlanConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(PlanConfig)})
    try:
        plan = plan_memory(cfg)
        print(plan)
        if budget is not None:
            print(f"  rank controller memory_cap_bytes under {budget} GiB: {plan.controller_cap(int(budget * GiB)):,}")
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
