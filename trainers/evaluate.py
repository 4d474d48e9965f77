"""Evaluation of a trained model on a task's eval split: `evaluate = make_evaluator(data)`.

    classification  accuracy (and F1 for two classes) of the argmax of the logits
    lm              token-weighted loss and perplexity of the next-token prediction
    qa              SQuAD exact match / F1 of the best span inside the context
    summarization   ROUGE-L of greedy continuations of the prompt

The model may be one of trainers.models (returns (logits, loss), takes `targets=`) or a
transformers model (returns a ModelOutput with `.logits` / `.loss`, takes `labels=`): the
same readers as the training loop decide (trainers.train: `_label_keywords`, `_loss_of`,
`logits_of`).
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn as nn

from lora.layout import module_device
from trainers import metrics
from trainers.train import _label_keywords, _loss_of, logits_of


def _span_logits(output) -> torch.Tensor:
    """(B, T, 2) start/end logits: trainers.models' QA heads give them stacked, transformers'
    give `.start_logits` and `.end_logits`."""
    if hasattr(output, "start_logits") and hasattr(output, "end_logits"):
        return torch.stack([output.start_logits, output.end_logits], dim=-1)
    return logits_of(output)


def make_evaluator(data, *, tokenizer=None, batch_size: int = 32, max_examples: int | None = None,
                   max_new_tokens: int = 16) -> Callable[[nn.Module], dict]:
    """evaluate(model) -> {metric: value} on the eval split of a trainers.data.TaskData (the
    first `max_examples` examples; None: all). qa and summarization need the tokenizer to turn
    tokens back into text."""
    kind = data.spec.kind
    n = data.num_examples("eval") if max_examples is None else min(max_examples, data.num_examples("eval"))
    if n == 0:
        raise ValueError(f"evaluate: the eval split of {data.spec.name} is empty")
    if kind in ("qa", "summarization") and tokenizer is None:
        raise ValueError(f"evaluate: a {kind} task needs the tokenizer to score text")

    def batches(device):
        for start in range(0, n, batch_size):
            batch = data.collate("eval", list(range(start, min(n, start + batch_size))))
            yield {k: v.to(device) for k, v in batch.items()}

    @torch.no_grad()
    def evaluate(model: nn.Module) -> dict:
        device = module_device(model)
        if kind in ("classification", "pair_classification"):
            preds, labels = [], []
            for b in batches(device):
                logits = logits_of(model(b["input_ids"], attention_mask=b["attention_mask"]))
                preds += logits.argmax(-1).tolist()
                labels += b["labels"].tolist()
            out = {"accuracy": metrics.accuracy(preds, labels)}
            if data.spec.num_labels == 2:
                out["f1"] = metrics.f1_score(preds, labels)
            return out
        if kind == "lm":
            nll, count = 0.0, 0
            label_keywords = _label_keywords(model)
            for b in batches(device):
                loss = _loss_of(model(b["input_ids"], attention_mask=b["attention_mask"],
                                      **label_keywords(b["labels"])))
                predicted = int(((b["labels"][:, 1:] != -100) & (b["attention_mask"][:, 1:] != 0)).sum())
                nll, count = nll + float(loss) * predicted, count + predicted
            return {"loss": nll / count, "perplexity": metrics.perplexity(nll / count)}
        if kind == "qa":                  # the best span inside the context (TaskData.qa_predictions)
            preds, truths = [], []
            for b in batches(device):
                logits = _span_logits(model(b["input_ids"], attention_mask=b["attention_mask"]))   # (B, T, 2)
                preds += data.qa_predictions("eval", b["index"], logits[..., 0], logits[..., 1], tokenizer)
                truths += [data.eval["answers"][i] for i in b["index"].tolist()]
            return {k: float(v) for k, v in metrics.squad_scores(preds, truths).items()}
        if kind == "summarization":
            cands, refs = [], []
            for i in range(n):
                prompt = torch.tensor([data.eval["prompt_ids"][i]], device=device)
                out = model.generate(prompt, max_new_tokens, temperature=0.0)[0, prompt.shape[1]:].tolist()
                eos = getattr(tokenizer, "eos_id", None)
                cands.append(tokenizer.decode(out[:out.index(eos)] if eos in out else out))
                refs.append(data.eval["references"][i])
            return {"rouge_l": metrics.mean_rouge_l(cands, refs)}
        raise ValueError(f"evaluate: no evaluation for task kind {kind!r}")
    return evaluate
