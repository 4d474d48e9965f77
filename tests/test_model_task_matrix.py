"""Every (model family x task kind) pair: either trainers.experiments.model_kind names a head
whose forward runs on a collated batch of that kind and gives a finite loss, or the pair is
refused with a ValueError that names both."""
import math

import pytest
import torch

from trainers.data import TASKS, TaskData
from trainers.experiments import model_kind
from trainers.models import MODELS, build_model

FAMILIES = ("gpt2", "distilbert", "llama")
KINDS = sorted({spec.kind for spec in TASKS.values()})
REFUSED = {("gpt2", "qa"), ("distilbert", "lm"), ("distilbert", "summarization")}  # no such head here


def batch_of(kind: str) -> dict:
    """A collated train batch of `kind` (right-padded, as TaskData.collate makes it)."""
    spec = next(s for s in TASKS.values() if s.kind == kind)
    seqs = [[5, 6, 7, 8, 9, 10, 11], [12, 13, 14, 15], [16, 17, 18, 19, 20, 21]]
    cols = {"input_ids": seqs}
    if kind in ("classification", "pair_classification"):
        cols["labels"] = [1, 0, spec.num_labels - 1]
    elif kind == "summarization":
        cols["labels"] = [[-100, -100, -100, 8, 9, 10, 11], [-100, -100, 14, 15], [-100, -100, -100, -100, 20, 21]]
    elif kind == "qa":
        cols["start_positions"], cols["end_positions"] = [3, 2, 4], [5, 3, 4]
    data = TaskData(spec, train=cols, eval=cols, pad_id=0, max_length=16, block_size=16,
                    source="test", eval_from="test")
    return data.collate("train", [0, 1, 2])


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("family", FAMILIES)
def test_every_family_and_task_kind_works_or_is_refused_by_name(family, kind):
    if (family, kind) in REFUSED:
        with pytest.raises(ValueError) as err:
            model_kind(family, kind)
        assert family in str(err.value) and kind in str(err.value)
        return
    name = model_kind(family, kind)
    assert name.split("-")[0] == family
    spec = next(s for s in TASKS.values() if s.kind == kind)
    overrides = {"num_labels": spec.num_labels} if name.endswith("-cls") else {}
    torch.manual_seed(0)
    model = build_model(name, MODELS[name][0].tiny(**overrides)).eval()
    batch = batch_of(kind)
    logits, loss = model(batch["input_ids"], batch["labels"], batch["attention_mask"])
    assert logits.shape[0] == 3 and loss.dim() == 0 and math.isfinite(loss.item())
    loss.backward()  # trainable end to end
    assert all(p.grad is not None for p in model.parameters())


def test_the_matrix_covers_every_task_kind():
    assert set(KINDS) == {"classification", "pair_classification", "lm", "qa", "summarization"}
