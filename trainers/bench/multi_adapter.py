"""Mixed-batch serving: one batch of 32 whose examples ask for K = 1, 4 or 16 different LoRA adapters.

Model: a transformers GPT-2 (width 768, 12 heads; 2 layers and vocab 4096 in quick mode, else 4
layers and GPT-2's vocab) when transformers is installed, so PEFT runs on the very same model;
else ours (trainers.models, same names and shapes) and the PEFT row is skipped. T = 32.
Adapters: r = 8 LoRA on `c_attn`, B filled with small random values; example b asks for
adapter b mod K. Variants, timed interleaved per K (torch.no_grad):
    mixed      lora.mixed_batch: stacked factors gathered per example, two bmm per layer
    loop       for each adapter: set_adapter, forward its examples (then reassembled)
    peft       PEFT's forward(..., adapter_names=[...]) on the same model and adapters
    single     one adapter for the whole batch (plain LoRA layers): the cost to come near
Targets: mixed faster than loop and than PEFT (< 1), and within 1.3x of single.
"""
from __future__ import annotations

import copy

import torch

from lora import LoraConfig, adapter_layers, add_adapter, mixed_batch, save_adapters, set_adapter
from trainers.bench import workloads as W
from trainers.bench.layers import fill_zero_factors
from trainers.bench.timing import Settings, compare_row, skip_row, time_interleaved
from trainers.models import GPT2LMHeadModel

SECTION = "multi_adapter"
KS = (1, 4, 16)
BATCH, SEQ = 32, 32
ROWS = tuple(f"mixed batch of {k} adapters / {other}" for k in KS
             for other in ("loop with set_adapter", "PEFT mixed batch", "one adapter, same batch"))


def _base(config, quick: bool):
    """A transformers GPT-2 of the bench's size (and True), or ours when transformers is absent (False)."""
    torch.manual_seed(0)
    try:
        import transformers
    except ImportError:
        return GPT2LMHeadModel(config), False
    hf = transformers.GPT2Config(n_embd=config.n_embd, n_head=config.n_head, n_layer=config.n_layer,
                                 vocab_size=config.vocab_size, n_positions=max(SEQ, 64), resid_pdrop=0.0,
                                 embd_pdrop=0.0, attn_pdrop=0.0)
    return transformers.GPT2LMHeadModel(hf), True


def _with_adapters(base, k: int):
    model = copy.deepcopy(base)
    for i in range(k):
        add_adapter(model, f"a{i}", LoraConfig(r=8, lora_alpha=16, target_modules=["c_attn"]))
        set_adapter(model, f"a{i}")
        torch.manual_seed(i + 1)
        for _, layer in adapter_layers(model):
            fill_zero_factors(layer)
    set_adapter(model, "a0")
    return model


def _peft(base, ours, k: int, folder):
    """PEFT's model holding the same adapters (through our files), or None without peft."""
    try:
        import peft
    except ImportError:
        return None
    save_adapters(ours, folder)   # names a0.. go to subfolders; PEFT needs a root adapter, so load them by path
    model = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(folder / "a0"), adapter_name="a0")
    for i in range(1, k):
        model.load_adapter(str(folder / f"a{i}"), adapter_name=f"a{i}")
    return model


def run(settings: Settings) -> list:
    import tempfile
    from pathlib import Path

    device = settings.device
    config, _ = W.gpt2_bench_config(settings.quick)
    config = W.with_overrides(config, n_layer=2 if settings.quick else 4)
    base, is_hf = _base(config, settings.quick)
    base = base.eval().requires_grad_(False)
    note = ("quick: " if settings.quick else "") + f"{'transformers' if is_hf else 'our'} GPT-2 width 768, " \
        f"{config.n_layer} layers, batch {BATCH}, T={SEQ}, r=8 on c_attn"
    idx = W.token_batch(config.vocab_size, BATCH, SEQ, device)
    single = _with_adapters(base, 1).to(device).eval()
    rows = []
    for k in KS:
        ours = _with_adapters(base, k)
        names = [f"a{b % k}" for b in range(BATCH)]
        groups = {n: torch.tensor([b for b in range(BATCH) if names[b] == n], device=device) for n in dict.fromkeys(names)}
        with tempfile.TemporaryDirectory() as tmp:
            theirs = _peft(base, ours, k, Path(tmp)) if is_hf else None
        ours = ours.to(device).eval()
        theirs = theirs.to(device).eval() if theirs is not None else None

        def call(model):
            out = model(idx)
            return out.logits if hasattr(out, "logits") else out[0]

        def mixed():
            with torch.no_grad(), mixed_batch(ours, names):
                return call(ours)

        def loop():
            with torch.no_grad():
                parts = []
                for n, rows_n in groups.items():
                    set_adapter(ours, n)
                    out = ours(idx[rows_n])
                    parts.append((rows_n, out.logits if hasattr(out, "logits") else out[0]))
                result = torch.empty(BATCH, *parts[0][1].shape[1:], device=device)
                for rows_n, out in parts:
                    result[rows_n] = out
                return result

        def one():
            with torch.no_grad():
                return call(single)

        fns = {"mixed": mixed, "loop": loop, "single": one}
        if theirs is not None:
            def peft_mixed():
                with torch.no_grad():
                    return theirs(input_ids=idx, adapter_names=names).logits
            fns["peft"] = peft_mixed
        t = time_interleaved(fns, settings)
        set_adapter(ours, "a0")
        what = f"mixed batch of {k} adapters"
        rows.append(compare_row(SECTION, f"{what} / loop with set_adapter", t["mixed"], t["loop"], "< 1",
                                f"{note}; loop {t['loop'].median * 1e3:.1f} ms"))
        if "peft" in t:
            rows.append(compare_row(SECTION, f"{what} / PEFT mixed batch", t["mixed"], t["peft"], "< 1",
                                    f"{note}; PEFT {t['peft'].median * 1e3:.1f} ms"))
        else:
            rows.append(skip_row(SECTION, f"{what} / PEFT mixed batch", "needs transformers and peft", "< 1"))
        rows.append(compare_row(SECTION, f"{what} / one adapter, same batch", t["mixed"], t["single"], "<= 1.3",
                                f"{note}; one adapter {t['single'].median * 1e3:.1f} ms"))
    return rows
