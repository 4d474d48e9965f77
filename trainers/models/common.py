"""What the transformer models here share: the attention mask built from a padding
mask, the shifted next-token loss, the task heads' pooling and span loss, and, for the
causal models, the key/value cache and sampling.

Masks follow `F.scaled_dot_product_attention`'s boolean convention: True means
"this query may attend to this key".
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

IGNORE_INDEX = -100  # label value that contributes nothing to a loss (same as HF and F.cross_entropy)


def attention_mask_4d(attention_mask: Tensor | None, T: int, causal: bool) -> Tensor | None:
    """(B, T) padding mask (1 = real token, 0 = padding) -> (B, 1, T, T) bool mask, or None.

    None means "no padding": callers then use `is_causal=True` (the fast SDPA path).
    A query that could see no key at all (a padded position before the first real token
    under left padding) sees itself instead: a fully masked softmax row would be NaN.
    That changes only outputs at padded positions, which nothing downstream reads.
    """
    if attention_mask is None:
        return None
    if attention_mask.shape[-1] != T:
        raise ValueError(f"attention_mask: expected (B, {T}) to match input_ids, got {tuple(attention_mask.shape)}")
    device = attention_mask.device
    mask = attention_mask.bool()[:, None, None, :].expand(-1, 1, T, T)  # (B, 1, T, T) which keys are real
    if causal:
        mask = mask & torch.ones(T, T, dtype=torch.bool, device=device).tril()  # (B, 1, T, T)
    blind = ~mask.any(dim=-1, keepdim=True)  # (B, 1, T, 1) queries with no visible key
    return mask | (blind & torch.eye(T, dtype=torch.bool, device=device))  # (B, 1, T, T)


def next_token_loss(logits: Tensor, labels: Tensor) -> Tensor:
    """Cross-entropy of position t's logits against the label at t+1.

    logits (B, T, V), labels (B, T) aligned with the inputs (HF `labels` convention):
    the shift happens here, and labels equal to -100 are ignored.

    Speed: the labels are shifted, not the logits. Slicing logits[:, :-1] made a copy of
    the (B, T-1, V) logits to flatten them, and a zero-filled (B, T, V) gradient in backward
    to scatter it back; padding the shifted labels with IGNORE_INDEX at the last position
    gives the same mean over the same terms with a view (GPT-2 small, batch 4 x 128: two
    100 MiB copies fewer per step).
    """
    V = logits.size(-1)
    shifted = F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)  # (B, T): position t's target is token t+1
    return F.cross_entropy(logits.reshape(-1, V).float(), shifted.reshape(-1), ignore_index=IGNORE_INDEX)


def last_real_token(input_ids: Tensor, attention_mask: Tensor | None, pad_token_id: int | None) -> Tensor:
    """(B,) index of each row's last real token: what a causal classifier reads, since only
    that position has seen the whole sequence.

    Real means attention_mask == 1 when a mask is given; else not pad_token_id (HF's rule,
    which sees a pad id inside the text as padding); else every position. The rightmost
    real position wins, so left and right padding both work.
    """
    if attention_mask is not None:
        real = attention_mask.bool()  # (B, T)
    elif pad_token_id is not None:
        real = input_ids != pad_token_id
    else:
        real = torch.ones_like(input_ids, dtype=torch.bool)
    positions = torch.arange(input_ids.size(1), device=input_ids.device)  # (T,)
    return (positions * real).argmax(dim=-1)  # (B,)


def classify_last_token(h: Tensor, input_ids: Tensor, attention_mask: Tensor | None, pad_token_id: int | None,
                        score, targets: Tensor | None) -> tuple[Tensor, Tensor | None]:
    """A causal model's classifier head: `score` at each row's last real token (see
    `last_real_token`); cross-entropy against targets (B,) with IGNORE_INDEX ignored.
    h (B, T, C) -> logits (B, num_labels)."""
    last = last_real_token(input_ids, attention_mask, pad_token_id)  # (B,)
    logits = score(h[torch.arange(h.size(0), device=h.device), last])  # (B, num_labels)
    loss = None if targets is None else F.cross_entropy(logits.float(), targets, ignore_index=IGNORE_INDEX)
    return logits, loss


def span_loss(logits: Tensor, targets: Tensor) -> Tensor:
    """Extractive-QA loss: mean of the start and end cross-entropies over positions
    (Devlin et al., 2019, BERT, §4.2).

    logits (B, T, 2), [..., 0] = start, [..., 1] = end; targets (B, 2) the (start, end)
    token positions. A position outside [0, T) (e.g. -100: "the answer is not in this
    window") is ignored.
    """
    T = logits.size(1)
    targets = targets.masked_fill((targets < 0) | (targets >= T), IGNORE_INDEX)  # (B, 2)
    start = F.cross_entropy(logits[..., 0].float(), targets[:, 0], ignore_index=IGNORE_INDEX)
    end = F.cross_entropy(logits[..., 1].float(), targets[:, 1], ignore_index=IGNORE_INDEX)
    return (start + end) / 2


class KVCache:
    """Keys and values of the positions already processed, per layer, so that generating
    one more token costs one position's forward pass instead of the whole context's."""

    def __init__(self):
        self.keys: dict[int, Tensor] = {}  # layer index -> (B, n_kv_heads, T_past, hs)
        self.values: dict[int, Tensor] = {}

    @property
    def length(self) -> int:
        """How many positions are cached (the position of the next token)."""
        return self.keys[0].size(2) if self.keys else 0

    def append(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Add this step's k, v (B, nh, T, hs) to layer's cache; return all of them so far."""
        if layer in self.keys:
            k = torch.cat((self.keys[layer], k), dim=2)  # (B, nh, T_past + T, hs)
            v = torch.cat((self.values[layer], v), dim=2)
        self.keys[layer], self.values[layer] = k, v
        return k, v


def cached_causal_mask(cache: KVCache | None, attention_mask: Tensor | None, T: int, device) -> Tensor | None:
    """The attention mask of a causal model for T new positions after cache.length cached ones.

    Without a cache (or with an empty one) this is `attention_mask_4d`; after cached
    positions, new query t (absolute position past + t) sees keys 0..past + t, so the mask
    is (T, past + T) lower-triangular shifted right by past. Padding masks are for training
    and scoring; generation with a cache takes unpadded prompts.
    """
    past = 0 if cache is None else cache.length
    if past == 0:
        return attention_mask_4d(attention_mask, T, causal=True)
    if attention_mask is not None:
        raise ValueError("attention_mask cannot be combined with a filled KV cache; generate from unpadded prompts")
    return torch.ones(T, past + T, dtype=torch.bool, device=device).tril(diagonal=past)  # (T, past + T)


@torch.no_grad()
def generate(model, idx: Tensor, max_new_tokens: int, temperature: float = 1.0,
             top_k: int | None = None, block_size: int | None = None) -> Tensor:
    """Append `max_new_tokens` tokens to idx (B, T) and return (B, T + max_new_tokens).

    temperature 0 picks the most likely token (greedy); otherwise sample from
    softmax(logits / temperature), restricted to the top_k most likely tokens when
    top_k is given. The model runs in whatever mode it is in: call `model.eval()` first.
    The prompt is processed once into a KV cache, then each step feeds only the newest
    token. Past `block_size` tokens the context is cropped to the last block_size ones
    and recomputed every step, as in nanoGPT (positions are baked into cached keys).
    """
    if temperature < 0:
        raise ValueError(f"generate: temperature must be >= 0, got {temperature}")
    block_size = block_size or idx.size(1) + max_new_tokens
    cache = KVCache()
    logits, _ = model(idx[:, -block_size:], cache=cache)
    for step in range(max_new_tokens):
        logits = logits[:, -1, :].float()  # (B, V)
        if temperature == 0:
            next_id = logits.argmax(dim=-1, keepdim=True)  # (B, 1)
        else:
            logits = logits / temperature
            if top_k is not None:
                v, _ = torch.topk(logits, min(top_k, logits.size(-1)))
                logits[logits < v[:, [-1]]] = -float("inf")
            next_id = torch.multinomial(F.softmax(logits, dim=-1), num_samples=1)  # (B, 1)
        idx = torch.cat((idx, next_id), dim=1)
        if step == max_new_tokens - 1:
            break
        if idx.size(1) <= block_size:
            logits, _ = model(next_id, cache=cache)  # (B, 1, V): one new position
        else:
            logits, _ = model(idx[:, -block_size:])  # (B, block_size, V): the window slid
    return idx
