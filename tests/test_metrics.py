"""Metrics on examples worked out by hand (the arithmetic is in the comments), plus two-way checks."""
import itertools
import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from trainers.metrics import (accuracy, classification_scores, f1_score, lcs_length, mean_rouge_l,
                              normalize_answer, perplexity, rouge_l, squad_exact_match, squad_f1,
                              squad_scores)


def test_accuracy_by_hand():
    # preds 1 0 1 1 / labels 1 1 1 0: right at positions 0 and 2 -> 2/4
    assert accuracy([1, 0, 1, 1], [1, 1, 1, 0]) == 0.5
    assert accuracy(torch.tensor([[2, 2], [0, 1]]), torch.tensor([2, 2, 0, 1])) == 1.0
    with pytest.raises(ValueError, match="equal, non-zero lengths"):
        accuracy([1], [1, 0])


def test_binary_f1_by_hand():
    # preds  1 1 0 1 0 0
    # labels 1 0 0 1 1 0
    # tp = {0, 3} = 2, fp = {1} = 1, fn = {4} = 1 -> P = R = 2/3 -> F1 = 2/3
    assert f1_score([1, 1, 0, 1, 0, 0], [1, 0, 0, 1, 1, 0]) == pytest.approx(2 / 3)
    # positive class 0 instead: tp = {2, 5} = 2, fp = {4} = 1, fn = {1} = 1 -> 2/3 again
    assert f1_score([1, 1, 0, 1, 0, 0], [1, 0, 0, 1, 1, 0], pos_label=0) == pytest.approx(2 / 3)
    # never predicting the positive class: no true positive -> 0 (not a division by zero)
    assert f1_score([0, 0, 0], [1, 0, 1]) == 0.0


def test_macro_f1_by_hand():
    # preds  0 1 2 2 1 0
    # labels 0 1 1 2 2 0
    # class 0: tp 2, fp 0, fn 0 -> 1
    # class 1: tp 1 (pos 1), fp 1 (pos 4), fn 1 (pos 2) -> 2/(2+1+1) = 1/2
    # class 2: tp 1 (pos 3), fp 1 (pos 2), fn 1 (pos 4) -> 1/2
    # macro = (1 + 1/2 + 1/2) / 3 = 2/3
    assert f1_score([0, 1, 2, 2, 1, 0], [0, 1, 1, 2, 2, 0], average="macro") == pytest.approx(2 / 3)
    # with a 4th class never seen: its F1 is 0 and it counts -> (2) / 4 = 1/2
    assert f1_score([0, 1, 2, 2, 1, 0], [0, 1, 1, 2, 2, 0], average="macro", num_labels=4) == pytest.approx(0.5)
    assert classification_scores([0, 1, 2, 2, 1, 0], [0, 1, 1, 2, 2, 0], 3) == \
        {"accuracy": pytest.approx(4 / 6), "f1": pytest.approx(2 / 3)}


@settings(max_examples=30, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 1), st.integers(0, 1)), min_size=1, max_size=30))
def test_binary_f1_is_harmonic_mean_of_precision_and_recall(pairs):
    preds, labels = [p for p, _ in pairs], [y for _, y in pairs]
    tp = sum(p == y == 1 for p, y in pairs)
    precision = tp / max(1, sum(preds))
    recall = tp / max(1, sum(labels))
    expected = 0.0 if tp == 0 else 2 * precision * recall / (precision + recall)
    assert f1_score(preds, labels) == pytest.approx(expected)


def test_perplexity_two_ways():
    # uniform logits over V = 17 classes: the NLL of any target is ln 17, so perplexity is 17
    logits, targets = torch.zeros(5, 17), torch.arange(5)
    assert perplexity(F.cross_entropy(logits, targets).item()) == pytest.approx(17.0, rel=1e-6)
    assert perplexity(math.log(50)) == pytest.approx(50.0)
    assert perplexity(0.0) == 1.0
    with pytest.raises(ValueError, match="non-negative"):
        perplexity(float("nan"))


def test_squad_normalization_by_hand():
    assert normalize_answer("The  Denver Broncos!") == "denver broncos"
    assert normalize_answer("an apple a day") == "apple day"
    assert normalize_answer("the-end") == "theend"          # punctuation goes first, so no article is left
    assert normalize_answer("Theory") == "theory"           # "the" only as a whole word


def test_squad_em_and_f1_by_hand():
    truths = ["Denver Broncos", "the Denver Broncos", "Broncos"]
    assert squad_exact_match("The Denver Broncos.", truths) == 1.0
    # "Denver Broncos won" vs "Broncos": overlap 1, P = 1/3, R = 1 -> F1 = 2(1/3)(1)/(4/3) = 1/2;
    # vs "the Carolina Panthers": overlap 0 -> 0; the max over truths counts -> 1/2, EM 0
    assert squad_f1("Denver Broncos won", ["Broncos", "the Carolina Panthers"]) == pytest.approx(0.5)
    assert squad_exact_match("Denver Broncos won", ["Broncos", "the Carolina Panthers"]) == 0.0
    # repeated tokens: [cat, cat, sat] vs [cat, sat, on, mat]: overlap min(2,1) + 1 = 2,
    # P = 2/3, R = 2/4 -> F1 = 2 (1/3) / (7/6) = 4/7
    assert squad_f1("the cat the cat sat", "cat sat on mat") == pytest.approx(4 / 7)
    # two questions: EM (1 + 0)/2; F1 (1 + F1("broncos won", "broncos") = 2(1/2)(1)/(3/2) = 2/3)/2 = 5/6
    scores = squad_scores(["Denver Broncos", "Broncos won"], [["Denver Broncos"], ["Broncos"]])
    assert scores == {"exact_match": 0.5, "f1": pytest.approx(5 / 6)}
    assert squad_f1("", ["x"]) == 0.0


def test_rouge_l_lin_2004_example():
    # Lin (2004) sec. 3.1: reference "police killed the gunman"
    # S2 "police kill the gunman": LCS = police the gunman = 3 -> R = P = 3/4 -> F = 3/4
    # S3 "the gunman kill police": LCS = the gunman = 2 -> R = P = 2/4 -> F = 1/2
    ref = "police killed the gunman"
    assert rouge_l("police kill the gunman", ref) == pytest.approx(0.75)
    assert rouge_l("the gunman kill police", ref) == pytest.approx(0.5)
    # unequal lengths: cand "The cat sat." vs ref "the cat sat on the mat": LCS 3, P = 1, R = 1/2
    # beta 1: 2 (1/2)(1)/(3/2) = 2/3 ; beta 2: 5 (1/2)(1) / (1/2 + 4) = 5/9 (recall weighs more)
    assert rouge_l("The cat sat.", "the cat sat on the mat") == pytest.approx(2 / 3)
    assert rouge_l("The cat sat.", "the cat sat on the mat", beta=2.0) == pytest.approx(5 / 9)
    assert rouge_l("", ref) == 0.0 and rouge_l(ref, ref) == 1.0
    assert mean_rouge_l(["police kill the gunman", ref], [ref, ref]) == pytest.approx((0.75 + 1) / 2)


def _lcs_brute_force(a, b):
    # the longest subsequence of a (tried longest first) that is also a subsequence of b
    def is_subseq(s, t):
        it = iter(t)
        return all(x in it for x in s)
    for k in range(len(a), 0, -1):
        if any(is_subseq(s, b) for s in itertools.combinations(a, k)):
            return k
    return 0


@settings(max_examples=40, deadline=None)
@given(st.lists(st.integers(0, 3), max_size=7), st.lists(st.integers(0, 3), max_size=7))
def test_lcs_dynamic_programme_matches_brute_force(a, b):
    assert lcs_length(a, b) == _lcs_brute_force(a, b) == lcs_length(b, a)
