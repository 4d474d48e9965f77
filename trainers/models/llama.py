"""LLaMA (Touvron et al., 2023, "LLaMA: Open and Efficient Foundation Language Models").

A pre-norm decoder-only transformer that differs from GPT-2 in four places:

    RMSNorm      y = x / sqrt(mean(x^2) + eps) * g                    (Zhang & Sennrich, 2019)
    RoPE         q, k rotated by position-dependent angles t * theta^(-2i/hs)  (Su et al., 2021)
    SwiGLU MLP   down_proj(silu(gate_proj(x)) * up_proj(x))           (Shazeer, 2020)
    GQA          n_kv_heads <= n_heads; query head h reads kv head h // (n_heads / n_kv_heads)
                                                                      (Ainslie et al., 2023)

Rotary convention: "rotate half", as in Hugging Face checkpoints. Inside each head the
first hs/2 features are the real parts and the last hs/2 the imaginary parts of the
hs/2 rotating pairs. llama2.c and Meta's original code instead rotate interleaved
pairs (2i, 2i+1); `trainers.checkpoints.load_llama2c` permutes the rows of wq and wk
into this layout, which leaves every attention score q.k unchanged.

Heads, as in transformers: the language model (`lm_head`); sequence classification
(`score`, no bias, reading the last real token, the only position that has seen the
whole text); extractive QA (`qa_outputs`, a (start, end) pair of logits per position).
DRaFT-Q runs TinyLlama on AG News and SQuAD through the last two.

Module names copy the HF checkpoint (`model.layers.0.self_attn.q_proj`, ...; the QA
head's trunk is `transformer`, because HF's LlamaForQuestionAnswering keeps that old
name). Sizes go from stories260K (260K parameters) to TinyLlama-1.1B
(`LlamaConfig.tinyllama()`).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from trainers.models.attention import attention
from trainers.models.common import (KVCache, cached_causal_mask, classify_last_token, generate,
                                    next_token_loss, span_loss)
from trainers.models.fused import project

# F.scaled_dot_product_attention reads k, v with fewer heads itself from torch 2.5 (enable_gqa),
# so k and v are not copied n_heads / n_kv_heads times (nor their gradients summed back).
_SDPA_GQA = torch.__version__ >= "2.5"
# F.rms_norm (torch 2.4) in float32 computes RMSNorm.forward's formula in one kernel instead of six
# (stories260K LoRA step, 11 norms: 0.59 -> 0.44 ms forward + backward per norm, one thread).
_FUSED_RMS_NORM = hasattr(F, "rms_norm")


@dataclass
class LlamaConfig:
    vocab_size: int = 32000  # Llama-2 SentencePiece vocabulary
    dim: int = 2048  # model width C (HF hidden_size); defaults are TinyLlama-1.1B
    n_layers: int = 22  # transformer blocks (HF num_hidden_layers)
    n_heads: int = 32  # query heads (HF num_attention_heads)
    n_kv_heads: int = 4  # key/value heads shared by groups of query heads (GQA)
    hidden_dim: int = 5632  # SwiGLU width (HF intermediate_size)
    norm_eps: float = 1e-5  # RMSNorm epsilon
    rope_theta: float = 10000.0  # RoPE base
    max_seq_len: int = 2048  # longest context (HF max_position_embeddings)
    tie_word_embeddings: bool = False  # True: lm_head shares embed_tokens (stories260K)
    dropout: float = 0.0  # on attention probabilities and residual branches
    num_labels: int = 2  # classes of the sequence-classification head
    pad_token_id: int | None = None  # Llama-2 has none; the classifier uses attention_mask or this
    gradient_checkpointing: bool = False  # recompute each block in backward to save activation memory

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @classmethod
    def tiny(cls, **overrides) -> "LlamaConfig":
        """A few-thousand-parameter GQA model for tests."""
        return cls(**{**dict(vocab_size=97, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=64,
                             max_seq_len=64), **overrides})

    @classmethod
    def stories260k(cls) -> "LlamaConfig":
        """karpathy/tinyllamas stories260K (see shared/data/PROVENANCE.md)."""
        return cls(vocab_size=512, dim=64, n_layers=5, n_heads=8, n_kv_heads=4, hidden_dim=172,
                   max_seq_len=512, tie_word_embeddings=True)

    @classmethod
    def tinyllama(cls) -> "LlamaConfig":
        """TinyLlama/TinyLlama-1.1B (the defaults)."""
        return cls()


class RMSNorm(nn.Module):
    """y = x / sqrt(mean(x^2) + eps) * weight, computed in float32."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        if _FUSED_RMS_NORM and x.dtype == self.weight.dtype == torch.float32:
            return F.rms_norm(x, self.weight.shape, self.weight, self.eps)  # same math, one kernel each way
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


def rope_cos_sin(T: int, head_dim: int, theta: float, device, start: int = 0) -> tuple[Tensor, Tensor]:
    """cos, sin (T, hs) for positions start..start+T-1, each angle repeated for both halves."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim)
    positions = torch.arange(start, start + T, device=device, dtype=torch.float32)  # (T,)
    angles = torch.outer(positions, inv_freq)  # (T, hs/2)
    angles = torch.cat((angles, angles), dim=-1)  # (T, hs)
    return angles.cos(), angles.sin()


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate pair i = (x[i], x[i + hs/2]) by its angle: x * cos + rotate_half(x) * sin."""
    half = x.size(-1) // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)  # (B, nh, T, hs)
    return x * cos.to(x.dtype) + rotated * sin.to(x.dtype)


class Attention(nn.Module):
    """softmax(R(q) R(k)^T / sqrt(hs) + causal mask) v per query head, R = rotary embedding;
    k and v have n_kv_heads heads, each shared by n_heads / n_kv_heads query heads."""

    def __init__(self, config: LlamaConfig, layer_idx: int = 0):
        super().__init__()
        self.layer_idx = layer_idx  # which slot of a KVCache is ours
        assert config.n_heads % config.n_kv_heads == 0, "n_heads must be a multiple of n_kv_heads"
        hs = config.head_dim
        self.n_heads, self.n_kv_heads, self.head_dim = config.n_heads, config.n_kv_heads, hs
        self.q_proj = nn.Linear(config.dim, config.n_heads * hs, bias=False)
        self.k_proj = nn.Linear(config.dim, config.n_kv_heads * hs, bias=False)
        self.v_proj = nn.Linear(config.dim, config.n_kv_heads * hs, bias=False)
        self.o_proj = nn.Linear(config.n_heads * hs, config.dim, bias=False)
        self.dropout = config.dropout

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, mask: Tensor | None,
                cache: KVCache | None = None) -> Tensor:
        B, T, _ = x.size()
        q, k, v = project(x, (self.q_proj, self.k_proj, self.v_proj))  # one matmul when it can (models/fused.py)
        q = q.view(B, T, self.n_heads, self.head_dim).transpose(1, 2)  # (B, nh, T, hs)
        k = k.view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)  # (B, nkv, T, hs)
        # a copy of v (1/5 of q|k|v here): attention keeps v for backward, and as a view it would keep
        # the whole fused q|k|v output alive (q and k are kept after RoPE, new tensors, anyway)
        v = v.contiguous().view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)  # (B, nkv, T, hs)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            k, v = cache.append(self.layer_idx, k, v)  # (B, nkv, T_past + T, hs)
        group = self.n_heads // self.n_kv_heads  # query head h reads kv head h // group
        if group > 1 and not _SDPA_GQA:
            k = k.repeat_interleave(group, dim=1)  # (B, nh, T_k, hs)
            v = v.repeat_interleave(group, dim=1)  # (B, nh, T_k, hs)
        # SDPA, or at head size <= 8 on the CPU a faster kernel of ours (trainers/models/attention.py)
        y = attention(q, k, v, mask, self.dropout if self.training else 0.0)  # (B, nh, T, hs)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim))  # (B, T, C)


class MLP(nn.Module):
    """SwiGLU: down_proj(silu(gate_proj(x)) * up_proj(x)), hidden width hidden_dim."""

    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.gate_proj = nn.Linear(config.dim, config.hidden_dim, bias=False)
        self.up_proj = nn.Linear(config.dim, config.hidden_dim, bias=False)
        self.down_proj = nn.Linear(config.hidden_dim, config.dim, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        gate, up = project(x, (self.gate_proj, self.up_proj))  # (B, T, hidden) each, one matmul when it can
        return self.down_proj(_SwiGLU.apply(gate, up))  # (B, T, C)


class _SwiGLU(torch.autograd.Function):
    """silu(gate) * up, keeping gate and up for backward and recomputing silu(gate) there.

    Autograd's F.silu(gate) * up keeps three (B, T, hidden) tensors (gate for silu, silu(gate)
    and up for the product); this keeps two, which share one storage when q/k/v-style fusion
    computed gate and up together. Measured (stories260K LoRA step, batch 8 x 128, one thread):
    peak memory 32.2 -> 28.7 MiB, step time unchanged (the recomputed silu costs what the
    smaller saved set saves). Twice differentiable (backward under create_graph
    differentiates the formula itself)."""

    @staticmethod
    def forward(ctx, gate, up):
        ctx.save_for_backward(gate, up)
        return F.silu(gate).mul_(up)

    @staticmethod
    def backward(ctx, g):
        gate, up = ctx.saved_tensors
        if torch.is_grad_enabled():   # create_graph: gate and up carry their history
            return torch.autograd.grad(F.silu(gate) * up, (gate, up), g, create_graph=True)
        d_gate = torch.ops.aten.silu_backward(g * up, gate)   # g up silu'(gate)
        return d_gate, F.silu(gate).mul_(g)                    # d_up = g silu(gate)


class DecoderLayer(nn.Module):
    """x + attn(RMSNorm(x)), then + mlp(RMSNorm(x)) (pre-norm residual block)."""

    def __init__(self, config: LlamaConfig, layer_idx: int = 0):
        super().__init__()
        self.input_layernorm = RMSNorm(config.dim, config.norm_eps)
        self.self_attn = Attention(config, layer_idx)
        self.post_attention_layernorm = RMSNorm(config.dim, config.norm_eps)
        self.mlp = MLP(config)
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, mask: Tensor | None,
                cache: KVCache | None = None) -> Tensor:
        x = x + self.resid_dropout(self.self_attn(self.input_layernorm(x), cos, sin, mask, cache))
        return x + self.resid_dropout(self.mlp(self.post_attention_layernorm(x)))


class LlamaModel(nn.Module):
    """The trunk: token ids (B, T) -> normalised hidden states (B, T, C)."""

    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.dim)
        self.layers = nn.ModuleList([DecoderLayer(config, i) for i in range(config.n_layers)])
        self.norm = RMSNorm(config.dim, config.norm_eps)

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None,
                cache: KVCache | None = None) -> Tensor:
        T = input_ids.size(1)
        past = 0 if cache is None else cache.length  # positions already in the cache
        if past + T > self.config.max_seq_len:
            raise ValueError(f"LLaMA: sequence of length {past + T} is longer than max_seq_len {self.config.max_seq_len}")
        cos, sin = rope_cos_sin(T, self.config.head_dim, self.config.rope_theta, input_ids.device, past)  # (T, hs)
        mask = cached_causal_mask(cache, attention_mask, T, input_ids.device)  # (B, 1, T, T), (T, past + T) or None
        x = self.embed_tokens(input_ids)  # (B, T, C)
        for layer in self.layers:
            if self.config.gradient_checkpointing and self.training and torch.is_grad_enabled():
                x = checkpoint(layer, x, cos, sin, mask, use_reentrant=False)
            else:
                x = layer(x, cos, sin, mask, cache)
        return self.norm(x)


def _init_weights(model: nn.Module, n_layers: int) -> None:
    """N(0, 0.02) for every Linear and Embedding, output projections scaled by 1/sqrt(2 n_layers)
    as in GPT-2; biases (only qa_outputs has one) zero."""
    for name, module in model.named_modules():
        if isinstance(module, (nn.Linear, nn.Embedding)):
            std = 0.02 / math.sqrt(2 * n_layers) if name.endswith(("o_proj", "down_proj")) else 0.02
            nn.init.normal_(module.weight, std=std)
            if getattr(module, "bias", None) is not None:
                nn.init.zeros_(module.bias)


class LlamaForCausalLM(nn.Module):
    """LLaMA language model: logits (B, T, vocab) and the next-token loss."""

    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.config = config
        self.model = LlamaModel(config)
        self.lm_head = nn.Linear(config.dim, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        _init_weights(self, config.n_layers)

    def forward(self, input_ids: Tensor, targets: Tensor | None = None, attention_mask: Tensor | None = None,
                cache: KVCache | None = None) -> tuple[Tensor, Tensor | None]:
        """targets (B, T) are the labels aligned with input_ids; shifted here, -100 ignored.
        cache: a KVCache that generation fills and reads (see trainers.models.common)."""
        logits = self.lm_head(self.model(input_ids, attention_mask, cache))  # (B, T, V)
        loss = next_token_loss(logits, targets) if targets is not None else None
        return logits, loss

    def generate(self, idx: Tensor, max_new_tokens: int, temperature: float = 1.0,
                 top_k: int | None = None) -> Tensor:
        return generate(self, idx, max_new_tokens, temperature, top_k, self.config.max_seq_len)


class LlamaForSequenceClassification(nn.Module):
    """LLaMA classifier: logits (B, num_labels) = score(h at the last real token).

    The last real token is the last position where attention_mask is 1 (or, without a
    mask, the last token that is not `pad_token_id`; without either, the last token).
    HF's LlamaForSequenceClassification looks only at pad_token_id; on right- or
    left-padded batches whose text holds no pad id the two agree.
    """

    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.config = config
        self.model = LlamaModel(config)
        self.score = nn.Linear(config.dim, config.num_labels, bias=False)  # as in HF
        _init_weights(self, config.n_layers)

    def forward(self, input_ids: Tensor, targets: Tensor | None = None,
                attention_mask: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
        """targets (B,) class ids, -100 ignored."""
        h = self.model(input_ids, attention_mask)  # (B, T, C)
        return classify_last_token(h, input_ids, attention_mask, self.config.pad_token_id, self.score, targets)


class LlamaForQuestionAnswering(nn.Module):
    """Extractive QA span head: logits (B, T, 2), [..., 0] = start, [..., 1] = end.

    targets (B, 2) hold the answer's (start, end) token positions; the loss is
    trainers.models.common.span_loss, the same as DistilBERT's QA head. A causal trunk
    sees only the left context at each position, so the question goes before the
    context (as trainers.data lays out qa examples). The trunk is called `transformer`,
    not `model`: HF's LlamaForQuestionAnswering kept that name, and its checkpoints and
    adapter files use it.
    """

    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.config = config
        self.transformer = LlamaModel(config)
        self.qa_outputs = nn.Linear(config.dim, 2)  # with bias, as in HF
        _init_weights(self, config.n_layers)

    def forward(self, input_ids: Tensor, targets: Tensor | None = None,
                attention_mask: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
        logits = self.qa_outputs(self.transformer(input_ids, attention_mask))  # (B, T, 2)
        loss = span_loss(logits, targets) if targets is not None else None
        return logits, loss
