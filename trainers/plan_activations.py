"""The planner's activation count: the bytes one training step saves for backward (trainers/plan.py).

Activations saved for backward (per token, a = compute-dtype bytes, f = 4; C width, h heads,
H MLP width, r rank). Derived from what autograd keeps for the blocks in trainers/models,
after Korthikanti et al. 2022, "Reducing Activation Recomputation in Large Transformer
Models" (arXiv:2205.05198, §4.1: 34 C + 5 h T bytes per token at 16 bits with dropout).
Differences from that count: no dropout masks (dropout is 0), and attention runs in
F.scaled_dot_product_attention's fused kernels (Dao et al. 2022, FlashAttention), which keep
q, k, v, the output and one log-sum-exp per head instead of the (h, T, T) scores. A Linear
keeps its input only when its weight trains or it carries an adapter (autograd saves x for
dL/dW only), which is why LoRA's activations are smaller than full fine-tuning's.

    GPT-2 block      LayerNorm x2       (C + 2) f each (input in fp32, mean, rstd)
                     attention          3C a (q, k, v) + C a (output) + h f (log-sum-exp)
                     MLP                4C a (GELU input)
                     Linear inputs      C a (c_attn) + C a (c_fc) + 4C a (mlp.c_proj) if they train;
                                        attn.c_proj reads the attention output, already kept
    LLaMA block      RMSNorm x2         (C + 1) f each (+ C a for the normalised x if the norm trains)
                     attention          2C a (q, output) + 2 K a (k, v at the K = n_kv_heads x head
                                        width: SDPA reads grouped heads itself from torch 2.5) + h f;
                                        on the CPU at head size <= 8 and T >= 64 in float32 (the
                                        kernel of trainers/models/attention.py) C a + 2 K a, and the
                                        output only as o_proj's input, C a if it trains
                     SwiGLU             2H a (gate, up; silu(gate) is recomputed in backward)
                     Linear inputs      C a (q, k, v) + C a (gate, up) + H a (down_proj) if they train
    adapter (i, o)   LoRA, Sparse, AdaLoRA   r a (x A^T); once: Sparse r (i + o) w (masked A, B),
                                             AdaLoRA r f + r i w (Λ m, masked A)
                     DoRA                    r a + 2 o a (W0 x, s B A x); once: 3 o f (m/||V||, ||V||, c - 1)
                     HiRA                    once: o i a (ΔW = W0 * s B A) + o i a (dequantized W0) on a
                                             quantized base
                     (the "once" terms that serve the gradient of x drop where x has none)
    head             final norm as in the blocks, lm_head input C a if it trains, log-probs
                     N V f and targets N 8 (N = B T tokens: the labels are shifted, not the logits, so
                     the last position's row is kept too, masked), token ids 8 N if embeddings train

The first block's first norm keeps nothing when nothing before it trains (its input has no
gradient). With --grad-checkpointing each block keeps only its input (C f: the residual
stream stays fp32 under autocast), and one block's activations exist again while its
backward runs (Chen et al. 2016, "Training Deep Nets with Sublinear Memory Cost").
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch.nn as nn

from trainers.models import attention

if TYPE_CHECKING:                  # plan.py imports this file; the config is only an annotation here
    from trainers.plan import PlanConfig

F32 = 4                            # bytes of a float32 (f in the formulas)


def chunked_attention(config, cfg: PlanConfig, a: int) -> bool:
    """Whether a LLaMA step runs trainers/models/attention.py's kernel (its `applies`, for the
    planner's inputs: no padding mask, no dropout)."""
    return (cfg.device == "cpu" and a == F32 and config.head_dim <= attention.MAX_HEAD_DIM
            and cfg.seq >= attention.MIN_SEQ_LEN and config.dropout == 0.0)


def activation_bytes(family: str, config, model: nn.Module, cfg: PlanConfig, method: str,
                     targets: list[str], quantized: dict, a: int, w: int) -> tuple[int, int, int]:
    """(without checkpointing, with checkpointing, log-probs) bytes saved for backward."""
    B, T = cfg.batch, cfg.seq
    N, V = B * T, config.vocab_size
    full = method == "full"
    adapted = set(targets)
    blocks = model.transformer.h if family == "gpt2" else model.model.layers
    prefix = "transformer.h" if family == "gpt2" else "model.layers"
    per_block = []
    input_grad = full                                      # does block 0's input carry a gradient?
    for i, _ in enumerate(blocks):
        def trains(*names):
            return full or any(f"{prefix}.{i}.{n}" in adapted for n in names)
        per_token, once = 0, 0
        if family == "gpt2":
            C, h = config.n_embd, config.n_head
            norm = (C + 2) * F32
            per_token += 4 * C * a + h * F32 + 4 * C * a                     # q, k, v, out, lse; GELU input
            per_token += (C * a) * trains("attn.c_attn") + (C * a) * trains("mlp.c_fc")
            per_token += (4 * C * a) * trains("mlp.c_proj")
        else:
            C, h, H = config.dim, config.n_heads, config.hidden_dim
            K = config.n_kv_heads * config.head_dim
            norm = (C + 1) * F32 + (C * a if full else 0)
            if chunked_attention(config, cfg, a):                          # q, k, v; o_proj's input
                per_token += C * a + 2 * K * a + 2 * H * a + (C * a) * trains("self_attn.o_proj")
            else:
                per_token += 2 * C * a + 2 * K * a + h * F32 + 2 * H * a     # q, out, k, v, lse; SwiGLU
            per_token += (C * a) * trains("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")
            per_token += (C * a) * trains("mlp.gate_proj", "mlp.up_proj") + (H * a) * trains("mlp.down_proj")
        per_token += norm + (norm if input_grad else 0)
        for name in (n for n in targets if n.startswith(f"{prefix}.{i}.")):
            out_f, in_f = model.get_submodule(name).weight.shape
            r = cfg.rank
            # does x reach this layer with a gradient? (the block's first Linears read its input)
            grad_in = int(input_grad or not name.endswith(("c_attn", "q_proj", "k_proj", "v_proj")))
            if method == "hira":
                once += out_f * in_f * a * (grad_in + int(name in quantized))
                continue
            per_token += r * a
            if method == "dora":
                per_token += 2 * out_f * a
                once += (2 + grad_in) * out_f * F32            # m / ||V||, ||V|| (and c - 1)
            elif method == "sparse":
                once += r * (in_f + out_f) * w                 # the masked factors
            elif method == "adalora":
                once += r * F32 + grad_in * r * in_f * w       # Λ * mask, the masked A
        per_block.append(N * per_token + once)
        input_grad = True
    # head: final norm, lm_head input, log-probs, targets; embeddings' token ids; RoPE tables
    C = config.n_embd if family == "gpt2" else config.dim
    head = N * ((C + 2) * F32 if family == "gpt2" else (C + 1) * F32 + (C * a if full else 0))
    head += N * C * a if full else 0
    log_probs = N * V * F32
    head += log_probs + N * 8 + F32                      # + the loss weight total, a scalar
    if full:
        head += N * 8 + (T * 8 if family == "gpt2" else 0)
    if family == "llama":
        head += 2 * T * config.head_dim * F32
    plain = sum(per_block) + head
    checkpointed = len(per_block) * N * C * F32 + max(per_block) + head
    return plain, checkpointed, log_probs
