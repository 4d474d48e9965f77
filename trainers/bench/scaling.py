"""Scaling: how the LoRA layer step and NF4 dequantization grow with width d and with rank r.

All sizes of one sweep are timed interleaved in the same rounds; the figure is the
least-squares slope p of log(time) against log(size), i.e. time ~ size^p.
  * LoRALinear d -> d forward+backward, r = 8, N tokens fixed (16 x 128; quick: 4 x 128),
    d = 256, 512, 1024, 2048: the matmuls cost N d^2, so p should be near 2
    (less where small sizes are dominated by fixed overheads).
  * The same at d = 768 for r = 1, 2, 4, ..., 64: the base matmul does not depend on r,
    so the whole step should be nearly flat (p near 0); the adapter's own extra time
    (LoRA minus the frozen base, timed alongside) should grow at most linearly (p <= 1;
    a small difference of two noisy times, so read it with its medians in the JSON).
  * dequantize_nf4 of a d x d weight, d = 256 .. 2048: n = d^2 elements, p near 2.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from lora import LoRALinear
from quantization import dequantize_nf4, quantize_nf4
from trainers.bench.layers import fill_zero_factors, fwd_bwd
from trainers.bench.timing import Settings, Timing, fit_loglog, make_row, time_interleaved

SECTION = "scaling"
WIDTHS = (256, 512, 1024, 2048)
RANKS = (1, 2, 4, 8, 16, 32, 64)
ROWS = ("LoRA step time ~ d^p (r=8)", "LoRA step time ~ r^p (d=768)", "LoRA extra time over base ~ r^p (d=768)",
        "NF4 dequant time ~ d^p (d x d)")


def _lora(d: int, r: int, device) -> LoRALinear:
    layer = LoRALinear(nn.Linear(d, d).to(device), rank=r, alpha=16)
    fill_zero_factors(layer)
    return layer


def _row(what: str, sizes, timings: list[Timing], target: str | None, note: str):
    medians = [t.median for t in timings]
    p = fit_loglog([float(s) for s in sizes], medians)
    return make_row(SECTION, what, p, target, note, sizes=list(sizes), seconds=medians)


def run(settings: Settings) -> list:
    device = settings.device
    tokens = (4 if settings.quick else 16) * 128
    rows = []
    gen = torch.Generator().manual_seed(0)

    fns = {}
    for d in WIDTHS:
        x = torch.randn(tokens, d, generator=gen).to(device).requires_grad_(True)
        fns[f"d{d}"] = fwd_bwd(_lora(d, 8, device), x, torch.randn(tokens, d, generator=gen).to(device))
    t = time_interleaved(fns, settings)
    rows.append(_row("LoRA step time ~ d^p (r=8)", WIDTHS, [t[f"d{d}"] for d in WIDTHS], None,
                     f"N={tokens} tokens, d={WIDTHS[0]}..{WIDTHS[-1]}; N d^2 flops -> 2"))

    d = 768
    x = torch.randn(tokens, d, generator=gen).to(device).requires_grad_(True)
    g = torch.randn(tokens, d, generator=gen).to(device)
    base = nn.Linear(d, d).to(device).requires_grad_(False)
    fns = {"base": fwd_bwd(base, x, g)}
    for r in RANKS:
        fns[f"r{r}"] = fwd_bwd(_lora(d, r, device), x, g)
    t = time_interleaved(fns, settings)
    lora_t = [t[f"r{r}"] for r in RANKS]
    rows.append(_row("LoRA step time ~ r^p (d=768)", RANKS, lora_t, None,
                     f"N={tokens}, r={RANKS[0]}..{RANKS[-1]}; base cost is r-free -> ~0"))
    extra = [Timing(f"r{r}", [max(a - b, 1e-7) for a, b in zip(t[f"r{r}"].times, t["base"].times)], 1)
             for r in RANKS]
    rows.append(_row("LoRA extra time over base ~ r^p (d=768)", RANKS, extra, None,
                     "adapter's own cost (LoRA - frozen base, same rounds); at most linear in r"))

    fns = {}
    for d in WIDTHS:
        q = quantize_nf4(torch.randn(d, d, generator=gen).to(device))
        fns[f"d{d}"] = (lambda q=q: dequantize_nf4(q))
    t = time_interleaved(fns, settings)
    rows.append(_row("NF4 dequant time ~ d^p (d x d)", WIDTHS, [t[f"d{d}"] for d in WIDTHS], None,
                     "n = d^2 elements -> 2"))
    return rows
