"""Training tokens/s against transformers + PEFT (and bitsandbytes), the same step side by side.

One step = forward, next-token loss, backward, AdamW step, zero_grad (workloads.train_step),
LoRA r=8, alpha 16, no dropout, on every linear layer ("all-linear", the LM head excepted)
on both sides, the same token batch for both:

  * stories260K (the real llama2.c checkpoint and Tiny Shakespeare blocks when the data
    folder has them, else the same shapes at random), batch 8 x 128, vs transformers'
    LlamaForCausalLM of the same shape with peft;
  * GPT-2 small (quick: 2 layers, vocab 4096), batch 4 x 128, vs transformers'
    GPT2LMHeadModel with peft (its Conv1D layers, fan_in_fan_out);
  * stories260K QLoRA (NF4, double quantization, block 64, on every Linear of the blocks)
    vs peft LoRA over bitsandbytes' Linear4bit of the same configuration.

Each pair runs eager, and compiled (torch.compile of each model, the optimizer eager) in a
full run; a compile that fails skips its row with the reason, and --quick skips them
(compiling takes minutes). Ratios are ours tokens/s / theirs (their step time / ours),
timed interleaved in this process (timing.py), each sample at least 0.5 s of steps. Peak
memory of the stories260K LoRA step: each side in fresh processes (train_step.measure_memory's
method, glibc's mmap threshold fixed), the median of three.
"""
from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import statistics
import subprocess
import sys
import warnings

import torch
import torch.nn as nn

from lora import LoraConfig, add_lora_to_model
from quantization import quantize_model
from trainers.bench import train_step as TS
from trainers.bench import workloads as W
from trainers.bench.quant import _bnb, _bnb_linear4bit
from trainers.bench.timing import Settings, compare_row, make_row, skip_row, time_interleaved
from trainers.models import GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

SECTION = "vs_hf"
PAIRS = {   # row name -> (model, ours, theirs)
    "stories260K LoRA tokens/s / HF+PEFT": ("stories", "lora", "hf_lora"),
    "GPT-2 small LoRA tokens/s / HF+PEFT": ("gpt2", "lora", "hf_lora"),
    "stories260K QLoRA tokens/s / HF+PEFT+bitsandbytes": ("stories", "qlora", "hf_qlora"),
}
TARGETS = {"stories": ">= 1.3", "gpt2": ">= 1.15"}
MEMORY_ROW = "stories260K LoRA peak memory / HF+PEFT"
STEADY_S = 0.5
MEMORY_RUNS = 3     # fresh processes per side, alternating; the median
ROWS = tuple(f"{name} ({mode})" for name in PAIRS for mode in ("eager", "compiled")) + (MEMORY_ROW,)


def stories_data():
    """(our stories260K model or None, token batch (8, 128)): the real checkpoint and Tiny
    Shakespeare blocks when present, else (None, random tokens)."""
    try:
        from trainers.loading import load_model, load_task_for
        model, tokenizer = load_model("stories260K", "tiny_shakespeare", max_length=128)
        data = load_task_for("tiny_shakespeare", tokenizer, max_length=128, limit=8)
        return model, next(data.batches("train", 8, drop_last=True))["input_ids"]
    except (FileNotFoundError, ValueError, OSError):
        return None, W.token_batch(512, 8, 128, "cpu")


def _lora(target_modules="all-linear") -> LoraConfig:
    return LoraConfig(r=W.LORA_RANK, lora_alpha=W.LORA_ALPHA, target_modules=target_modules)


def ours(model_name: str, kind: str, quick: bool, device) -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    if model_name == "stories":
        model, idx = stories_data()
        model = model or LlamaForCausalLM(LlamaConfig.stories260k())
    else:
        config, _ = W.gpt2_bench_config(quick)
        model, idx = GPT2LMHeadModel(config), W.token_batch(config.vocab_size, 4, 128, "cpu")
    if kind == "qlora":
        with warnings.catch_warnings():          # a tied LM head stays float, as intended
            warnings.simplefilter("ignore")
            quantize_model(model, bits=4)
    add_lora_to_model(model, _lora())
    return model.to(device), idx.to(device)


def theirs(model_name: str, kind: str, quick: bool, device, llama: LlamaConfig | None = None) -> nn.Module:
    """transformers' model of the same shape (random init, dropout 0) with peft LoRA on all-linear;
    hf_qlora: every Linear of the blocks first replaced by bitsandbytes' NF4 Linear4bit."""
    import peft
    import transformers
    transformers.logging.set_verbosity_error()
    torch.manual_seed(0)
    if model_name == "stories":
        c = llama or LlamaConfig.stories260k()
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(
            vocab_size=c.vocab_size, hidden_size=c.dim, intermediate_size=c.hidden_dim,
            num_hidden_layers=c.n_layers, num_attention_heads=c.n_heads, num_key_value_heads=c.n_kv_heads,
            max_position_embeddings=c.max_seq_len, rms_norm_eps=c.norm_eps, tie_word_embeddings=True))
    else:
        config, _ = W.gpt2_bench_config(quick)
        model = transformers.GPT2LMHeadModel(transformers.GPT2Config(
            vocab_size=config.vocab_size, n_positions=config.block_size, n_embd=config.n_embd,
            n_layer=config.n_layer, n_head=config.n_head, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0))
    if kind == "hf_qlora":
        bnb = _bnb()
        for name, module in list(model.named_modules()):
            for child_name, child in list(module.named_children()):
                if type(child) is nn.Linear and child_name != "lm_head":
                    setattr(module, child_name, _bnb_linear4bit(bnb, child))
    lora = peft.LoraConfig(r=W.LORA_RANK, lora_alpha=W.LORA_ALPHA, lora_dropout=0.0, target_modules="all-linear",
                           fan_in_fan_out=model_name == "gpt2")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return peft.get_peft_model(model, lora).to(device)


def _compiled_step(model: nn.Module, kind: str, idx: torch.Tensor, side: str):
    """A train step over torch.compile(model), run once here so that a failure shows now
    (raises, naming the side)."""
    step = W.train_step(torch.compile(model), kind, idx)
    try:
        step()
    except Exception as err:
        raise RuntimeError(f"{side}: {type(err).__name__}: {err}") from err
    return step


def _missing(kind: str) -> str | None:
    if kind == "hf_qlora" and _bnb() is None:
        return "bitsandbytes not importable"
    return W.hf_available()


def run(settings: Settings) -> list:
    device, quick = settings.device, settings.quick
    # A timed sample of at least STEADY_S seconds (several stories260K steps, one GPT-2 step):
    # with one 80 ms step per sample the paired ratios of one run spread by several per cent.
    steady = settings if quick else dataclasses.replace(settings, min_time=max(settings.min_time, STEADY_S))
    rows = []
    for name, (model_name, kind, their_kind) in PAIRS.items():
        target = TARGETS.get(model_name) if kind == "lora" else None
        missing = _missing(their_kind)
        if missing:
            rows += [skip_row(SECTION, f"{name} ({mode})", missing, target) for mode in ("eager", "compiled")]
            continue
        mine, idx = ours(model_name, kind, quick, device)
        other = theirs(model_name, their_kind, quick, device)
        B, T = idx.shape
        hf_kind = W.HF_PEFT                                  # labels=, as workloads.lm_loss calls HF models
        for mode in ("eager", "compiled"):
            what = f"{name} ({mode})"
            if mode == "compiled" and quick:
                rows.append(skip_row(SECTION, what, "--quick: compiling takes minutes", target))
                continue
            try:
                fns = ({"ours": W.train_step(mine, kind, idx), "theirs": W.train_step(other, hf_kind, idx)}
                       if mode == "eager" else
                       {"ours": _compiled_step(mine, kind, idx, "ours"),
                        "theirs": _compiled_step(other, hf_kind, idx, "theirs")})
            except Exception as err:                       # torch.compile unavailable or failing here
                rows.append(skip_row(SECTION, what, f"torch.compile failed, "
                                     f"{' '.join(str(err).split())[:200]}", target))
                continue
            t = time_interleaved(fns, steady)
            rows.append(compare_row(SECTION, what, t["theirs"], t["ours"], target,
                                    f"batch {B}x{T}; ours {B * T / t['ours'].median:.0f} tok/s, "
                                    f"theirs {B * T / t['theirs'].median:.0f} tok/s"))
            del fns
        del mine, other
        gc.collect()
    rows.append(_memory_row(settings))
    return rows


# ---------------------------------------------------------------------------- peak memory

def _stories_pair(side: str, config: LlamaConfig) -> tuple[nn.Module, str]:
    """(model, workloads kind) of one side with LoRA on all-linear, random init of `config`'s shape."""
    torch.manual_seed(0)
    if side == "ours":
        return add_lora_to_model(LlamaForCausalLM(config), _lora()), "lora"
    return theirs("stories", "hf_lora", True, "cpu", config), W.HF_PEFT


def measure_memory(side: str, steps: int = 2) -> dict:
    """Peak memory of `steps` stories260K LoRA steps of one side, in THIS (fresh) CPU process:
    peak RSS minus RSS before the model is built (train_step.measure_memory's method)."""
    if side == "theirs":                      # import before the baseline: libraries are not the model
        import peft  # noqa: F401
        import transformers  # noqa: F401
    _, idx = stories_data()                   # the data are read before the baseline
    # Two steps of a tiny model of the same side first: the first matmuls and attention calls map
    # ~100 MiB of library code and buffers (MKL, oneDNN), which is not the model's memory.
    tiny = LlamaConfig.tiny(vocab_size=512, max_seq_len=128)
    warm, kind = _stories_pair(side, tiny)
    for _ in range(2):
        W.train_step(warm, kind, idx)()
    del warm
    gc.collect()
    before = TS._rss_bytes()
    reset = TS._reset_hwm()
    model, kind = _stories_pair(side, LlamaConfig.stories260k())
    step = W.train_step(model, kind, idx)
    for _ in range(steps):
        step()
    peak = TS._hwm_bytes() if reset else TS._maxrss_bytes()
    return {"side": side, "peak_bytes": int(peak - before)}


def _memory_row(settings: Settings):
    missing = W.hf_available()
    if missing:
        return skip_row(SECTION, MEMORY_ROW, missing, "<= 1.0")
    if settings.device.type != "cpu":
        return skip_row(SECTION, MEMORY_ROW, "measured on the CPU only (resident set size)", "<= 1.0")
    runs = {"ours": [], "theirs": []}
    for _ in range(MEMORY_RUNS):          # alternating sides
        for side in runs:
            out = subprocess.run([sys.executable, "-m", "trainers.bench.vs_hf", "--memory", side],
                                 capture_output=True, text=True, env=TS.measurement_env(), timeout=600)
            if out.returncode != 0:
                raise RuntimeError(f"memory run of {side} failed:\n{out.stderr[-2000:]}")
            runs[side].append(json.loads(out.stdout.strip().splitlines()[-1])["peak_bytes"])
    mem = {side: statistics.median(values) for side, values in runs.items()}
    return make_row(SECTION, MEMORY_ROW, mem["ours"] / mem["theirs"], "<= 1.0",
                    f"ours {mem['ours'] / 2**20:.1f} MiB, theirs {mem['theirs'] / 2**20:.1f} MiB; median of "
                    f"{MEMORY_RUNS} fresh processes each, peak RSS - RSS before the build",
                    ours_bytes=runs["ours"], theirs_bytes=runs["theirs"])


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description="child process: peak memory of one stories260K LoRA step")
    parser.add_argument("--memory", required=True, choices=("ours", "theirs"))
    print(json.dumps(measure_memory(parser.parse_args(argv).memory)))


if __name__ == "__main__":
    main()
