"""Tasks: a name -> tokenized train/eval splits, and padded batches of tensors.

    data = load_task("sst2", tokenizer, max_length=128, limit=1000)
    for batch in data.batches("train", batch_size=16, shuffle=True, seed=0):
        logits, loss = model(batch["input_ids"], batch["labels"], batch["attention_mask"])

What a batch holds, by task kind (B = batch size, T = longest sequence in the batch, right-padded):
  classification, pair_classification   input_ids (B, T), attention_mask (B, T), labels (B,)
  lm            blocks of exactly block_size tokens: input_ids (B, T), attention_mask (B, T) of ones,
                labels = input_ids (aligned, the model shifts them: HF's `labels` convention)
  qa            input_ids, attention_mask, start_positions (B,), end_positions (B,) (inclusive token
                indices), labels (B, 2) = (start, end)
  summarization the causal-LM format "text TL;DR: headline" (the TL;DR prompt of Radford et al. 2019,
                GPT-2): input_ids, attention_mask, labels (B, T) = input_ids on the headline tokens
                (and the final EOS) and -100 elsewhere, so the loss is on the headline alone
Every batch also has `index` (B,): the examples' positions in the split, to look up `answers`
(qa) or `references` / `prompt_ids` (summarization) in `TaskData.eval` for the metrics.
"""
from __future__ import annotations

import logging
import random
from dataclasses import dataclass, field
from functools import partial
from typing import Callable, Iterator

import torch

from trainers.data.parsing import RawData, UnknownTask
from trainers.data.source import read_raw
from trainers.data.spans import common_prefix, encode, fit, fit_qa

log = logging.getLogger("trainers.data")

IGNORE_INDEX = -100
KINDS = ("classification", "pair_classification", "lm", "qa", "summarization")


@dataclass(frozen=True)
class TaskSpec:
    name: str
    kind: str                    # one of KINDS
    num_labels: int | None       # classes for (pair_)classification, else None
    metric: str                  # key of the main score: accuracy, f1, perplexity or rouge_l
    reader: Callable[..., RawData] = field(repr=False)  # reader(data_dir=, source=, seed=) -> RawData
    label_names: tuple[str, ...] = ()


def _spec(name, kind, num_labels, metric, label_names=()):
    return TaskSpec(name, kind, num_labels, metric, partial(read_raw, name), label_names)


TASKS: dict[str, TaskSpec] = {
    "sst2": _spec("sst2", "classification", 2, "accuracy", ("negative", "positive")),
    "mrpc": _spec("mrpc", "pair_classification", 2, "f1", ("not_equivalent", "equivalent")),
    "qnli": _spec("qnli", "pair_classification", 2, "accuracy", ("entailment", "not_entailment")),
    "ag_news": _spec("ag_news", "classification", 4, "accuracy", ("World", "Sports", "Business", "Sci/Tech")),
    "imdb": _spec("imdb", "classification", 2, "accuracy", ("neg", "pos")),
    "wikitext2": _spec("wikitext2", "lm", None, "perplexity"),
    "tiny_shakespeare": _spec("tiny_shakespeare", "lm", None, "perplexity"),
    "squad": _spec("squad", "qa", None, "f1"),             # SQuAD token F1 (metrics.squad_scores)
    "news_summary": _spec("news_summary", "summarization", None, "rouge_l"),
}


def get_task(name: str) -> TaskSpec:
    if name not in TASKS:
        raise UnknownTask(f"unknown task {name!r}; known tasks: {', '.join(sorted(TASKS))}")
    return TASKS[name]


@dataclass
class TaskData:
    """Tokenized splits. `train` / `eval` are dicts of equal-length lists (columns): always
    `input_ids`, plus `labels` (classification: int; lm, summarization: list), `start_positions`,
    `end_positions`, `answers`, `contexts`, `context_start` (qa), `prompt_ids`, `references`
    (summarization)."""
    spec: TaskSpec
    train: dict[str, list]
    eval: dict[str, list]
    pad_id: int
    max_length: int
    block_size: int              # lm block length (= max_length unless given)
    source: str                  # where the raw data came from ("local:<dir>" or "hub:<id>")
    eval_from: str
    carved: bool = False         # train/eval carved here from a single file (see note)
    note: str = ""
    skipped: dict[str, int] = field(default_factory=dict)  # qa questions whose answer could not fit

    def split(self, split: str) -> dict[str, list]:
        if split not in ("train", "eval"):
            raise ValueError(f"split must be 'train' or 'eval', got {split!r}")
        return self.train if split == "train" else self.eval

    def num_examples(self, split: str) -> int:
        return len(self.split(split)["input_ids"])

    def batches(self, split: str, batch_size: int, shuffle: bool = False, seed: int = 0,
                drop_last: bool = False) -> Iterator[dict[str, torch.Tensor]]:
        """Padded batches of one split (see the module docstring); `shuffle` is seeded."""
        n = self.num_examples(split)
        order = (torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
                 if shuffle else list(range(n)))
        for i in range(0, n, batch_size):
            idx = order[i:i + batch_size]
            if drop_last and len(idx) < batch_size:
                return
            yield self.collate(split, idx)

    def collate(self, split: str, idx: list[int]) -> dict[str, torch.Tensor]:
        cols = self.split(split)
        seqs = [cols["input_ids"][i] for i in idx]
        T = max(len(s) for s in seqs)
        input_ids = torch.full((len(seqs), T), self.pad_id, dtype=torch.long)   # (B, T)
        attention_mask = torch.zeros((len(seqs), T), dtype=torch.long)           # (B, T)
        for b, s in enumerate(seqs):
            input_ids[b, :len(s)] = torch.tensor(s, dtype=torch.long)
            attention_mask[b, :len(s)] = 1
        batch = {"input_ids": input_ids, "attention_mask": attention_mask,
                 "index": torch.tensor(idx, dtype=torch.long)}
        kind = self.spec.kind
        if kind in ("classification", "pair_classification"):
            batch["labels"] = torch.tensor([cols["labels"][i] for i in idx], dtype=torch.long)  # (B,)
        elif kind == "lm":
            batch["labels"] = input_ids.clone()                                                # (B, T)
        elif kind == "summarization":
            labels = torch.full((len(seqs), T), IGNORE_INDEX, dtype=torch.long)                # (B, T)
            for b, i in enumerate(idx):
                labels[b, :len(cols["labels"][i])] = torch.tensor(cols["labels"][i], dtype=torch.long)
            batch["labels"] = labels
        elif kind == "qa":
            batch["start_positions"] = torch.tensor([cols["start_positions"][i] for i in idx])  # (B,)
            batch["end_positions"] = torch.tensor([cols["end_positions"][i] for i in idx])      # (B,)
            batch["labels"] = torch.stack([batch["start_positions"], batch["end_positions"]], 1)  # (B, 2)
        return batch

    def qa_predictions(self, split: str, index, start_logits: torch.Tensor, end_logits: torch.Tensor,
                       tokenizer, max_answer_tokens: int = 30) -> list[str]:
        """Answer texts for a qa batch: per example the context span s <= e < s + max_answer_tokens
        maximising start_logits[s] + end_logits[e], decoded. Score them with
        metrics.squad_scores(predictions, [split["answers"][i] for i in index])."""
        cols, out = self.split(split), []
        for b, i in enumerate(_as_list(index)):
            ids = cols["input_ids"][i]
            lo, n = cols["context_start"][i], len(ids) - cols["context_start"][i]
            scores = start_logits[b, lo:len(ids), None] + end_logits[b, None, lo:len(ids)]   # (n, n)
            allowed = torch.ones(n, n, dtype=torch.bool, device=scores.device)
            allowed = allowed.triu() & ~allowed.triu(max_answer_tokens)                        # s <= e < s + L
            k = int(scores.float().masked_fill(~allowed, float("-inf")).argmax())
            out.append(tokenizer.decode(ids[lo + k // n: lo + k % n + 1]).strip())
        return out


def _as_list(x) -> list:
    return x.tolist() if isinstance(x, torch.Tensor) else list(x)


# ---------------------------------------------------------------- tokenizing each kind

def _classification(tok, records, max_length):
    pair = "text_pair" in records[0] if records else False
    return {"input_ids": [fit(tok, r["text"], r["text_pair"] if pair else None, max_length) for r in records],
            "labels": [r["label"] for r in records]}


def _with_eos(tok, ids: list[int]) -> list[int]:
    eos = getattr(tok, "eos_id", None)
    return ids + [eos] if eos is not None and (not ids or ids[-1] != eos) else ids


def pack(tok, docs: list[dict], block_size: int, limit: int | None) -> list[list[int]]:
    """Documents -> one token stream (EOS between documents) -> blocks of exactly block_size tokens;
    the tail that does not fill a block is dropped. With `limit`, only enough text is tokenized for
    `limit` blocks: a long document is encoded through a prefix (cut at a space) that is doubled
    until it yields one token more than needed (its last token may be cut by the prefix)."""
    need = None if limit is None else limit * block_size
    stream: list[int] = []
    for d in docs:
        if need is not None and len(stream) >= need:
            break
        text, ids = d["text"], None
        if need is not None:
            missing, n = need - len(stream), (need - len(stream)) * 8 + 64
            while n < len(text):
                cut = text.rfind(" ", 0, n)
                ids = encode(tok, text[:cut if cut > 0 else n])
                if len(ids) > missing:
                    break
                ids, n = None, n * 2
        stream.extend(ids if ids is not None else _with_eos(tok, encode(tok, text)))
    n_blocks = len(stream) // block_size if limit is None else min(limit, len(stream) // block_size)
    return [stream[i * block_size:(i + 1) * block_size] for i in range(n_blocks)]


def _lm(tok, records, block_size, limit, name):
    blocks = pack(tok, records, block_size, limit)
    if not blocks:
        raise ValueError(f"{name}: the text holds fewer tokens than one block of {block_size}")
    return {"input_ids": blocks, "labels": blocks}


def _qa(tok, records, max_length, seed):
    rng = random.Random(seed)
    keys = ("input_ids", "start_positions", "end_positions", "answers", "contexts", "ids", "context_start")
    cols = {k: [] for k in keys}
    skipped = 0
    for r in records:
        first = r["answers"][0]
        s, e = first["answer_start"], first["answer_start"] + len(first["text"])
        out = fit_qa(tok, r["question"], r["context"], s, e, max_length, rng)
        if out is None:
            skipped += 1
            continue
        ids, s_tok, e_tok, window = out
        # the first context token: where encode(question, "") stops agreeing with the full encoding
        first = common_prefix(encode(tok, r["question"], ""), ids)
        values = (ids, s_tok, e_tok, [a["text"] for a in r["answers"]], window, r["id"], first)
        for key, value in zip(keys, values):
            cols[key].append(value)
    return cols, skipped


PROMPT = " TL;DR:"


def _summarization(tok, records, max_length):
    """"text TL;DR: headline" with labels on the headline. The prompt's token count is found by
    comparing encode(text + " TL;DR:") with the full encoding, so it holds for any tokenizer."""
    cols = {k: [] for k in ("input_ids", "labels", "prompt_ids", "references")}
    for r in records:
        words = r["text"].split()
        while True:
            text = " ".join(words)
            full = _with_eos(tok, encode(tok, f"{text}{PROMPT} {r['summary']}"))
            if len(full) <= max_length or not words:
                break
            words = words[:-max(1, (len(full) - max_length) // 2)]   # shorten the article, not the headline
        full = full[:max_length]
        p = min(common_prefix(encode(tok, f"{text}{PROMPT}"), full), len(full) - 1)
        cols["input_ids"].append(full)
        cols["labels"].append([IGNORE_INDEX] * p + full[p:])
        cols["prompt_ids"].append(full[:p])
        cols["references"].append(r["summary"])
    return cols


def tokenize(spec: TaskSpec, tok, records: list[dict], max_length: int, block_size: int,
             limit: int | None, seed: int) -> tuple[dict[str, list], int]:
    """(columns, number of skipped records) of one split."""
    if spec.kind == "lm":
        return _lm(tok, records, block_size, limit, spec.name), 0
    records = records if limit is None else records[:limit]
    if spec.kind == "qa":
        return _qa(tok, records, max_length, seed)
    if spec.kind == "summarization":
        return _summarization(tok, records, max_length), 0
    return _classification(tok, records, max_length), 0


def load_task(name: str, tokenizer, max_length: int = 128, limit: int | None = None, data_dir=None,
              seed: int = 0, block_size: int | None = None, source: str = "auto") -> TaskData:
    """Read task `name` (local files or the hub, see source.read_raw), tokenize both splits.

    max_length: longest sequence (tokens) for every kind but lm; block_size: lm block length
    (default max_length); limit: at most this many examples (lm: blocks) per split; seed: carved
    splits and qa windows."""
    spec = get_task(name)
    block_size = block_size or max_length
    if max_length < 8 or block_size < 2:
        raise ValueError(f"max_length must be >= 8 and block_size >= 2, got {max_length} and {block_size}")
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be a positive number of examples or None, got {limit}")
    raw = spec.reader(data_dir=data_dir, source=source, seed=seed)
    train, skip_train = tokenize(spec, tokenizer, raw.train, max_length, block_size, limit, seed)
    eval_, skip_eval = tokenize(spec, tokenizer, raw.eval, max_length, block_size, limit, seed + 1)
    pad = next((i for i in (getattr(tokenizer, "pad_id", None), getattr(tokenizer, "eos_id", None))
                if i is not None), 0)     # GPT-2 has no pad token: EOS, masked out by attention_mask
    if skip_train or skip_eval:
        log.info("%s: %d train and %d eval questions skipped (answer cannot fit in max_length=%d)",
                 name, skip_train, skip_eval, max_length)
    return TaskData(spec, train, eval_, pad, max_length, block_size, raw.source, raw.eval_from, raw.carved,
                    raw.note, {"train": skip_train, "eval": skip_eval})
