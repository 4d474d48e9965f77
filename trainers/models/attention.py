"""Causal attention for small heads on the CPU: in cache-sized chunks, probabilities recomputed
in backward.

    O = softmax(Q K^T / sqrt(d) + causal mask) V          per query head; GQA: groups of G query
                                                         heads share one key/value head

Why it exists: PyTorch's fused CPU kernel behind F.scaled_dot_product_attention (a flash-attention
kernel) is slow at head size 8, stories260K's. Measured (torch 2.13, one thread, batch 8 x 128,
8 query and 4 kv heads, forward + backward): 7.6 ms at head size 8 against 5.0 ms at head size 16,
twice the work. The textbook three-op version (scores, softmax, weighted sum over the whole
batch) was slower still, 12 ms: each (B, H, T, T) pass streams 4 MiB through memory, and
autograd keeps the probabilities, 4 MiB per layer. This module computes the same thing in
5.8 ms (0.66-0.77x the fused kernel for T from 64 to 512 at head size 2-8; 1.06x at 12 and
1.3-1.8x at 16-64, so `applies` takes it only for head size <= 8 and T >= 64):

  * chunks: the (batch, kv head) pairs are taken a few at a time, so that one chunk's scores
    (chunk, G T, T) are ~256 KiB and every pass over them runs in the core's cache;
  * recomputation (the idea of FlashAttention, Dao et al. 2022, arXiv:2205.14135, at the
    grain of a chunk rather than a tile): backward recomputes each chunk's probabilities from
    the saved Q, K, V, so nothing of size T x T is kept between forward and backward;
  * layouts: the G query heads of a kv head are stacked as rows, (B nkv, G T, d), so K and V
    are read once per group and never copied G times; products whose result would be
    d = 8 columns wide are computed transposed (d rows, long side as columns), which BLAS ran
    ~4x faster here.

Backward, per chunk, with P = softmax(S), S = scale Q K^T + mask, dO the output gradient:

    dV = P^T dO,   dP = dO V^T,   dS = P * (dP - rowsum(dP * P)),   dQ = scale dS K,   dK = scale dS^T Q

Used by the LLaMA attention (trainers/models/llama.py) through `attention`, which falls back to
F.scaled_dot_product_attention whenever `applies` is False. Under create_graph (Hessian-vector
products) backward differentiates the textbook formula instead, so second derivatives are exact.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from quantization.codebooks import is_compiling

MAX_HEAD_DIM = 8         # the fused kernel wins from head size 12 up (module docstring)
MIN_SEQ_LEN = 64         # shorter: the per-chunk Python overhead costs more than it saves
CHUNK_FLOATS = 1 << 16   # scores per chunk: 64 Ki floats = 256 KiB, about a core's L2 cache


def attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None = None, dropout_p: float = 0.0) -> Tensor:
    """softmax(q k^T / sqrt(d) + mask) v, causal when `mask` is None; q (B, H, T, d), k and v
    (B, H_kv, T_k, d) with H a multiple of H_kv (grouped-query attention). Returns (B, H, T, d)."""
    if applies(q, k, v, mask, dropout_p):
        return _ChunkedCausalAttention.apply(q, k, v)
    gqa = {"enable_gqa": True} if k.shape[1] != q.shape[1] else {}
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None,
                                          dropout_p=dropout_p, **gqa)


def applies(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, dropout_p: float) -> bool:
    """Whether `attention` uses this module's kernel: causal self-attention without a mask or
    dropout, float32 on the CPU, head size <= MAX_HEAD_DIM, T >= MIN_SEQ_LEN, as many keys as
    queries (no KV cache in use), the fused SDPA kernels allowed (`sdpa_kernel(SDPBackend.MATH)`
    asks for the plain one: this is not it), and not inside torch.compile (which has its own)."""
    if is_compiling():                                     # first: dynamo cannot trace the flag below
        return False
    T = q.shape[-2]
    return (mask is None and dropout_p == 0.0 and q.device.type == "cpu"
            and q.dtype == k.dtype == v.dtype == torch.float32
            and q.shape[-1] <= MAX_HEAD_DIM and T >= MIN_SEQ_LEN and k.shape[-2] == T
            and q.shape[1] % k.shape[1] == 0
            and torch.backends.cuda.flash_sdp_enabled())      # the flag sdpa_kernel sets, on any device


def textbook(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """The same causal attention in three differentiable ops (what create_graph differentiates)."""
    B, H, T, d = q.shape
    G = H // k.shape[1]
    k, v = k.repeat_interleave(G, dim=1), v.repeat_interleave(G, dim=1)     # (B, H, T, d)
    scores = q @ k.transpose(-1, -2) / math.sqrt(d) + _causal_mask(T, 1, q)  # (B, H, T, T)
    return scores.softmax(-1) @ v


def _causal_mask(T: int, G: int, like: Tensor) -> Tensor:
    """(G T, T) additive mask: 0 where row t mod T may see key s (s <= t), -inf above."""
    mask = torch.full((T, T), float("-inf"), dtype=like.dtype, device=like.device).triu_(1)
    return mask.repeat(G, 1) if G > 1 else mask


def _grouped(q: Tensor, k: Tensor, v: Tensor) -> tuple:
    """q (B, H, T, d) as (B nkv, G T, d): the G query heads of each kv head stacked as rows; k, v
    (B, nkv, T, d) as (B nkv, T, d); the (G T, T) mask, 1/sqrt(d), and the pairs per chunk."""
    B, H, T, d = q.shape
    nkv = k.shape[1]
    G = H // nkv
    chunk = max(1, CHUNK_FLOATS // (G * T * T))
    return (q.reshape(B * nkv, G * T, d), k.reshape(B * nkv, T, d), v.reshape(B * nkv, T, d),
            _causal_mask(T, G, q), 1.0 / math.sqrt(d), chunk)


def _chunks(chunk: int, *tensors: Tensor):
    """Matching views of `chunk` (batch, kv head) pairs at a time (the leading dimension) of each tensor."""
    return zip(*(t.split(chunk) for t in tensors))


def _probabilities(q: Tensor, k_t: Tensor, mask: Tensor, scale: float, out: Tensor) -> Tensor:
    """P = softmax(scale Q K^T + mask) of one chunk, written into `out` (chunk, G T, T)."""
    torch.baddbmm(mask, q, k_t, alpha=scale, out=out)
    return torch.softmax(out, -1, out=out)


class _ChunkedCausalAttention(torch.autograd.Function):
    """The module docstring's forward and backward; saves Q, K, V only."""

    @staticmethod
    def forward(ctx, q, k, v):
        B, H, T, d = q.shape
        nkv = k.shape[1]
        G, pairs = H // nkv, B * nkv
        q3, k3, v3, mask, scale, chunk = _grouped(q, k, v)
        o_t = q.new_empty(pairs, d, G * T)                 # O^T per pair: d rows, the long side as columns
        scores = q.new_empty(min(chunk, pairs), G * T, T)  # one buffer, reused by every chunk
        for q_c, k_t, v_t, o_c in _chunks(chunk, q3, k3.transpose(1, 2), v3.transpose(1, 2), o_t):
            p = _probabilities(q_c, k_t, mask, scale, scores[:len(q_c)])
            torch.bmm(v_t, p.transpose(1, 2), out=o_c)                          # O^T = V^T P^T
        ctx.save_for_backward(q, k, v)
        # (B, T, H, d) memory, returned as (B, H, T, d): the caller's transpose back is then free
        out = q.new_empty(B, T, H, d)
        out.view(B, T, nkv, G, d).copy_(o_t.view(B, nkv, d, G, T).permute(0, 4, 1, 3, 2))
        return out.transpose(1, 2)

    @staticmethod
    def backward(ctx, do):
        q, k, v = ctx.saved_tensors
        if torch.is_grad_enabled():   # create_graph: the saved q, k, v carry their history
            return torch.autograd.grad(textbook(q, k, v), (q, k, v), do, create_graph=True)
        B, H, T, d = q.shape
        nkv = k.shape[1]
        G, pairs = H // nkv, B * nkv
        q3, k3, v3, mask, scale, chunk = _grouped(q, k, v)
        do3 = do.reshape(pairs, G * T, d)
        dq_t, dk_t, dv_t = q.new_empty(pairs, d, G * T), q.new_empty(pairs, d, T), q.new_empty(pairs, d, T)
        scores, dp, ds = (q.new_empty(min(chunk, pairs), G * T, T) for _ in range(3))
        for q_c, k_c, v_t, do_c, dq_c, dk_c, dv_c in _chunks(chunk, q3, k3, v3.transpose(1, 2), do3,
                                                            dq_t, dk_t, dv_t):
            m = len(q_c)
            p = _probabilities(q_c, k_c.transpose(1, 2), mask, scale, scores[:m])   # P again
            torch.bmm(do_c.transpose(1, 2), p, out=dv_c)                        # dV^T = dO^T P
            torch.bmm(do_c, v_t, out=dp[:m])                                    # dP = dO V^T
            torch.ops.aten._softmax_backward_data.out(dp[:m], p, -1, p.dtype, grad_input=ds[:m])   # dS
            torch.bmm(k_c.transpose(1, 2), ds[:m].transpose(1, 2), out=dq_c)    # dQ^T = K^T dS^T
            torch.bmm(q_c.transpose(1, 2), ds[:m], out=dk_c)                    # dK^T = Q^T dS
        dq = dq_t.view(B, nkv, d, G, T).permute(0, 1, 3, 4, 2).reshape(B, H, T, d).mul_(scale)
        dk = dk_t.transpose(1, 2).reshape(B, nkv, T, d).mul_(scale)
        dv = dv_t.transpose(1, 2).reshape(B, nkv, T, d)
        return dq, dk, dv
