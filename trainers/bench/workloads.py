"""The models and steps the benchmark sections share: GPT-2 (ours, and Hugging Face's with PEFT)
in full fine-tuning, LoRA and QLoRA form, a token batch, and one AdamW training step.

LoRA here is r=8, alpha=16, no dropout, on the attention projection `c_attn`
(the fused q, k, v Linear), which is also PEFT's default target for GPT-2, where
it is a `Conv1D` (weight stored (in, out)). QLoRA puts every Linear of the blocks
in NF4 (double quantization, block 64); the LM head shares the embedding and stays float.
"""
from __future__ import annotations

import dataclasses
import warnings

import torch
import torch.nn as nn

from lora import LoraConfig, add_lora_to_model
from quantization import quantize_model
from trainers.models import GPT2Config, GPT2LMHeadModel

LORA_TARGETS = ("c_attn",)
LORA_RANK, LORA_ALPHA = 8, 16
OURS = ("full", "lora", "qlora")          # the configurations built from this project
HF_PEFT = "hf_peft"                       # transformers GPT2LMHeadModel + peft LoRA


def gpt2_bench_config(quick: bool) -> tuple[GPT2Config, str]:
    """GPT-2 small (124M) for a full run; in quick mode 2 layers and a 4096-token vocabulary
    (same width and heads), and the note saying so."""
    if not quick:
        return GPT2Config(dropout=0.0), "GPT-2 small 124M"
    return GPT2Config(n_layer=2, vocab_size=4096, dropout=0.0), "quick: GPT-2 width 768, 2 layers, vocab 4096"


def token_batch(vocab_size: int, batch: int, seq: int, device, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab_size, (batch, seq), generator=gen).to(device)


def ours(kind: str, config: GPT2Config, device, seed: int = 0) -> nn.Module:
    """Our GPT-2 with random init: "full" (everything trains), "lora", "qlora", or "base" (frozen, no adapter)."""
    torch.manual_seed(seed)
    model = GPT2LMHeadModel(config)
    if kind == "qlora":
        with warnings.catch_warnings():          # the tied LM head stays float, as intended
            warnings.simplefilter("ignore")
            quantize_model(model, bits=4)
    if kind in ("lora", "qlora"):
        add_lora_to_model(model, LoraConfig(r=LORA_RANK, lora_alpha=LORA_ALPHA, target_modules=LORA_TARGETS))
    elif kind == "base":
        model.requires_grad_(False)
    elif kind != "full":
        raise ValueError(f"workloads.ours: kind must be one of {OURS + ('base',)}, got {kind!r}")
    return model.to(device)


def hf_available() -> str | None:
    """None when transformers and peft import, else the reason they do not."""
    try:
        import peft  # noqa: F401
        import transformers  # noqa: F401
    except Exception as e:  # ImportError, or a broken install
        return f"transformers/peft not importable ({type(e).__name__})"
    return None


def hf_peft(config: GPT2Config, device, seed: int = 0) -> nn.Module:
    """transformers' GPT2LMHeadModel of the same shape (dropout 0) with peft LoRA on c_attn."""
    import peft
    import transformers
    transformers.logging.set_verbosity_error()      # config chatter about token ids outside a small vocab
    torch.manual_seed(seed)
    hf_config = transformers.GPT2Config(
        vocab_size=config.vocab_size, n_positions=config.block_size, n_embd=config.n_embd,
        n_layer=config.n_layer, n_head=config.n_head, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
        layer_norm_epsilon=config.layer_norm_epsilon)
    lora = peft.LoraConfig(r=LORA_RANK, lora_alpha=LORA_ALPHA, lora_dropout=0.0,
                           target_modules=list(LORA_TARGETS), fan_in_fan_out=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        model = transformers.GPT2LMHeadModel(hf_config)
        return peft.get_peft_model(model, lora).to(device)


def build(kind: str, config: GPT2Config, device, seed: int = 0) -> nn.Module:
    return hf_peft(config, device, seed) if kind == HF_PEFT else ours(kind, config, device, seed)


def lm_loss(model: nn.Module, kind: str, idx: torch.Tensor) -> torch.Tensor:
    """Next-token loss on idx (labels = inputs, shifted inside the model, as HF does)."""
    if kind == HF_PEFT:
        return model(input_ids=idx, labels=idx).loss
    return model(idx, targets=idx)[1]


def train_step(model: nn.Module, kind: str, idx: torch.Tensor, lr: float = 1e-4):
    """A closure running one step: forward, loss, backward, AdamW step, zero_grad(set_to_none)."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr)
    model.train()

    def step():
        loss = lm_loss(model, kind, idx)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss
    step.optimizer = optimizer
    return step


def with_overrides(config: GPT2Config, **changes) -> GPT2Config:
    return dataclasses.replace(config, **changes)
