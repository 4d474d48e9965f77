"""Token-level helpers that must survive any tokenizer: fitting texts into `max_length`, and mapping a
character span (a SQuAD answer) onto token positions.

Only the small tokenizer protocol is assumed (`encode(text, pair=None) -> list[int]`, `eos_id`,
`sep_id`), so special tokens (CLS/SEP, BOS) stay wherever the tokenizer puts them.

Answer spans, two ways:
1. offsets: when the tokenizer wraps a `tokenizers.Tokenizer` (or is one) whose pair encoding gives
   the same ids, its per-token character offsets and sequence ids locate the answer directly: the
   first context token ending after the answer start, the last one starting before the answer end.
2. prefix tokenization (any tokenizer): encode (question, context[:start]) and compare it with the
   full encoding. The two agree on a common prefix of m tokens and differ from index m on, so the
   answer starts at token m (either a clean boundary, or the token that straddles `start`). The
   end works the same with context[:end]; when every context token of the prefix encoding matched,
   the answer ends at m - 1, else at m (the token straddling `end`).
The test checks that both ways decode back to the answer text.
"""
from __future__ import annotations

import math
import random
import re


def encode(tok, text: str, pair: str | None = None) -> list[int]:
    return list(tok.encode(text) if pair is None else tok.encode(text, pair))


def specials(tok) -> set[int]:
    """Ids that tokenizers append after the text (EOS, SEP)."""
    return {i for i in (getattr(tok, "eos_id", None), getattr(tok, "sep_id", None)) if i is not None}


def fit(tok, text: str, pair: str | None, max_length: int) -> list[int]:
    """encode(text, pair) cut to max_length, keeping the special tokens at the ends.

    A single text is cut at the end (a final EOS/SEP stays last). For a pair, words are dropped from
    the end of the longer text ("longest first", as BERT did) and the pair re-encoded until it fits,
    so both texts keep their separators."""
    ids = encode(tok, text, pair)
    if len(ids) <= max_length:
        return ids
    if pair is None:
        return ids[:max_length - 1] + ids[-1:] if ids[-1] in specials(tok) else ids[:max_length]
    a, b = text.split(), pair.split()
    while len(ids) > max_length and (a or b):
        drop = max(1, (len(ids) - max_length) // 2)
        if len(a) >= len(b):
            a = a[:-drop]
        else:
            b = b[:-drop]
        ids = encode(tok, " ".join(a), " ".join(b))
    return ids[:max_length]


def common_prefix(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


def backend_of(tok):
    """The `tokenizers.Tokenizer` behind `tok`, if there is one (for offsets), else None."""
    try:
        from tokenizers import Tokenizer
    except ImportError:
        return None
    if isinstance(tok, Tokenizer):
        return tok
    for attr in ("backend", "tokenizer", "hf_tokenizer", "_tokenizer", "tk"):
        inner = getattr(tok, attr, None)
        if isinstance(inner, Tokenizer):
            return inner
    return None


def span_by_offsets(backend, ids, question, context, start, end):
    enc = backend.encode(question, context)
    if list(enc.ids) != ids:
        return None      # the wrapper adds or changes tokens: offsets would not line up
    ctx = [i for i, s in enumerate(enc.sequence_ids) if s == 1]
    first = [i for i in ctx if enc.offsets[i][1] > start]
    last = [i for i in ctx if enc.offsets[i][0] < end]
    if not first or not last:
        return None
    return first[0], last[-1]


def span_by_prefix(tok, ids, question, context, start, end):
    trail = 0
    while trail < len(ids) and ids[len(ids) - 1 - trail] in specials(tok):
        trail += 1
    s = common_prefix(encode(tok, question, context[:start]), ids)
    pre_end = encode(tok, question, context[:end])
    m = common_prefix(pre_end, ids)
    e = m - 1 if len(pre_end) - m == trail else m
    return s, e


def answer_span(tok, question: str, context: str, start: int, end: int, ids: list[int] | None = None):
    """(ids, start_token, end_token) of the answer context[start:end] in encode(question, context);
    the end token is inclusive."""
    ids = encode(tok, question, context) if ids is None else ids
    backend = backend_of(tok)
    span = span_by_offsets(backend, ids, question, context, start, end) if backend is not None else None
    if span is None:
        span = span_by_prefix(tok, ids, question, context, start, end)
    return ids, span[0], span[1]


def fit_qa(tok, question: str, context: str, start: int, end: int, max_length: int, rng: random.Random):
    """(ids, start_token, end_token, window_text) with len(ids) <= max_length, or None if the answer
    cannot fit.

    A context too long for max_length is cut to a window of whole words that contains the answer;
    where the answer sits in the window is drawn from `rng`, so that its position is not a give-away
    (one window per question, not the sliding windows of BERT's SQuAD code: simpler, and enough to
    train and compare adapters; long contexts lose some of their text)."""
    ids = encode(tok, question, context)
    if len(ids) > max_length:
        words = [(m.start(), m.end()) for m in re.finditer(r"\S+", context)]
        ws = next(i for i, w in enumerate(words) if w[1] > start)
        we = max(i for i, w in enumerate(words) if w[0] < end)
        q_len = len(encode(tok, question, ""))
        if q_len + (we - ws + 1) > max_length:
            return None
        keep = max(we - ws + 1, int(len(words) * (max_length - q_len) / max(1, len(ids) - q_len)))
        offset = rng.random()    # where the answer sits in the window, drawn once per question
        while True:
            slack = keep - (we - ws + 1)
            if slack < 0:
                return None
            a = min(max(0, ws - int(offset * (slack + 1))), len(words) - keep)
            window = context[words[a][0]:words[a + keep - 1][1]]
            ids = encode(tok, question, window)
            if len(ids) <= max_length:
                break
            per_word = max(1.0, (len(ids) - q_len) / keep)
            keep -= max(1, math.ceil((len(ids) - max_length) / per_word))
        start, end, context = start - words[a][0], end - words[a][0], window
    ids, s, e = answer_span(tok, question, context, start, end, ids)
    if not 0 <= s <= e < len(ids):
        return None
    return ids, s, e, context
