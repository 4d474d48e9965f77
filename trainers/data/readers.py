"""Raw readers: each task's examples as plain Python records, from local files.

A reader returns a `RawData` with `train` and `eval` lists of dict records:

    classification       {"text": str, "label": int}
    pair_classification  {"text": str, "text_pair": str, "label": int}
    lm                   {"text": str}                      (one document per record)
    qa                   {"id", "title", "context", "question", "answers": [{"text", "answer_start"}]}
    summarization        {"text": str, "summary": str}

This file reads local files laid out like shared/data (see shared/data/PROVENANCE.md and
LOCAL_LAYOUT below); source.py reads the hub and chooses between the two (`read_raw`).

The real files' quirks are handled here, once (PROVENANCE.md lists them): SST-2 and MRPC have no
quoting (QUOTE_NONE), MRPC starts with a BOM, SST-2 has trailing spaces and one CRLF file, AG News
has no header, 1-based labels, backslashes for newlines and half-escaped HTML entities, WikiText
lines start with a space and blank lines are " ". Where only one split exists locally (AG News
test, SQuAD dev, a NewsSummary CSV: seeded; Tiny Shakespeare: first 90% / last 10%; WikiText-2
without its train file: valid/test) the train/eval split is made here and said so, both in a
logged message and in `RawData.carved` / `RawData.note`.
"""
from __future__ import annotations

import csv
import json
import logging
import random
import re
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger("trainers.data")


@dataclass
class RawData:
    """Untokenized examples of one task."""
    name: str
    train: list[dict]
    eval: list[dict]
    source: str          # "local:<folder>" or "hub:<dataset id>"
    eval_from: str       # where eval comes from: "sst2/dev.tsv", "validation", "carved from ag_news/test.csv"
    carved: bool = False  # True when train and eval were cut here (seeded) out of one file
    note: str = ""       # one sentence on how the splits were made


class DataUnavailable(FileNotFoundError):
    """A task's data is neither in the local folder nor reachable on the hub."""


class UnknownTask(KeyError):
    """A task name that is not in the registry (the message lists the known ones)."""

    def __str__(self) -> str:      # KeyError would print the repr of the message
        return str(self.args[0])


# ---------------------------------------------------------------- small helpers

def read_text(path: Path, encoding: str = "utf-8") -> str:
    """A text file's contents; a file that is not valid text names itself and the byte."""
    try:
        return Path(path).read_text(encoding=encoding)
    except UnicodeDecodeError as error:
        bad = error.object[error.start:error.start + 1]
        raise ValueError(f"{path}: not {encoding} text: byte {error.start} ({bad!r}) {error.reason}") from None


def read_tsv_lines(path: Path) -> tuple[list[str], list[tuple[int, list[str]]]]:
    """(header, [(line number, row)]) of a GLUE-style TSV: no quoting, maybe a BOM, LF or CRLF.
    Blank lines are dropped; a row with another number of fields than the header names its line."""
    try:
        with open(path, encoding="utf-8-sig", newline="") as f:   # utf-8-sig drops the MRPC BOM
            rows = [(i + 1, r) for i, r in enumerate(csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE))]
    except UnicodeDecodeError as error:
        raise ValueError(f"{path}: not utf-8 text: byte {error.start} {error.reason}") from None
    if not rows:
        raise ValueError(f"{path}: empty file, expected a header row")
    header, body = rows[0][1], [(line, r) for line, r in rows[1:] if r]
    for line, r in body:
        if len(r) != len(header):
            raise ValueError(f"{path}: line {line} has {len(r)} fields, header has {len(header)}")
    return header, body


def read_tsv(path: Path) -> tuple[list[str], list[list[str]]]:
    """(header, rows) of a GLUE-style TSV (read_tsv_lines without the line numbers)."""
    header, body = read_tsv_lines(path)
    return header, [r for _, r in body]


def parse_label(path: Path, line: int, column: str, value: str, labels) -> int:
    """The label of one row: `labels` maps the file's spelling to the id, or lists the allowed ids."""
    key = value.strip()
    if isinstance(labels, dict):
        if key in labels:
            return labels[key]
    elif key.lstrip("-").isdigit() and int(key) in labels:
        return int(key)
    allowed = list(labels) if isinstance(labels, dict) else list(labels)
    raise ValueError(f"{path}: line {line}: column {column!r} must be one of {allowed}, got {value!r}")


def _column(path: Path, header: list[str], name: str) -> int:
    if name not in header:
        raise ValueError(f"{path}: expected a column {name!r}, header is {header}")
    return header.index(name)


_NAMED = {"quot": '"', "amp": "&", "lt": "<", "gt": ">", "apos": "'", "nbsp": " "}


def _numeric_entity(m: re.Match) -> str:
    n = int(m.group(1))
    # 128-159 are Windows-1252 code points in these files (#146; is a right quote, #151; an em dash).
    return bytes([n]).decode("cp1252", errors="replace") if 128 <= n <= 159 else chr(n)


def clean_ag_news(text: str) -> str:
    """AG News text as written: backslash = newline, entities like `#39;`, ` quot;`, `&lt;` unescaped."""
    text = re.sub(r"\\+", " ", text)                                  # a literal "\" stood for a newline
    # The "&" of most entities became a space ("Johnson  amp; Johnson", "J amp;J"): eat it back.
    text = re.sub(r"[ &]?#(\d{2,5});", _numeric_entity, text)         # " #39;" and "&#39;" -> "'"
    text = re.sub(r"[ &]?\b(quot|amp|lt|gt|apos|nbsp);", lambda m: _NAMED[m.group(1)], text)
    return re.sub(r"\s+", " ", text).strip()                          # the lost "&" left double spaces


def wikitext_articles(lines: list[str]) -> list[dict]:
    """WikiText raw lines -> one record per article.

    Every line starts with a space, blank lines are " ", headings look like " = Title = " (article)
    or " = = Section = = ". Lines are stripped, blanks dropped, and a new article starts at each
    top-level heading; section headings stay in the text (they are part of what a LM reads)."""
    articles: list[list[str]] = []
    for raw in lines:
        line = raw.strip()
        if not line:
            continue
        if re.fullmatch(r"= [^=].* =", line) or not articles:
            articles.append([])
        articles[-1].append(line)
    return [{"text": "\n".join(a)} for a in articles]


def carve(records: list[dict], eval_fraction: float, seed: int, key=None) -> tuple[list[dict], list[dict]]:
    """Seeded split of one list into (train, eval). With `key`, each group (e.g. each label) is
    split on its own, so the eval split keeps the class balance. Both keep file order."""
    groups: dict = {}
    for i, r in enumerate(records):
        groups.setdefault(key(r) if key else 0, []).append(i)
    rng = random.Random(seed)
    eval_idx: set[int] = set()
    for g in sorted(groups):
        idx = groups[g][:]
        rng.shuffle(idx)
        eval_idx.update(idx[:max(1, round(len(idx) * eval_fraction))])
    train = [r for i, r in enumerate(records) if i not in eval_idx]
    return train, [r for i, r in enumerate(records) if i in eval_idx]


def _say_carved(name: str, what: str) -> str:
    log.warning("%s: %s", name, what)
    return what


# ---------------------------------------------------------------- local readers
# Each takes the data folder and a seed and returns RawData; LOCAL_LAYOUT says what it needs.

def _glue_single(root: Path, name: str) -> RawData:
    def read(split: str) -> list[dict]:
        path = root / name / f"{split}.tsv"
        header, rows = read_tsv_lines(path)
        s, y = _column(path, header, "sentence"), _column(path, header, "label")
        return [{"text": r[s].strip(), "label": parse_label(path, line, "label", r[y], (0, 1))}
                for line, r in rows]   # strip: GLUE's trailing space
    return RawData(name, read("train"), read("dev"), f"local:{root}", f"{name}/dev.tsv")


def read_sst2_local(root: Path, seed: int = 0) -> RawData:
    return _glue_single(root, "sst2")


def read_mrpc_local(root: Path, seed: int = 0) -> RawData:
    def read(split: str) -> list[dict]:
        path = root / "mrpc" / f"{split}.tsv"
        header, rows = read_tsv_lines(path)
        y, a, b = (_column(path, header, c) for c in ("Quality", "#1 String", "#2 String"))
        return [{"text": r[a].strip(), "text_pair": r[b].strip(),
                 "label": parse_label(path, line, "Quality", r[y], (0, 1))} for line, r in rows]
    return RawData("mrpc", read("train"), read("dev"), f"local:{root}", "mrpc/dev.tsv")


QNLI_LABELS = {"entailment": 0, "not_entailment": 1}   # the ids of HF glue/qnli


def read_qnli_local(root: Path, seed: int = 0) -> RawData:
    def read(split: str) -> list[dict]:
        path = root / "qnli" / f"{split}.tsv"
        header, rows = read_tsv_lines(path)
        q, s, y = (_column(path, header, c) for c in ("question", "sentence", "label"))
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
    note = _say_carved("ag_news", f"ag_news/train.csv is absent: train ({len(train)}) and eval ({len(eval_)}) "
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
    note = _say_carved("wikitext2", "wikitext2/wiki.train.raw is absent: training on wiki.valid.raw "
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
    note = _say_carved("tiny_shakespeare", "one file: train is the first ~90% of input.txt, eval the last ~10% "
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


def read_json(path: Path):
    try:
        return json.loads(read_text(path))
    except json.JSONDecodeError as error:
        raise ValueError(f"{path}: not valid JSON: line {error.lineno}, column {error.colno}: {error.msg}") from None


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
    note = _say_carved("squad", f"only dev-v1.1.json is local: {len(dev) - len(held)} articles ({len(train)} "
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
    note = _say_carved("news_summary", f"one CSV: train ({len(train)}) and eval ({len(eval_)}) carved "
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
