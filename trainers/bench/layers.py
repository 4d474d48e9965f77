"""Adapter layer overhead: forward + backward of each adapter kind against its frozen base alone.

Shape: 768 -> 768, r = 8, batch 16 x 128 (quick: 8 x 128), float32. The base is
timed with input gradients (x.requires_grad), as it sits inside a network being
fine-tuned; each adapter computes the input gradient and its own parameter
gradients. B is filled with small random values so no path sees an all-zero
update. PEFT's layer of the same kind (LoRA, DoRA, HiRA, AdaLoRA's SVDLinear)
is timed in the same rounds when peft is installed; Sparse LoRA has no PEFT twin.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from lora import DoRALinear, HiRALinear, LoRALinear, SparseLoRALinear, SVDLoRALinear
from trainers.bench.timing import Settings, compare_row, ratio, skip_row, time_interleaved

SECTION = "layers"
D, RANK = 768, 8
KINDS = {"lora": LoRALinear, "sparse": SparseLoRALinear, "hira": HiRALinear, "dora": DoRALinear,
         "svd": SVDLoRALinear}
NAMES = {"lora": "LoRA", "sparse": "Sparse LoRA", "hira": "HiRA", "dora": "DoRA", "svd": "SVD (AdaLoRA)"}
TARGETS = {"lora": "<= 1.10"}
ROWS = tuple(f"{NAMES[k]} fwd+bwd / base" for k in KINDS) + \
    tuple(f"{NAMES[k]} fwd+bwd / PEFT {NAMES[k]}" for k in KINDS)


def _peft_layer(kind: str, base: nn.Linear) -> nn.Module | None:
    """PEFT's layer of the same kind around a copy of `base`, or None if peft has none / is absent."""
    try:
        import peft
    except Exception:
        return None

    class Holder(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = nn.Linear(D, D)

    holder = Holder().to(base.weight.device)
    holder.proj.load_state_dict(base.state_dict())
    if kind == "lora":
        cfg = peft.LoraConfig(r=RANK, lora_alpha=16, target_modules=["proj"])
    elif kind == "dora":
        cfg = peft.LoraConfig(r=RANK, lora_alpha=16, target_modules=["proj"], use_dora=True)
    elif kind == "hira":
        cfg = peft.HiraConfig(r=RANK, target_modules=["proj"])
    elif kind == "svd":
        cfg = peft.AdaLoraConfig(init_r=RANK, target_r=RANK, lora_alpha=16, target_modules=["proj"],
                                 total_step=1000)
    else:
        return None
    return peft.get_peft_model(holder, cfg).base_model.model.proj


def fill_zero_factors(layer: nn.Module) -> None:
    """Small random values in every zero-initialised trainable factor (B, or AdaLoRA's E)."""
    with torch.no_grad():
        for name, p in layer.named_parameters():
            if p.requires_grad and not p.any():
                p.normal_(0, 0.01)


def fwd_bwd(layer: nn.Module, x: torch.Tensor, g: torch.Tensor):
    """Closure: y = layer(x); y.backward(g); clear grads (x's and the layer's)."""
    params = [p for p in layer.parameters() if p.requires_grad]

    def run():
        layer(x).backward(g)
        x.grad = None
        for p in params:
            p.grad = None
    return run


def run(settings: Settings) -> list:
    device = settings.device
    batch = 8 if settings.quick else 16
    torch.manual_seed(0)
    base = nn.Linear(D, D).to(device).requires_grad_(False)
    x = torch.randn(batch, 128, D, device=device, requires_grad=True)
    g = torch.randn(batch, 128, D, device=device)
    # One interleaved group per kind (base, ours, PEFT's): paired samples stay close in time.
    # A layer call is cheap, so these groups get three times the rounds.
    t, theirs = {}, set()
    for kind, cls in KINDS.items():
        base_copy = nn.Linear(D, D).to(device)
        base_copy.load_state_dict(base.state_dict())
        layer = cls(base_copy, rank=RANK, alpha=16)
        fill_zero_factors(layer)
        fns = {"base": fwd_bwd(base, x, g), kind: fwd_bwd(layer, x, g)}
        ref = _peft_layer(kind, base)
        if ref is not None:
            fill_zero_factors(ref)
            theirs.add(kind)
            fns[f"peft_{kind}"] = fwd_bwd(ref, x, g)
        group = time_interleaved(fns, settings, repeats=3 * settings.repeats)
        t.update({k: v for k, v in group.items() if k != "base"})
        t[f"base_{kind}"] = group["base"]
    shape = f"{D}->{D}, r={RANK}, batch {batch}x128"
    rows = []
    for kind in KINDS:
        rows.append(compare_row(SECTION, f"{NAMES[kind]} fwd+bwd / base", t[kind], t[f"base_{kind}"],
                                TARGETS.get(kind), shape))
    for kind in KINDS:
        what = f"{NAMES[kind]} fwd+bwd / PEFT {NAMES[kind]}"
        if kind in theirs:
            rows.append(compare_row(SECTION, what, t[kind], t[f"peft_{kind}"], None,
                                    f"PEFT {NAMES[kind]} / base = "
                                    f"{ratio(t[f'peft_{kind}'], t[f'base_{kind}']):.2f}"))
        else:
            why = "peft not installed" if "lora" not in theirs else "no PEFT counterpart"
            rows.append(skip_row(SECTION, what, why))
    return rows
