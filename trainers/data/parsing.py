"""What every raw reader shares: the record container, the two errors, and parsing helpers.

`RawData` is what a reader returns (readers.py for local files, source.py for the hub);
`DataUnavailable` and `UnknownTask` are the errors a missing dataset or task name raise.
The helpers read the formats the files come in, each quirk handled once (PROVENANCE.md lists
them): GLUE TSVs without quoting, with a BOM or CRLF lines (`read_tsv_lines`), labels spelled
per file (`parse_label`), AG News's backslashes and half-escaped HTML entities
(`clean_ag_news`), WikiText's space-prefixed lines and headings (`wikitext_articles`), text
and JSON that name the file and place when they are not valid (`read_text`, `read_json`), and
the seeded, class-balanced split of a file that is the only one there is (`carve`), which a
reader announces with `say_carved`.
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


# ---------------------------------------------------------------- parsing helpers

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


def column_index(path: Path, header: list[str], name: str) -> int:
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


def say_carved(name: str, what: str) -> str:
    log.warning("%s: %s", name, what)
    return what


def read_json(path: Path):
    try:
        return json.loads(read_text(path))
    except json.JSONDecodeError as error:
        raise ValueError(f"{path}: not valid JSON: line {error.lineno}, column {error.colno}: {error.msg}") from None
