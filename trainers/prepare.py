"""Turn a model into what a configuration trains: sensitivity, quantized base, adapters, allocator.

    model, allocator = prepare(model, CONFIGS["Joint-3"], calibration, budget_rank=8, steps=400)

In this order, because each step needs the one before:
  1. sensitivity (Hutchinson Hessian traces, on the full-precision model) when the ranks
     (SADRA) or the bit widths ("mixed") follow it;
  2. the base: NF4 / int8 / mixed 8/4 bits / a fixed {pattern: bits} (quantization.quantize_model);
  3. the adapters (lora.add_lora_to_model) at the configuration's ranks; a task head trains
     in full next to them (PEFT's modules_to_save);
  4. the allocator that changes ranks while training (AdaLoRA, DRaFT-Q's controller,
     Sparse LoRA's pruning; allocation/), paced by the run's length.

`used(model, allocator)` says afterwards what was chosen (layers, ranks, alphas, bits,
the allocator's settings): a run writes it into its config.json.
"""
from __future__ import annotations

import itertools
import re
from dataclasses import asdict, replace
from typing import Callable, Iterator

import torch.nn as nn

from allocation.adalora import AdaLoRAAllocator, AdaLoRAConfig
from allocation.allocator import NullAllocator
from allocation.budget import adapter_params, training_bytes
from allocation.controller import ControllerConfig, CurvatureRankAllocator
from allocation.hutchinson import hessian_traces, module_shapes, sensitivity_ranks
from allocation.precision import choose_precision, total_base_bytes
from allocation.sparsity import SparsityAllocator
from lora.config import IA3Config
from lora.config import LoraConfig
from lora.model import add_ia3_to_model, add_lora_to_model
from lora.targets import adapter_layers, find_targets
from quantization.layers import Linear4bit, Linear8bit
from quantization.model import HEAD_NAMES, quantize_model   # HEAD_NAMES: the task heads, never quantized or adapted
from trainers import models
from trainers.configs import ExperimentConfig


def model_family(model: nn.Module) -> str | None:
    m = models
    for family, classes in (("gpt2", (m.GPT2LMHeadModel, m.GPT2ForSequenceClassification, m.GPT2Model)),
                            ("distilbert", (m.DistilBertForSequenceClassification,
                                            m.DistilBertForQuestionAnswering, m.DistilBertModel)),
                            ("llama", (m.LlamaForCausalLM, m.LlamaModel))):
        if isinstance(model, classes):
            return family
    return None


# PEFT's defaults for these families: the attention projections the LoRA paper adapts (Wq, Wv).
DEFAULT_TARGETS = {"gpt2": ("c_attn",), "distilbert": ("q_lin", "v_lin"), "llama": ("q_proj", "v_proj")}


# PEFT's IA3 defaults (target_modules, feedforward_modules): keys, values and the MLP's output projection.
IA3_TARGETS = {"gpt2": (("c_attn", "mlp.c_proj"), ("mlp.c_proj",)),
               "distilbert": (("k_lin", "v_lin", "lin2"), ("lin2",)),
               "llama": (("k_proj", "v_proj", "down_proj"), ("down_proj",))}


def default_targets(model: nn.Module) -> tuple[str, ...]:
    family = model_family(model)
    if family is None:
        raise ValueError(f"target_modules: {type(model).__name__} is not a GPT-2, DistilBERT or LLaMA model "
                         f"from trainers.models, so give target_modules explicitly")
    return DEFAULT_TARGETS[family]


def linear_layers(model: nn.Module, skip: tuple[str, ...] = HEAD_NAMES) -> list[str]:
    """Names of the nn.Linear layers outside the task heads: what quantization replaces."""
    return [name for name, m in model.named_modules()
            if isinstance(m, nn.Linear) and name.split(".")[-1] not in skip]


def task_heads(model: nn.Module) -> tuple[str, ...]:
    """Names of the task-specific heads (not a tied LM head): trained in full next to the adapters."""
    return tuple(name for name, m in model.named_modules()
                 if isinstance(m, nn.Linear) and name.split(".")[-1] in HEAD_NAMES
                 and name.split(".")[-1] != "lm_head")


def _calibration_batches(calibration, n: int, who: str) -> list[dict]:
    if calibration is None:
        raise ValueError(f"{who} needs calibration batches (calibration=lambda: iterator of batch dicts)")
    batches = list(itertools.islice(iter(calibration()), n))
    if not batches:
        raise ValueError(f"{who}: the calibration iterator yielded no batch")
    return batches


def _depth_ramp(names: list[str], shapes: dict, budget_rank: int, exp: ExperimentConfig) -> dict[str, int]:
    """The 'manual' pattern used when none is given: rank grows with depth (later layers adapt
    more, a common observation, e.g. in the AdaLoRA paper's rank maps), at the uniform budget."""
    return sensitivity_ranks({n: float(i + 1) for i, n in enumerate(names)}, shapes,
                             r_min=exp.r_min or max(1, budget_rank // 4), r_max=exp.r_max or budget_rank * 4,
                             uniform_rank=budget_rank)


def prepare(model: nn.Module, exp: ExperimentConfig, calibration: Callable[[], Iterator[dict]] | None = None,
            budget_rank: int = 8, *, steps: int | None = None, n_calibration: int = 4, max_probes: int = 16):
    """Quantize, add adapters, and set up the allocator for `exp`; returns (model, allocator).

    calibration: a callable giving an iterator of batches, needed by the Hutchinson
    sensitivity (SADRA ranks, mixed precision): `n_calibration` batches, at most
    `max_probes` Rademacher probes. steps: the run's length (paces the adaptive
    allocators). The model is changed in place."""
    if exp.method == "full":
        for p in model.parameters():
            p.requires_grad_(True)
        return model, NullAllocator(None)

    if exp.method == "ia3":   # PEFT's per-family IA3 targets; the task head trains in full, as below
        family = model_family(model)
        targets, feedforward = IA3_TARGETS.get(family, (exp.target_modules, ()))
        add_ia3_to_model(model, IA3Config(target_modules=exp.target_modules or targets,
                                          feedforward_modules=feedforward, modules_to_save=task_heads(model)))
        return model, NullAllocator(None)             # no ranks to allocate

    # a task head made for this task (classifier, span head) trains in full, as PEFT's modules_to_save
    # does (a frozen random head would leave the adapters nothing to fit), so it gets no adapter
    heads = task_heads(model)
    targets = exp.target_modules or default_targets(model)
    probe = LoraConfig(r=exp.r, lora_alpha=exp.lora_alpha, target_modules=targets, method=exp.method,
                       modules_to_save=heads)
    names = find_targets(model, probe)                 # raises, listing candidates, when nothing matches
    shapes = module_shapes(model, names)

    # 1. sensitivity, on the full-precision model (before quantizing)
    rank_pattern: dict[str, int] = {}
    quant_names = linear_layers(model)
    traces = None
    if exp.allocation == "hutchinson" or exp.quant == "mixed":
        batches = _calibration_batches(calibration, n_calibration, f"{exp.name} (Hutchinson sensitivity)")
        probed = sorted(set(names) | (set(quant_names) if exp.quant == "mixed" else set()),
                        key=list(dict(model.named_modules())).index)
        traces = hessian_traces(model, batches, probed, min_samples=min(4, max_probes), max_samples=max_probes)
    if exp.allocation == "hutchinson":
        rank_pattern = sensitivity_ranks({n: traces[n] for n in names}, shapes, r_min=exp.r_min or 2,
                                         r_max=exp.r_max or 4 * budget_rank, uniform_rank=budget_rank)
    elif exp.allocation == "manual":
        rank_pattern = dict(exp.rank_pattern) if exp.rank_pattern else _depth_ramp(names, shapes, budget_rank, exp)

    # 2. quantize the base
    if exp.quant is not None:
        if exp.quant == "mixed":
            bits = _mixed_bits(model, quant_names, traces, exp.mixed_high_fraction)
        elif isinstance(exp.quant, dict):
            bits = dict(exp.quant)                     # quantize_model: exact name, dotted suffix or regex
        else:
            bits = {name: exp.quant for name in quant_names}
        quantize_model(model, bits=bits)

    # 3. adapters (and the task heads, trained in full)
    config = replace(probe, rank_pattern=rank_pattern, lora_dropout=exp.lora_dropout)
    if exp.alpha_per_rank is not None:                 # alpha = k r per layer: the same alpha / r everywhere
        config = replace(config, lora_alpha=exp.alpha_per_rank * exp.r,
                         alpha_pattern={re.escape(n): exp.alpha_per_rank * config.rank_for(n) for n in names})
    add_lora_to_model(model, config)

    # 4. allocator
    if exp.allocation == "curvature":
        return model, _curvature_allocator(model, exp, shapes, budget_rank, steps)
    if exp.allocation == "adalora":
        return model, _adalora_allocator(model, exp, budget_rank, steps)
    if exp.method == "sparse":
        return model, SparsityAllocator(model, steps or 400, exp.sparsity, exp.l1)
    return model, NullAllocator(model)


def _mixed_bits(model: nn.Module, names: list[str], traces: dict, high_fraction: float) -> dict[str, int]:
    """8 bits for the most sensitive layers per extra byte, 4 for the rest (allocation.precision),
    under a base-weight budget of all-4-bit + `high_fraction` of what all-8-bit would add."""
    shapes = module_shapes(model, names)
    low = total_base_bytes({n: 4 for n in names}, shapes)
    high = total_base_bytes({n: 8 for n in names}, shapes)
    scores = {n: abs(traces[n].trace) for n in names}
    return choose_precision(scores, shapes, int(low + high_fraction * (high - low)))


def _curvature_allocator(model: nn.Module, exp: ExperimentConfig, shapes: dict, budget_rank: int,
                         steps: int | None) -> CurvatureRankAllocator:
    """DRaFT-Q's controller. Defaults: ten decisions over the run, each growing a third of the
    layers by 2 under a cap of the training bytes of uniform `budget_rank` (from a start below the
    cap it fills first, then rank flows to the layers that score highest); alpha follows the rank
    when the config sets alpha_per_rank."""
    cap = exp.memory_cap_bytes or sum(training_bytes(adapter_params(i, o, budget_rank, exp.method))
                                      for i, o in shapes.values())
    interval = exp.interval or max(1, (steps or 400) // 10)
    cfg = ControllerConfig(interval=interval, warmup=interval, r_min=exp.r_min or 2,
                           r_max=exp.r_max or 4 * budget_rank, n_change=exp.n_change or max(1, len(shapes) // 3),
                           memory_cap_bytes=cap, keep_scaling=exp.alpha_per_rank is not None, signal=exp.signal)
    return CurvatureRankAllocator(model, cfg)


def _adalora_allocator(model: nn.Module, exp: ExperimentConfig, budget_rank: int,
                       steps: int | None) -> AdaLoRAAllocator:
    """AdaLoRA's schedule; unless given, paced by the run: warm-up 10 % of the steps, final phase 20 %,
    a masking every 1 %, ending at an average of the budget rank (at most the start rank)."""
    total = steps or 400
    cfg = AdaLoRAConfig(init_r=exp.r, target_r=exp.target_r or min(exp.r, budget_rank),
                        tinit=total // 10 if exp.tinit is None else exp.tinit,
                        tfinal=total // 5 if exp.tfinal is None else exp.tfinal,
                        deltaT=exp.delta_t or max(1, total // 100), orth_reg_weight=exp.orth_reg_weight)
    return AdaLoRAAllocator(model, cfg, total_steps=total)


def used(model: nn.Module, allocator) -> dict:
    """What prepare chose: {adapter layer: {rank, alpha}}, {quantized layer: bits}, and the
    allocator's type and settings (for the run's config.json)."""
    adapters = {name: {"type": type(layer).__name__, "rank": getattr(layer, "rank", None),
                       "alpha": getattr(layer, "alpha", None)} for name, layer in adapter_layers(model)}
    config = getattr(allocator, "config", None)
    return {"adapters": adapters, "bits": base_bits(model),
            "allocator": {"type": type(allocator).__name__,
                          **({"config": asdict(config)} if config is not None else {})}}


def base_bits(model: nn.Module) -> dict[str, int]:
    """{layer name: 4 or 8} of every quantized base layer (in or under an adapter)."""
    out = {}
    for name, module in model.named_modules():
        if isinstance(module, (Linear4bit, Linear8bit)):
            out[name.removesuffix(".base_layer")] = 4 if isinstance(module, Linear4bit) else 8
    return out
