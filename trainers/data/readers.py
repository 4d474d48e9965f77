"""Raw readers: each task's examples as plain Python records, from local files.

A reader returns a `RawData` with `train` and `eval` lists of dict records:

    classification       {"text": str, "label": int}
    pair_classification  {"text": str, "text_pair": str, "label": int}
    lm                   {"text": str}                      (one document per record)
    qa                   {"id", "title", "context", "question", "answers": [{"text", "answer_start"}]}
    summarization        {"text": str, "summary": str}

This file reads local files laid out like shared/data (see shared/data/PROVENANCE.md and
LOCAL_LAYOUT below); source.py reads the hub and chooses between the two (`read_raw`). The
record container, the errors and the parsing helpers the readers share are in parsing.py
(re-exported here).

The real files' quirks are handled here and in parsing.py, once (PROVENANCE.md lists them): SST-2 and MRPC have no
quoting (QUOTE_NONE), MRPC starts with a BOM, SST-2 has trailing spaces and one CRLF file, AG News
has no header, 1-based labels, backslashes for newlines and half-escaped HTML entities, WikiText
lines start with a space and blank lines are " ". Where only one split exists locally (AG News
test, SQuAD dev, a NewsSummary CSV: seeded; Tiny Shakespeare: first 90% / last 10%; WikiText-2
without its train file: valid/test) the train/eval split is made here and said so, both in a
logged message and in `RawData.carved` / `RawData.note`.
"""
from __future__ import annotations

import csv
import random
from pathlib import Path

from trainers.data.parsing import (DataUnavailable, RawData, UnknownTask, carve, clean_ag_news, column_index,
                                   parse_label, read_json, read_text, read_tsv, read_tsv_lines, say_carved,
                                   wikitext_articles)

__all__ = ["DataUnavailable", "RawData", "UnknownTask", "carve", "clean_ag_news", "parse_label", "read_json",
           "read_text", "read_tsv", "read_tsv_lines", "wikitext_articles", "split_shakespeare", "squad_records",
           "LOCAL_LAYOUT", "QNLI_LABELS", "read_sst2_local", "read_mrpc_local", "read_qnli_local",
           "read_ag_news_local", "read_imdb_local", "read_wikitext2_local", "read_tiny_shakespeare_local",
           "read_squad_local", "read_news_summary_local"]


# ---------------------------------------------------------------- local readers
# Each takes the data folder and a seed and returns RawData; LOCAL_LAYOUT says what it needs.

def _glue_single(root: Path, name: str) -> RawData:
    def read(split: str) -> list[dict]:
        path = root / name / f"{split}.tsv"
        header, rows = read_tsv_lines(path)
        s, y = column_index(path, header, "sentence"), column_index(path, header, "label")
        return [{"text": r[s].strip(), "label": parse_label(path, line, "label", r[y], (0, 1))}
                for line, r in rows]   # strip: GLUE's trailing space
    return RawData(name, read("train"), read("dev"), f"local:{root}", f"{name}/dev.tsv")


def read_sst2_local(root: Path, seed: int = 0) -> RawData:
    return _glue_single(root, "sst2")


def read_mrpc_local(root: Path, seed: int = 0) -> RawData:
    def read(split: str) -> list[dict]:
        path = root / "mrpc" / f"{split}.tsv"
        header, rows = read_tsv_lines(path)
        y, a, b = (column_index(path, header, c) for c in ("Quality", "#1 String", "#2 String"))
        return [{"text": r[a].strip(), "text_pair": r[b].strip(),
                 "label": parse_label(path, line, "Quality", r[y], (0, 1))} for line, r in rows]
    return RawData("mrpc", read("train"), read("dev"), f"local:{root}", "mrpc/dev.tsv")


QNLI_LABELS = {"entailment": 0, "not_entailment": 1}   # the ids of HF glue/qnli


def read_qnli_local(root: Path, seed: int = 0) -> RawData:
    def read(split: str) -> list[dict]:
        path = root / "qnli" / f"{split}.tsv"
        header, rows = read_tsv_lines(path)
        q, s, y = (column_index(path, header, c) for c in ("question", "sentence", "label"))
        return [{"text": r[q].strip(), "text_pair": r[s].strip(),
                 "label": parse_label(path, line, "label", r[y], QNLI_LABELS)} for line, r in rows]
    return RawData("qnli", read("train"), read("dev"), f"local:{root}", "qnli/dev.tsv")


def _read_ag_csv(path: Path) -> list[dict]:
    rows = []
    try:
        with open(path, encoding="utf-8", newline="") as f:
            reader = csv.reader(f)                    # every field quoted, "" inside: csv's default dialect
            line = reader.line_num + 1
            for r in reader:
                if r:
                    rows.append((line, r))            # the line the record starts on (a field may span lines)
                line = reader.line_num + 1
    except UnicodeDecodeError as error:
        raise ValueError(f"{path}: not utf-8 text: byte {error.start} {error.reason}") from None
    except csv.Error as error:
        raise ValueError(f"{path}: line {reader.line_num}: not valid CSV ({error})") from None
    out = []
    for line, r in rows:
        if len(r) != 3:
            raise ValueError(f"{path}: line {line} is {r[:3]!r}, expected class,title,description (no header)")
        label = parse_label(path, line, "class", r[0], (1, 2, 3, 4)) - 1          # 1-based -> 0-based
        # title + " " + description, as the hub's ag_news "text" column joins them
        out.append({"text": clean_ag_news(r[1] + " " + r[2]), "label": label})
    return out


def read_ag_news_local(root: Path, seed: int = 0) -> RawData:
    test = _read_ag_csv(root / "ag_news" / "test.csv")
    if (root / "ag_news" / "train.csv").exists():
        return RawData("ag_news", _read_ag_csv(root / "ag_news" / "train.csv"), test,
                       f"local:{root}", "ag_news/test.csv")
    train, eval_ = carve(test, 0.2, seed, key=lambda r: r["label"])
    note = say_carved("ag_news", f"ag_news/train.csv is absent: train ({len(train)}) and eval ({len(eval_)}) "
                       f"splits carved from ag_news/test.csv, stratified by class, seed {seed}")
    return RawData("ag_news", train, eval_, f"local:{root}", "carved from ag_news/test.csv", True, note)


def read_imdb_local(root: Path, seed: int = 0) -> RawData:
    def read(split: str) -> list[dict]:
        out = []
        for label, sub in ((0, "neg"), (1, "pos")):
            for f in sorted((root / "imdb" / split / sub).glob("*.txt")):
                out.append({"text": read_text(f).replace("<br />", " ").strip(), "label": label})
        if not out:
            raise DataUnavailable(f"imdb: no review files in {root / 'imdb' / split}/pos or /neg")
        return out
    return RawData("imdb", read("train"), read("test"), f"local:{root}", "imdb/test")


def read_wikitext2_local(root: Path, seed: int = 0) -> RawData:
    def read(split: str) -> list[dict]:
        return wikitext_articles(read_text(root / "wikitext2" / f"wiki.{split}.raw").split("\n"))
    if (root / "wikitext2" / "wiki.train.raw").exists():
        return RawData("wikitext2", read("train"), read("valid"), f"local:{root}", "wikitext2/wiki.valid.raw")
    note = say_carved("wikitext2", "wikitext2/wiki.train.raw is absent: training on wiki.valid.raw "
                       "and evaluating on wiki.test.raw")
    return RawData("wikitext2", read("valid"), read("test"), f"local:{root}", "wikitext2/wiki.test.raw",
                   True, note)


def split_shakespeare(text: str, fraction: float = 0.9) -> tuple[str, str]:
    """First ~90% / last ~10% of the play text (nanoGPT's split), cut at the blank line before the mark
    so that no speech is split in two."""
    cut = text.rfind("\n\n", 0, int(len(text) * fraction))
    cut = cut + 2 if cut > 0 else int(len(text) * fraction)
    return text[:cut], text[cut:]


def read_tiny_shakespeare_local(root: Path, seed: int = 0) -> RawData:
    train, eval_ = split_shakespeare(read_text(root / "tiny_shakespeare" / "input.txt"))
    note = say_carved("tiny_shakespeare", "one file: train is the first ~90% of input.txt, eval the last ~10% "
                       "(cut at a blank line)")
    return RawData("tiny_shakespeare", [{"text": train}], [{"text": eval_}], f"local:{root}",
                   "carved from tiny_shakespeare/input.txt", True, note)


def squad_records(squad_json: dict, where: str = "SQuAD JSON") -> list[list[dict]]:
    """SQuAD v1.1 JSON -> one list of question records per article. A missing or mistyped
    field fails naming its place, e.g. `data[3].paragraphs[0].qas[2].answers[0].answer_start`."""
    def get(obj, key, kind, place):
        value = obj.get(key) if isinstance(obj, dict) else None
        if not isinstance(value, kind) or isinstance(value, bool):
            kind_name = {int: "an int", str: "a string", list: "a list"}[kind]
            raise ValueError(f"{where}: {place}.{key} must be {kind_name}, got {value!r:.80}")
        return value
    articles = []
    for i, art in enumerate(get(squad_json, "data", list, "(top level)")):
        recs, at = [], f"data[{i}]"
        title = get(art, "title", str, at)
        for j, par in enumerate(get(art, "paragraphs", list, at)):
            pat = f"{at}.paragraphs[{j}]"
            context = get(par, "context", str, pat)
            for k, qa in enumerate(get(par, "qas", list, pat)):
                qat = f"{pat}.qas[{k}]"
                answers = [{"text": get(a, "text", str, f"{qat}.answers[{m}]"),
                            "answer_start": get(a, "answer_start", int, f"{qat}.answers[{m}]")}
                           for m, a in enumerate(get(qa, "answers", list, qat))]
                recs.append({"id": get(qa, "id", str, qat), "title": title, "context": context,
                             "question": get(qa, "question", str, qat).strip(), "answers": answers})
        articles.append(recs)
    return articles


def read_squad_local(root: Path, seed: int = 0) -> RawData:
    def load(fname: str) -> list[list[dict]]:
        path = root / "squad_v1.1" / fname
        return squad_records(read_json(path), str(path))
    dev = load("dev-v1.1.json")
    if (root / "squad_v1.1" / "train-v1.1.json").exists():
        return RawData("squad", sum(load("train-v1.1.json"), []), sum(dev, []), f"local:{root}",
                       "squad_v1.1/dev-v1.1.json")
    order = list(range(len(dev)))
    random.Random(seed).shuffle(order)
    held = set(order[:max(1, round(0.2 * len(dev)))])  # whole articles: no context is in both splits
    train = [r for i, a in enumerate(dev) if i not in held for r in a]
    eval_ = [r for i, a in enumerate(dev) if i in held for r in a]
    note = say_carved("squad", f"only dev-v1.1.json is local: {len(dev) - len(held)} articles ({len(train)} "
                       f"questions) for train, {len(held)} articles ({len(eval_)}) for eval, seed {seed}")
    return RawData("squad", train, eval_, f"local:{root}", "carved from squad_v1.1/dev-v1.1.json", True, note)


def read_news_summary_local(root: Path, seed: int = 0) -> RawData:
    path = root / "news_summary" / "news_summary_more.csv"
    try:
        raw = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError:                         # the Kaggle file is sometimes Windows-1252
        raw = read_text(path, "cp1252")
    reader = csv.DictReader(raw.splitlines(keepends=True))
    missing = {"headlines", "text"} - set(reader.fieldnames or [])
    if missing:
        raise ValueError(f"{path}: expected columns headlines,text; header is {reader.fieldnames}")
    rows = []
    for r in reader:
        extra = r.pop(None, None)                      # DictReader puts surplus fields under None
        if extra is not None or None in r.values():    # ... and fills missing ones with None
            raise ValueError(f"{path}: line {reader.line_num}: {'more' if extra is not None else 'fewer'} fields "
                             f"than the {len(reader.fieldnames)} of the header")
        rows.append({"text": " ".join(r["text"].split()), "summary": " ".join(r["headlines"].split())})
    rows = [r for r in rows if r["text"] and r["summary"]]
    if len(rows) < 2:
        raise ValueError(f"{path}: needs at least 2 non-empty rows to make a train and an eval split")
    train, eval_ = carve(rows, 0.1, seed)
    note = say_carved("news_summary", f"one CSV: train ({len(train)}) and eval ({len(eval_)}) carved "
                       f"from {path.name}, seed {seed}")
    return RawData("news_summary", train, eval_, f"local:{root}", f"carved from news_summary/{path.name}",
                   True, note)


# name -> (files that must exist under the data folder, layout description, reader)
LOCAL_LAYOUT = {
    "sst2": (("sst2/train.tsv", "sst2/dev.tsv"),
             "GLUE SST-2 TSVs with header 'sentence<TAB>label' (label 0/1), no quoting", read_sst2_local),
    "mrpc": (("mrpc/train.tsv", "mrpc/dev.tsv"),
             "GLUE MRPC TSVs with header 'Quality<TAB>#1 ID<TAB>#2 ID<TAB>#1 String<TAB>#2 String'",
             read_mrpc_local),
    "qnli": (("qnli/train.tsv", "qnli/dev.tsv"),
             "GLUE QNLI TSVs with header 'index<TAB>question<TAB>sentence<TAB>label' "
             "(label entailment/not_entailment), no quoting", read_qnli_local),
    "ag_news": (("ag_news/test.csv",),
                "AG News CSV without header: \"class\",\"title\",\"description\" with class 1-4 "
                "(ag_news/train.csv is used as well when present)", read_ag_news_local),
    "imdb": (("imdb/train", "imdb/test"),
             "the Stanford aclImdb tree renamed to imdb/: imdb/{train,test}/{pos,neg}/<id>_<rating>.txt",
             read_imdb_local),
    "wikitext2": (("wikitext2/wiki.valid.raw", "wikitext2/wiki.test.raw"),
                  "WikiText-2 raw files wikitext2/wiki.{train,valid,test}.raw (train optional)",
                  read_wikitext2_local),
    "tiny_shakespeare": (("tiny_shakespeare/input.txt",), "karpathy/char-rnn tinyshakespeare input.txt",
                         read_tiny_shakespeare_local),
    "squad": (("squad_v1.1/dev-v1.1.json",),
              "SQuAD v1.1 JSON squad_v1.1/dev-v1.1.json (train-v1.1.json optional)", read_squad_local),
    "news_summary": (("news_summary/news_summary_more.csv",),
                     "a NewsSummary CSV with (at least) the columns headlines,text", read_news_summary_local),
}
