"""Evaluation metrics, written out so that each line can be checked by hand.

All scores are fractions in [0, 1] (multiply by 100 for the numbers papers print), except
perplexity, which is exp(mean negative log-likelihood per token) >= 1.

    accuracy(preds, labels)                     share of exact matches
    f1_score(preds, labels, average="binary")   F1 of the positive class, or "macro": mean over classes
    perplexity(mean_nll)                        exp of the mean token NLL (natural log)
    squad_exact_match / squad_f1                SQuAD v1.1 answer scores, max over the ground truths
    rouge_l(candidate, reference)               LCS-based F-measure (Lin, 2004)

SQuAD: Rajpurkar et al. 2016, "SQuAD: 100,000+ Questions for Machine Comprehension of Text"; the
answer normalisation is the one of the official evaluate-v1.1 script (lower case, drop punctuation,
drop the articles a/an/the, collapse white space). ROUGE-L: Lin 2004, "ROUGE: A Package for Automatic
Evaluation of Summaries", section 3.1: R = LCS/len(ref), P = LCS/len(cand),
F = (1 + beta^2) R P / (R + beta^2 P).
"""
from __future__ import annotations

import math
import re
import string
from collections import Counter
from typing import Iterable, Sequence

import torch


def _as_list(x) -> list:
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().reshape(-1).tolist()
    return list(x)


def accuracy(preds, labels) -> float:
    """Share of positions where preds == labels (lists, tuples or tensors of class ids)."""
    p, y = _as_list(preds), _as_list(labels)
    if len(p) != len(y) or not p:
        raise ValueError(f"accuracy: need equal, non-zero lengths, got {len(p)} predictions and {len(y)} labels")
    return sum(int(a == b) for a, b in zip(p, y)) / len(p)


def _f1_of_class(p: list, y: list, c) -> float:
    tp = sum(1 for a, b in zip(p, y) if a == c and b == c)
    fp = sum(1 for a, b in zip(p, y) if a == c and b != c)
    fn = sum(1 for a, b in zip(p, y) if a != c and b == c)
    return 0.0 if tp == 0 else 2 * tp / (2 * tp + fp + fn)   # = 2PR / (P + R)


def f1_score(preds, labels, average: str = "binary", pos_label=1, num_labels: int | None = None) -> float:
    """F1 = 2PR/(P+R). "binary": of class `pos_label`; "macro": unweighted mean over the classes
    0..num_labels-1 (or, without num_labels, over the classes seen in preds or labels). A class with
    no true positives scores 0 (scikit-learn's zero_division=0)."""
    p, y = _as_list(preds), _as_list(labels)
    if len(p) != len(y) or not p:
        raise ValueError(f"f1_score: need equal, non-zero lengths, got {len(p)} predictions and {len(y)} labels")
    if average == "binary":
        return _f1_of_class(p, y, pos_label)
    if average == "macro":
        classes = range(num_labels) if num_labels is not None else sorted(set(p) | set(y))
        return sum(_f1_of_class(p, y, c) for c in classes) / len(classes)
    raise ValueError(f"f1_score: average must be 'binary' or 'macro', got {average!r}")


def perplexity(mean_nll: float) -> float:
    """exp(mean NLL in nats per token); the NLL of a uniform guess over V tokens gives V."""
    mean_nll = float(mean_nll)
    if not mean_nll >= 0:
        raise ValueError(f"perplexity: mean NLL must be a non-negative number of nats, got {mean_nll}")
    return math.exp(min(mean_nll, 700.0))   # exp(709) overflows a float


# ---------------------------------------------------------------- SQuAD

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCT = set(string.punctuation)


def normalize_answer(s: str) -> str:
    """Lower case, drop punctuation, drop the articles a/an/the, collapse white space (the official
    SQuAD v1.1 order: punctuation goes before articles are matched)."""
    s = "".join(ch for ch in s.lower() if ch not in _PUNCT)
    s = _ARTICLES.sub(" ", s)
    return " ".join(s.split())


def _em_one(pred: str, truth: str) -> float:
    return float(normalize_answer(pred) == normalize_answer(truth))


def _f1_one(pred: str, truth: str) -> float:
    p, t = normalize_answer(pred).split(), normalize_answer(truth).split()
    common = sum((Counter(p) & Counter(t)).values())   # bag-of-tokens overlap
    if common == 0:
        return 0.0
    precision, recall = common / len(p), common / len(t)
    return 2 * precision * recall / (precision + recall)


def _truths(ground_truths) -> list[str]:
    truths = [ground_truths] if isinstance(ground_truths, str) else list(ground_truths)
    if not truths:
        raise ValueError("squad metric: a question needs at least one ground-truth answer")
    return truths


def squad_exact_match(prediction: str, ground_truths) -> float:
    """1.0 if the normalised prediction equals any normalised ground truth, else 0.0."""
    return max(_em_one(prediction, t) for t in _truths(ground_truths))


def squad_f1(prediction: str, ground_truths) -> float:
    """Token-overlap F1 against each ground truth, the best one counts."""
    return max(_f1_one(prediction, t) for t in _truths(ground_truths))


def squad_scores(predictions: Sequence[str], ground_truths: Sequence) -> dict[str, float]:
    """Mean exact match and F1 over questions: {"exact_match", "f1"} as fractions."""
    if len(predictions) != len(ground_truths) or not predictions:
        raise ValueError(f"squad_scores: need equal, non-zero lengths, got {len(predictions)} "
                         f"predictions and {len(ground_truths)} answer lists")
    n = len(predictions)
    return {"exact_match": sum(squad_exact_match(p, t) for p, t in zip(predictions, ground_truths)) / n,
            "f1": sum(squad_f1(p, t) for p, t in zip(predictions, ground_truths)) / n}


# ---------------------------------------------------------------- ROUGE-L

def rouge_tokens(text: str) -> list[str]:
    """Lower-cased runs of letters and digits (punctuation is not a token)."""
    return re.findall(r"[a-z0-9]+", text.lower())


def lcs_length(a: Sequence, b: Sequence) -> int:
    """Length of the longest common subsequence, O(len(a) len(b)) dynamic programme, one row kept."""
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0]
        for j, y in enumerate(b):
            cur.append(prev[j] + 1 if x == y else max(prev[j + 1], cur[j]))
        prev = cur
    return prev[-1]


def rouge_l(candidate: str, reference: str, beta: float = 1.0) -> float:
    """ROUGE-L F-measure of one candidate against one reference (Lin 2004, sec. 3.1).
    beta = 1 weighs recall and precision equally (as the rouge-score package does)."""
    c, r = rouge_tokens(candidate), rouge_tokens(reference)
    lcs = lcs_length(c, r)
    if lcs == 0:
        return 0.0
    recall, precision = lcs / len(r), lcs / len(c)
    return (1 + beta ** 2) * recall * precision / (recall + beta ** 2 * precision)


def mean_rouge_l(candidates: Iterable[str], references: Iterable[str], beta: float = 1.0) -> float:
    """Mean sentence-level ROUGE-L over pairs."""
    c, r = list(candidates), list(references)
    if len(c) != len(r) or not c:
        raise ValueError(f"mean_rouge_l: need equal, non-zero lengths, got {len(c)} and {len(r)}")
    return sum(rouge_l(x, y, beta) for x, y in zip(c, r)) / len(c)


def classification_scores(preds, labels, num_labels: int) -> dict[str, float]:
    """{"accuracy", "f1"}: binary F1 of class 1 for two classes, macro F1 for more."""
    average = "binary" if num_labels == 2 else "macro"
    return {"accuracy": accuracy(preds, labels),
            "f1": f1_score(preds, labels, average=average, num_labels=None if num_labels == 2 else num_labels)}
