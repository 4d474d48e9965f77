"""Model surgery for quantization: quantize_model, memory_report, requantize_merged.

quantize_model swaps nn.Linear layers, and transformers' `Conv1D` layers (Hugging Face
GPT-2's c_attn, c_proj, c_fc, weight stored (in, out)), for Linear4bit / Linear8bit in
place (recursive replace by dotted name + setattr on the parent).  Patterns match a
module's full dotted name exactly, as a dotted suffix ("c_attn" matches
"transformer.h.0.attn.c_attn"), or as a full-match regular expression — the same rules
as PEFT's target_modules.

What stays in float, as in QLoRA practice (the QLoRA code loads its base through
transformers' bitsandbytes integration, which replaces only Linear layers and leaves the
output layer out): embeddings (only nn.Linear / Conv1D layers are ever replaced), the
output heads named in HEAD_NAMES unless include_head=True (the logits are where rounding
errors land last and least averaged, and a task head such as a classifier must stay
float to be trained in full), and any layer whose weight is tied to another module.
quantize_model warns, naming what it left in float.
"""
from __future__ import annotations

import re
import warnings
from dataclasses import dataclass, field

import torch
import torch.nn as nn

from .layers import Linear4bit, Linear8bit, _FrozenQuantLinear, is_conv1d, linear_weight

# The output heads of the transformers (and trainers.models) task models: left in float unless
# include_head=True. DistilBERT's classification head is pre_classifier + classifier.
HEAD_NAMES = ("lm_head", "score", "classifier", "pre_classifier", "qa_outputs")
# quantize_model's method= names: NF4 (+ double quantization) is 4-bit, LLM.int8()'s row-wise int8 is 8-bit.
METHOD_BITS = {"nf4": 4, "int8": 8}


def name_matches(name: str, pattern: str) -> bool:
    """Exact name, dotted suffix, or full-match regex."""
    if name == pattern or name.endswith("." + pattern):
        return True
    try:
        return re.fullmatch(pattern, name) is not None
    except re.error:
        return False


def _check_bits(bits, where: str) -> None:
    if isinstance(bits, bool) or bits not in (4, 8):
        raise ValueError(f"{where}: bits must be 4 or 8, got {bits!r}")


def resolve_bits(bits, method: str | None, where: str = "quantize_model"):
    """The bit width(s) `bits` and `method` ask for together: method="nf4" is bits 4, "int8" is
    bits 8; neither gives 4 (NF4); both must agree (every value of a bits dict too)."""
    if method is None:
        return 4 if bits is None else bits
    if method not in METHOD_BITS:
        raise ValueError(f"{where}: method must be one of {sorted(METHOD_BITS)}, got {method!r}")
    implied = METHOD_BITS[method]
    if bits is None:
        return implied
    values = bits.items() if isinstance(bits, dict) else [(None, bits)]
    for pattern, b in values:
        if b != implied:
            where_b = f"bits[{pattern!r}]={b!r}" if pattern is not None else f"bits={b!r}"
            raise ValueError(f"{where}: {where_b} and method={method!r} disagree ({method} is {implied}-bit); "
                             f"give one of them")
    return bits


def is_head(name: str) -> bool:
    return name.rsplit(".", 1)[-1] in HEAD_NAMES


def _linear_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Every plain nn.Linear and every Conv1D (a quantized layer stores either as (out, in))."""
    return [(n, m) for n, m in model.named_modules() if type(m) is nn.Linear or is_conv1d(m)]


def _tied_weight_ids(model: nn.Module) -> set[int]:
    """Ids of Parameters reachable under more than one module (e.g. lm_head tied to wte)."""
    seen: dict[int, int] = {}
    for _, module in model.named_modules(remove_duplicate=False):
        for p in module.parameters(recurse=False):
            seen[id(p)] = seen.get(id(p), 0) + 1
    return {i for i, c in seen.items() if c > 1}


def replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def plan_quantization(model: nn.Module, bits: int | dict[str, int] = 4,
                      skip: list[str] | tuple[str, ...] = (), include_head: bool = False,
                      left_in_float: list[str] | None = None) -> dict[str, int]:
    """Which nn.Linear / Conv1D gets which bit width: {dotted name: 4 or 8}. Validates everything.
    Appends to `left_in_float` each layer the bits would pick but that stays float: a head
    (unless include_head) or a tied weight."""
    linears = _linear_layers(model)
    names = [n for n, _ in linears]
    if not linears:
        raise ValueError(f"quantize_model: {type(model).__name__} has no nn.Linear (or Conv1D) layers to quantize")
    if names[0] == "":
        raise ValueError(f"quantize_model: the model itself is one layer ({type(model).__name__}) and cannot be "
                         "replaced in place; use Linear4bit.from_linear(...) or Linear8bit.from_linear(...)")
    if isinstance(bits, dict):
        for pattern, b in bits.items():
            _check_bits(b, f"quantize_model bits[{pattern!r}]")
            if not any(name_matches(n, pattern) for n in names):
                raise ValueError(f"quantize_model: pattern {pattern!r} matches no nn.Linear (or Conv1D); "
                                 f"candidates: {names}")
    else:
        _check_bits(bits, "quantize_model")
    for pattern in skip:
        if not any(name_matches(n, pattern) for n in names):
            raise ValueError(f"quantize_model: skip pattern {pattern!r} matches no nn.Linear (or Conv1D); "
                             f"candidates: {names}")
    tied = _tied_weight_ids(model)
    plan = {}
    for name, linear in linears:
        if any(name_matches(name, p) for p in skip):
            continue
        if isinstance(bits, dict):
            # an exact name wins; otherwise the first matching pattern in dict order
            chosen = bits.get(name) or next((b for p, b in bits.items() if name_matches(name, p)), None)
            if chosen is None:
                continue
        else:
            chosen = bits
        if not include_head and is_head(name):
            if left_in_float is not None:
                left_in_float.append(f"{name} (output head; include_head=True quantizes it)")
            continue
        if id(linear.weight) in tied:
            if left_in_float is not None:
                left_in_float.append(f"{name} (its weight is shared with another module: tied)")
            continue
        plan[name] = chosen
    return plan


def quantize_model(model: nn.Module, bits: int | dict[str, int] | None = None,
                   skip: list[str] | tuple[str, ...] = (), compute_dtype: torch.dtype | None = None,
                   blocksize: int = 64, double_quant: bool = True, *, method: str | None = None,
                   include_head: bool = False) -> nn.Module:
    """Replace matching nn.Linear and Conv1D layers by Linear4bit/Linear8bit, in place; returns the model.

    bits: 4, 8, or {pattern: 4|8} for a mixed model (layers matching no pattern stay float).
    method: "nf4" (bits 4) or "int8" (bits 8), another way to say bits; given both, they
    must agree. Neither: NF4.
    skip: patterns never quantized.  The output heads (HEAD_NAMES: lm_head, a classifier, ...)
    stay float unless include_head=True; Linear layers with tied weights always do, and so do
    embeddings (only nn.Linear / Conv1D is replaced). A warning names the layers left in float.
    blocksize applies to NF4 (Linear8bit uses row-wise scales).
    """
    left: list[str] = []
    plan = plan_quantization(model, resolve_bits(bits, method), skip, include_head, left)
    apply_plan(model, plan, compute_dtype, blocksize, double_quant)
    warn_left_in_float(model, left)
    return model


def warn_left_in_float(model: nn.Module, left: list[str], where: str = "quantize_model") -> None:
    """The warning naming the layers plan_quantization left in float (and the embeddings)."""
    embeddings = [n for n, m in model.named_modules() if isinstance(m, nn.Embedding)]
    if left:
        note = f"; embeddings stay float too: {embeddings}" if embeddings else ""
        warnings.warn(f"{where}: left in float: {', '.join(left)}{note}")


def quantize_layer(linear: nn.Module, bits: int, *, compute_dtype: torch.dtype | None = None, blocksize: int = 64,
                   double_quant: bool = True, who: str = "quantize_layer") -> nn.Module:
    """A Linear4bit (NF4) or Linear8bit built from an nn.Linear / Conv1D; errors are prefixed with `who`.
    The one place both quantize_model and the streamed loader (quantization/stream.py) quantize a layer."""
    try:
        if bits == 4:
            return Linear4bit.from_linear(linear, compute_dtype=compute_dtype, blocksize=blocksize,
                                          double_quant=double_quant)
        return Linear8bit.from_linear(linear, compute_dtype=compute_dtype)
    except (ValueError, TypeError) as e:
        raise type(e)(f"{who}: {e}") from e


def apply_plan(model: nn.Module, plan: dict[str, int], compute_dtype: torch.dtype | None = None,
               blocksize: int = 64, double_quant: bool = True) -> None:
    """Swap each nn.Linear / Conv1D named in `plan` for its quantized version.  All layers are built
    before the first swap, so a bad weight (NaN/inf) leaves the model untouched."""
    built = {}
    for name, b in plan.items():
        linear = model.get_submodule(name)
        built[name] = quantize_layer(linear, b, compute_dtype=compute_dtype, blocksize=blocksize,
                                     double_quant=double_quant, who=f"quantize_model: layer {name!r}"
                                     ).to(linear.weight.device)
    for name, new in built.items():
        replace_module(model, name, new)


# ---------------------------------------------------------------------------------------------
# Memory accounting.


@dataclass
class LayerMemory:
    name: str
    kind: str           # "nf4", "int8", or "float32"/"bfloat16"/... for ordinary parameters
    params: int         # true parameter count (what the layer stands for)
    bytes: int          # bytes actually stored

    @property
    def bits_per_param(self) -> float:
        return 8 * self.bytes / max(self.params, 1)


@dataclass
class MemoryReport:
    layers: list[LayerMemory] = field(default_factory=list)

    @property
    def total_params(self) -> int:
        return sum(r.params for r in self.layers)

    @property
    def total_bytes(self) -> int:
        return sum(r.bytes for r in self.layers)

    def __str__(self) -> str:
        width = max([len(r.name) for r in self.layers] + [5])
        lines = [f"{'layer':<{width}}  {'kind':<8} {'params':>12} {'bytes':>12} {'bits/param':>10}"]
        for r in self.layers:
            lines.append(f"{r.name:<{width}}  {r.kind:<8} {r.params:>12,} {r.bytes:>12,} {r.bits_per_param:>10.3f}")
        fp32 = 4 * self.total_params
        lines.append(f"{'total':<{width}}  {'':<8} {self.total_params:>12,} {self.total_bytes:>12,} "
                     f"{8 * self.total_bytes / max(self.total_params, 1):>10.3f}")
        lines.append(f"(float32 would be {fp32:,} bytes: {fp32 / max(self.total_bytes, 1):.2f}x more)")
        return "\n".join(lines)


def memory_report(model: nn.Module) -> MemoryReport:
    """One row per quantized layer (true parameter count, stored bytes) and per module that
    owns ordinary parameters; shared parameters are counted once."""
    report, seen = MemoryReport(), set()
    for name, module in model.named_modules():
        name = name or "(root)"
        if isinstance(module, _FrozenQuantLinear):
            kind = "nf4" if isinstance(module, Linear4bit) else "int8"
            report.layers.append(LayerMemory(name, kind, module.true_param_count(), module.storage_bytes()))
            seen.update(id(p) for p in module.parameters(recurse=False))
            continue
        own = [p for p in module.parameters(recurse=False) if id(p) not in seen]
        if own:
            seen.update(id(p) for p in own)
            kind = str(own[0].dtype).replace("torch.", "")
            report.layers.append(LayerMemory(name, kind, sum(p.numel() for p in own),
                                             sum(p.numel() * p.element_size() for p in own)))
    return report


# ---------------------------------------------------------------------------------------------
# Merged adapters back into a quantized base.


@dataclass
class RequantError:
    name: str
    bits: int
    max_abs: float      # max |W_merged - dequant(quant(W_merged))|
    mean_abs: float     # mean of the same


@dataclass
class RequantReport:
    layers: list[RequantError] = field(default_factory=list)

    def __str__(self) -> str:
        width = max([len(r.name) for r in self.layers] + [5])
        lines = [f"{'layer':<{width}}  bits  {'max |ΔW|':>10}  {'mean |ΔW|':>10}"]
        lines += [f"{r.name:<{width}}  {r.bits:>4}  {r.max_abs:>10.3e}  {r.mean_abs:>10.3e}" for r in self.layers]
        return "\n".join(lines)


def requantize_merged(model: nn.Module, bits: int | dict[str, int] = 4, skip: list[str] | tuple[str, ...] = (),
                      compute_dtype: torch.dtype | None = None, blocksize: int = 64,
                      double_quant: bool = True, include_head: bool = False) -> RequantReport:
    """Quantize again a model whose adapters were merged into plain float layers (nn.Linear,
    or Conv1D for a Conv1D base: lora.merge_lora_weights does that), in place, and report
    the error this introduces per layer: the merged update is small, so re-quantizing can
    round part of it away. Heads and tied weights stay float, as in quantize_model."""
    plan = plan_quantization(model, bits, skip, include_head)
    reference = {name: linear_weight(model.get_submodule(name)).float().clone() for name in plan}  # (out, in)
    apply_plan(model, plan, compute_dtype, blocksize, double_quant)
    report = RequantReport()
    for name, b in plan.items():
        err = (model.get_submodule(name).dequantize(torch.float32) - reference[name]).abs()
        report.layers.append(RequantError(name, b, float(err.max()), float(err.mean())))
    return report
