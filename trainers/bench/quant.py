"""NF4 and int8: (de)quantization throughput and the frozen quantized Linear layers.

Throughput ratios are "how many times as fast": t_reference / t_ours, so higher is better.
  * dequantize_nf4 of a 3072 x 768 weight vs `clone()` of the float32 tensor of the
    output's size (the memory traffic any dequantizer must at least do: write n floats);
  * vs bitsandbytes' dequantize_4bit (same NF4 + double quantization, block 64) on the
    same device, when bitsandbytes is installed;
  * quantize_nf4 vs the same copy, and vs bitsandbytes' quantize_4bit;
  * the compiled dequantization (quantization/compiled.py: torch.compile, one fused pass)
    vs the same copy, vs the eager dequantize_nf4 and vs bitsandbytes, timed in the same
    rounds (its compile happens in the untimed cold call; skipped, with the reason, where
    torch.compile cannot run).
Layer ratios are time ratios (lower is better): Linear4bit / Linear8bit forward+backward
(input gradient only: the weight is frozen) vs a frozen float32 nn.Linear 768 -> 3072,
batch 16 x 128 (quick: 8 x 128), and bitsandbytes' Linear4bit the same way.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from quantization import CompileError, Linear4bit, Linear8bit, compiled_dequantize_nf4, dequantize_nf4, quantize_nf4
from trainers.bench.layers import fwd_bwd
from trainers.bench.timing import Settings, compare_row, skip_row, time_interleaved

SECTION = "quant"
IN, OUT = 768, 3072
ROWS = ("NF4 dequant throughput / copy", "NF4 dequant speed / bitsandbytes",
        "NF4 quantize throughput / copy", "NF4 quantize speed / bitsandbytes",
        "NF4 compiled dequant throughput / copy", "NF4 compiled dequant speed / eager",
        "NF4 compiled dequant speed / bitsandbytes",
        "Linear4bit fwd+bwd / fp32 Linear", "Linear8bit fwd+bwd / fp32 Linear",
        "Linear4bit fwd+bwd / bitsandbytes Linear4bit", "bitsandbytes Linear4bit fwd+bwd / fp32 Linear")


def _bnb():
    try:
        import bitsandbytes
        import bitsandbytes.functional  # noqa: F401
        return bitsandbytes
    except Exception:
        return None


def _bnb_linear4bit(bnb, linear: nn.Linear) -> nn.Module | None:
    """bitsandbytes' NF4 Linear4bit holding `linear`'s weight (double quant, float32 compute)."""
    layer = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=linear.bias is not None,
                              compute_dtype=torch.float32, compress_statistics=True, quant_type="nf4")
    layer.weight = bnb.nn.Params4bit(linear.weight.detach().cpu().clone(), requires_grad=False,
                                     quant_type="nf4", compress_statistics=True)
    if linear.bias is not None:
        layer.bias = nn.Parameter(linear.bias.detach().cpu().clone(), requires_grad=False)
    return layer.to(linear.weight.device)          # quantizes on the move (CPU path: already packed)


def run(settings: Settings) -> list:
    device = settings.device
    torch.manual_seed(0)
    bnb = _bnb()
    no_bnb = "bitsandbytes not installed"
    rows = []

    # --- (de)quantization throughput ------------------------------------------------------
    W = torch.randn(OUT, IN, device=device) * 0.02
    q = quantize_nf4(W)                                     # double quantization, block 64
    fns = {"copy": W.clone, "dequant": lambda: dequantize_nf4(q), "quant": lambda: quantize_nf4(W)}
    try:
        compiled_dequantize_nf4(q)                          # compiles here, or says why it cannot
        fns["compiled"] = lambda: compiled_dequantize_nf4(q)
        no_compile = None
    except CompileError as error:
        no_compile = str(error)
    if bnb is not None:
        import bitsandbytes.functional as BF
        bq, state = BF.quantize_4bit(W, blocksize=64, compress_statistics=True, quant_type="nf4")
        fns["bnb_dequant"] = lambda: BF.dequantize_4bit(bq, state)
        fns["bnb_quant"] = lambda: BF.quantize_4bit(W, blocksize=64, compress_statistics=True, quant_type="nf4")
    t = time_interleaved(fns, settings, repeats=3 * settings.repeats)     # milliseconds each: more rounds
    size = f"{OUT}x{IN} fp32, block 64, double quant"
    rows.append(compare_row(SECTION, "NF4 dequant throughput / copy", t["copy"], t["dequant"], ">= 0.5", size))
    if bnb is not None:
        rows.append(compare_row(SECTION, "NF4 dequant speed / bitsandbytes", t["bnb_dequant"], t["dequant"],
                                "> 1.0", f"bitsandbytes {bnb.__version__} on {device.type}"))
    else:
        rows.append(skip_row(SECTION, "NF4 dequant speed / bitsandbytes", no_bnb, "> 1.0"))
    rows.append(compare_row(SECTION, "NF4 quantize throughput / copy", t["copy"], t["quant"], None, size))
    if bnb is not None:
        rows.append(compare_row(SECTION, "NF4 quantize speed / bitsandbytes", t["bnb_quant"], t["quant"], None,
                                f"bitsandbytes {bnb.__version__} on {device.type}"))
    else:
        rows.append(skip_row(SECTION, "NF4 quantize speed / bitsandbytes", no_bnb))
    compiled_rows = (("NF4 compiled dequant throughput / copy", "copy", size),
                     ("NF4 compiled dequant speed / eager", "dequant", size),
                     ("NF4 compiled dequant speed / bitsandbytes", "bnb_dequant",
                      f"bitsandbytes {getattr(bnb, '__version__', '')} on {device.type}"))
    for what, reference, note in compiled_rows:
        if no_compile is not None or reference not in t:
            rows.append(skip_row(SECTION, what, no_compile or no_bnb))
        else:
            rows.append(compare_row(SECTION, what, t[reference], t["compiled"], None, note))

    # --- frozen quantized layers, forward + backward -------------------------------------
    batch = 8 if settings.quick else 16
    linear = nn.Linear(IN, OUT).to(device)
    with torch.no_grad():
        linear.weight.normal_(0, 0.02)
    four = Linear4bit.from_linear(linear).to(device)
    eight = Linear8bit.from_linear(linear).to(device)
    linear.requires_grad_(False)
    x = torch.randn(batch, 128, IN, device=device, requires_grad=True)
    g = torch.randn(batch, 128, OUT, device=device)
    fns = {"fp32": fwd_bwd(linear, x, g), "nf4": fwd_bwd(four, x, g), "int8": fwd_bwd(eight, x, g)}
    if bnb is not None:
        fns["bnb_nf4"] = fwd_bwd(_bnb_linear4bit(bnb, linear), x, g)
    t = time_interleaved(fns, settings)
    shape = f"{IN}->{OUT}, batch {batch}x128"
    rows.append(compare_row(SECTION, "Linear4bit fwd+bwd / fp32 Linear", t["nf4"], t["fp32"], "<= 1.15", shape))
    rows.append(compare_row(SECTION, "Linear8bit fwd+bwd / fp32 Linear", t["int8"], t["fp32"], None, shape))
    if bnb is not None:
        rows.append(compare_row(SECTION, "Linear4bit fwd+bwd / bitsandbytes Linear4bit", t["nf4"], t["bnb_nf4"],
                                None, shape))
        rows.append(compare_row(SECTION, "bitsandbytes Linear4bit fwd+bwd / fp32 Linear", t["bnb_nf4"], t["fp32"],
                                None, shape))
    else:
        rows.append(skip_row(SECTION, "Linear4bit fwd+bwd / bitsandbytes Linear4bit", no_bnb))
        rows.append(skip_row(SECTION, "bitsandbytes Linear4bit fwd+bwd / fp32 Linear", no_bnb))
    return rows
