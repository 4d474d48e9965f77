"""GPT-2 (Radford et al., 2019, "Language Models are Unsupervised Multitask Learners").

A pre-LayerNorm decoder-only transformer:

    x_0 = wte[idx] + wpe[0..T-1]
    x   = x + attn(ln_1(x))          causal multi-head self-attention
    x   = x + mlp(ln_2(x))           Linear(C, 4C) -> GELU(tanh) -> Linear(4C, C)
    logits = ln_f(x) @ wte^T         the LM head shares the token embedding

Module names copy the Hugging Face checkpoint (`transformer.h.0.attn.c_attn`, ...),
so target-module names and state-dict keys mean the same thing here as in
transformers/PEFT. HF stores these projections as `Conv1D` with the weight as
(in, out); here they are `nn.Linear` (out, in), so the loader transposes them.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from trainers.models.common import (KVCache, cached_causal_mask, classify_last_token, generate,
                                    next_token_loss)


@dataclass
class GPT2Config:
    vocab_size: int = 50257  # GPT-2 BPE: 50,000 merges + 256 bytes + <|endoftext|>
    block_size: int = 1024  # longest context (HF n_positions)
    n_layer: int = 12  # transformer blocks; 12 = GPT-2 small (124M)
    n_head: int = 12  # attention heads
    n_embd: int = 768  # model width C
    dropout: float = 0.0  # 0 for fine-tuning (HF pretraining used 0.1)
    bias: bool = True  # GPT-2 has biases in every Linear and LayerNorm
    layer_norm_epsilon: float = 1e-5  # LayerNorm epsilon, as in the HF config
    num_labels: int = 2  # classes of the sequence-classification head
    pad_token_id: int | None = None  # GPT-2 has none; the classifier uses attention_mask or this
    gradient_checkpointing: bool = False  # recompute each block in backward to save activation memory

    @classmethod
    def tiny(cls, **overrides) -> "GPT2Config":
        """A few-thousand-parameter model for tests."""
        return cls(**{**dict(vocab_size=97, block_size=32, n_layer=2, n_head=2, n_embd=16), **overrides})


class CausalSelfAttention(nn.Module):
    """softmax(Q K^T / sqrt(hs) + causal mask) V per head, Q K V from one fused c_attn."""

    def __init__(self, config: GPT2Config, layer_idx: int = 0):
        super().__init__()
        assert config.n_embd % config.n_head == 0, "n_embd must be a multiple of n_head"
        self.layer_idx = layer_idx  # which slot of a KVCache is ours
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)  # q, k, v stacked
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.resid_dropout = nn.Dropout(config.dropout)
        self.n_head = config.n_head
        self.dropout = config.dropout

    def forward(self, x: Tensor, mask: Tensor | None = None, cache: KVCache | None = None) -> Tensor:
        B, T, C = x.size()
        q, k, v = self.c_attn(x).split(C, dim=2)  # 3 x (B, T, C)
        q = q.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        k = k.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        v = v.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        if cache is not None:
            k, v = cache.append(self.layer_idx, k, v)  # (B, nh, T_past + T, hs)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None,
                                           dropout_p=self.dropout if self.training else 0.0)  # (B, nh, T, hs)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # (B, T, C)
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    """c_proj(GELU(c_fc(x))), hidden width 4C."""

    def __init__(self, config: GPT2Config):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: Tensor) -> Tensor:
        x = F.gelu(self.c_fc(x), approximate="tanh")  # (B, T, 4C); GPT-2's "gelu_new"
        return self.dropout(self.c_proj(x))  # (B, T, C)


class Block(nn.Module):
    """x + attn(ln_1(x)), then + mlp(ln_2(x)) (pre-LN residual block)."""

    def __init__(self, config: GPT2Config, layer_idx: int = 0):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon, bias=config.bias)
        self.attn = CausalSelfAttention(config, layer_idx)
        self.ln_2 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon, bias=config.bias)
        self.mlp = MLP(config)

    def forward(self, x: Tensor, mask: Tensor | None = None, cache: KVCache | None = None) -> Tensor:
        x = x + self.attn(self.ln_1(x), mask, cache)
        return x + self.mlp(self.ln_2(x))


class GPT2Model(nn.Module):
    """The trunk: token ids (B, T) -> hidden states after ln_f (B, T, C)."""

    def __init__(self, config: GPT2Config):
        super().__init__()
        self.config = config
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        self.wpe = nn.Embedding(config.block_size, config.n_embd)
        self.drop = nn.Dropout(config.dropout)
        self.h = nn.ModuleList([Block(config, i) for i in range(config.n_layer)])
        self.ln_f = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon, bias=config.bias)

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None,
                cache: KVCache | None = None) -> Tensor:
        B, T = input_ids.size()
        past = 0 if cache is None else cache.length  # positions already in the cache
        if past + T > self.config.block_size:
            raise ValueError(f"GPT-2: sequence of length {past + T} is longer than block_size {self.config.block_size}")
        pos = torch.arange(past, past + T, dtype=torch.long, device=input_ids.device)  # (T,)
        x = self.drop(self.wte(input_ids) + self.wpe(pos))  # (B, T, C)
        mask = cached_causal_mask(cache, attention_mask, T, input_ids.device)  # (B, 1, T, T), (T, past + T) or None
        for block in self.h:
            if self.config.gradient_checkpointing and self.training and torch.is_grad_enabled():
                x = checkpoint(block, x, mask, use_reentrant=False)
            else:
                x = block(x, mask, cache)
        return self.ln_f(x)  # (B, T, C)


def _init_weights(model: nn.Module, n_layer: int) -> None:
    """GPT-2 init: N(0, 0.02), residual projections scaled by 1/sqrt(2 n_layer)."""
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            std = 0.02 / math.sqrt(2 * n_layer) if name.endswith("c_proj") else 0.02
            nn.init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)


class GPT2LMHeadModel(nn.Module):
    """GPT-2 language model: logits (B, T, vocab) and the next-token loss."""

    def __init__(self, config: GPT2Config):
        super().__init__()
        self.config = config
        self.transformer = GPT2Model(config)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.lm_head.weight = self.transformer.wte.weight  # weight tying (Press & Wolf, 2017)
        _init_weights(self, config.n_layer)

    def forward(self, input_ids: Tensor, targets: Tensor | None = None, attention_mask: Tensor | None = None,
                cache: KVCache | None = None) -> tuple[Tensor, Tensor | None]:
        """targets (B, T) are the labels aligned with input_ids; shifted here, -100 ignored.
        cache: a KVCache that generation fills and reads (see trainers.models.common)."""
        logits = self.lm_head(self.transformer(input_ids, attention_mask, cache))  # (B, T, V)
        loss = next_token_loss(logits, targets) if targets is not None else None
        return logits, loss

    def generate(self, idx: Tensor, max_new_tokens: int, temperature: float = 1.0,
                 top_k: int | None = None) -> Tensor:
        return generate(self, idx, max_new_tokens, temperature, top_k, self.config.block_size)


class GPT2ForSequenceClassification(nn.Module):
    """GPT-2 classifier: `score` reads the hidden state of the last real token.

    The last real token is the last position where attention_mask is 1 (or, without a
    mask, the last token that is not `pad_token_id`; without either, the last token).
    """

    def __init__(self, config: GPT2Config):
        super().__init__()
        self.config = config
        self.transformer = GPT2Model(config)
        self.score = nn.Linear(config.n_embd, config.num_labels, bias=False)  # as in HF
        _init_weights(self, config.n_layer)

    def forward(self, input_ids: Tensor, targets: Tensor | None = None,
                attention_mask: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
        """targets (B,) class ids; returns logits (B, num_labels)."""
        h = self.transformer(input_ids, attention_mask)  # (B, T, C)
        return classify_last_token(h, input_ids, attention_mask, self.config.pad_token_id, self.score, targets)
