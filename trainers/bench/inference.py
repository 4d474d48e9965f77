"""Inference: forward-only latency (torch.no_grad) of GPT-2 with adapters in different states.

Model: GPT-2 width 768, 12 heads, 4 layers, vocab 50257, T = 64 (quick: 2 layers,
vocab 4096); batch 1 and batch 16. Adapters: r = 8 LoRA on every Linear of the
blocks (c_attn, c_proj, c_fc), B filled with small random values. Variants, all
from the same random init, timed interleaved per batch size:
    base       the frozen float32 model, no adapter
    unmerged   LoRA layers computing base(x) + s B A x
    merged     the same after merge() (weights W0 + s B A, adapters idle)
    sparse     Sparse LoRA after structured pruning to rank 4 (prune_ranks), unmerged
    nf4        every block Linear in NF4 (quantize_model), no adapter
    qlora      NF4 base + unmerged LoRA
"""
from __future__ import annotations

import warnings

import torch

from lora import LoraConfig, SparseLoRALinear, adapter_layers, add_lora_to_model
from quantization import quantize_model
from trainers.bench import workloads as W
from trainers.bench.layers import fill_zero_factors
from trainers.bench.timing import Settings, compare_row, time_interleaved
from trainers.models import GPT2LMHeadModel

SECTION = "inference"
TARGETS = ("c_attn", "c_proj", "c_fc")
BATCHES = (1, 16)
PAIRS = (("unmerged", "merged", "LoRA unmerged / merged"),
         ("merged", "base", "LoRA merged / no adapter"),
         ("sparse", "unmerged", "structured-sparse (r 8->4) / dense LoRA, unmerged"),
         ("nf4", "base", "NF4 base / fp32 base"),
         ("qlora", "unmerged", "QLoRA / LoRA, unmerged"))
ROWS = tuple(f"{what}, batch {b}" for b in BATCHES for _, _, what in PAIRS)


def _model(kind: str, config, device):
    torch.manual_seed(0)
    model = GPT2LMHeadModel(config)
    if kind in ("nf4", "qlora"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")          # the tied LM head stays float
            quantize_model(model, bits=4)
    if kind in ("unmerged", "merged", "qlora", "sparse"):
        method = "sparse" if kind == "sparse" else "lora"
        add_lora_to_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=TARGETS, method=method))
        for _, layer in adapter_layers(model):
            fill_zero_factors(layer)
            if isinstance(layer, SparseLoRALinear):
                layer.prune_ranks(4)
            if kind == "merged":
                layer.merge()
    return model.to(device).eval().requires_grad_(False)


def run(settings: Settings) -> list:
    device = settings.device
    config, _ = W.gpt2_bench_config(settings.quick)
    config = W.with_overrides(config, n_layer=2 if settings.quick else 4)
    seq = 64
    note = ("quick: " if settings.quick else "") + f"GPT-2 width 768, {config.n_layer} layers, " \
        f"vocab {config.vocab_size}, T={seq}"
    kinds = ("base", "unmerged", "merged", "sparse", "nf4", "qlora")
    models = {k: _model(k, config, device) for k in kinds}
    rows = []
    for batch in BATCHES:
        idx = W.token_batch(config.vocab_size, batch, seq, device)

        def forward(model):
            def go():
                with torch.no_grad():
                    return model(idx)
            return go
        t = time_interleaved({k: forward(m) for k, m in models.items()}, settings)
        for a, b, what in PAIRS:
            rows.append(compare_row(SECTION, f"{what}, batch {batch}", t[a], t[b], None,
                                    f"{note}; {b} {t[b].median * 1e3:.1f} ms"))
    return rows
