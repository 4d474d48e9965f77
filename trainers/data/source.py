"""Where a task's records come from: the local data folder or the Hugging Face hub.

    read_raw(name, data_dir=None, source="auto", seed=0) -> RawData

  "local"  files under a data folder laid out like shared/data (readers.LOCAL_LAYOUT);
  "hub"    `datasets.load_dataset(<hub id>)`, needs a network (or the datasets cache);
  "auto"   local when the folder holds the task's files, else the hub when it is reachable,
           else a clear error naming the missing file and the expected layout.
The hub is never tried blindly: a 2-second probe decides whether it is reachable, and when it is
not, HF_DATASETS_OFFLINE/HF_HUB_OFFLINE are set so that `datasets` reads its cache without waiting
on the network (and fails at once without one).
"""
from __future__ import annotations

import os
import socket
import threading
from pathlib import Path
from urllib.parse import urlparse

from trainers import paths
from trainers.data.parsing import DataUnavailable, RawData, UnknownTask, clean_ag_news, wikitext_articles
from trainers.data.readers import LOCAL_LAYOUT

# name -> (dataset id, config, train split, eval split); news_summary is local only.
HUB = {
    "sst2": ("nyu-mll/glue", "sst2", "train", "validation"),
    "mrpc": ("nyu-mll/glue", "mrpc", "train", "validation"),
    "qnli": ("nyu-mll/glue", "qnli", "train", "validation"),
    "ag_news": ("fancyzhx/ag_news", None, "train", "test"),
    "imdb": ("stanfordnlp/imdb", None, "train", "test"),
    "wikitext2": ("Salesforce/wikitext", "wikitext-2-raw-v1", "train", "validation"),
    "tiny_shakespeare": ("karpathy/tiny_shakespeare", None, "train", "validation"),
    "squad": ("rajpurkar/squad", None, "train", "validation"),
}

_HUB_REACHABLE: bool | None = None


def _env_offline() -> bool:
    return any(os.environ.get(v, "").upper() in ("1", "ON", "YES", "TRUE")
               for v in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE"))


def hub_reachable(timeout: float = 2.0) -> bool:
    """Whether the hub answers a TCP connection within `timeout` s (cached; the env offline flags win).
    The probe runs in a thread so that a slow DNS lookup cannot block longer than the timeout."""
    global _HUB_REACHABLE
    if _env_offline():
        return False
    if _HUB_REACHABLE is None:
        host = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname or "huggingface.co"
        ok = [False]

        def probe():
            try:
                socket.create_connection((host, 443), timeout=timeout).close()
                ok[0] = True
            except OSError:
                pass
        t = threading.Thread(target=probe, daemon=True)
        t.start()
        t.join(timeout + 0.5)
        _HUB_REACHABLE = ok[0]
    return _HUB_REACHABLE


def _hub_records(name: str, row: dict) -> dict:
    if name == "sst2":
        return {"text": row["sentence"].strip(), "label": int(row["label"])}
    if name == "mrpc":
        return {"text": row["sentence1"].strip(), "text_pair": row["sentence2"].strip(), "label": int(row["label"])}
    if name == "qnli":
        return {"text": row["question"].strip(), "text_pair": row["sentence"].strip(), "label": int(row["label"])}
    if name == "ag_news":
        return {"text": clean_ag_news(row["text"]), "label": int(row["label"])}
    if name == "imdb":
        return {"text": row["text"].replace("<br />", " ").strip(), "label": int(row["label"])}
    if name == "squad":
        a = row["answers"]
        return {"id": row["id"], "title": row["title"], "context": row["context"], "question": row["question"].strip(),
                "answers": [{"text": t, "answer_start": s} for t, s in zip(a["text"], a["answer_start"])]}
    raise KeyError(name)


def read_hub(name: str, seed: int = 0) -> RawData:
    """The task's splits through `datasets.load_dataset`; fails fast (no network wait) when offline."""
    if name not in HUB:
        raise DataUnavailable(f"{name}: no hub dataset is known for this task; it reads local files only "
                              f"({LOCAL_LAYOUT[name][0][0]} under the data folder)")
    ds_id, config, train_split, eval_split = HUB[name]
    if not hub_reachable():
        # let datasets use its cache without touching the network; read at import and in config
        os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import datasets
    if not hub_reachable():   # already imported before the env was set: flip the flags they read
        datasets.config.HF_HUB_OFFLINE = datasets.config.HF_DATASETS_OFFLINE = True
        import huggingface_hub.constants
        huggingface_hub.constants.HF_HUB_OFFLINE = True
    try:
        ds = datasets.load_dataset(ds_id, config)
    except Exception as e:  # offline without cache, or the hub refused: say which and why
        raise DataUnavailable(f"{name}: could not load hub dataset {ds_id!r} (config {config}); "
                              f"hub reachable: {hub_reachable()}; {type(e).__name__}: {e}") from e
    if name in ("wikitext2", "tiny_shakespeare"):
        def docs(split):
            rows = [r["text"] for r in ds[split]]
            return wikitext_articles(rows) if name == "wikitext2" else [{"text": t} for t in rows]
        train, eval_ = docs(train_split), docs(eval_split)
    else:
        train = [_hub_records(name, r) for r in ds[train_split]]
        eval_ = [_hub_records(name, r) for r in ds[eval_split]]
    return RawData(name, train, eval_, f"hub:{ds_id}" + (f"/{config}" if config else ""), eval_split)


# ---------------------------------------------------------------- the entry point

def local_files_present(name: str, root: Path | None) -> bool:
    return root is not None and all((root / f).exists() for f in LOCAL_LAYOUT[name][0])


def missing_message(name: str, root: Path | None) -> str:
    files, layout, _ = LOCAL_LAYOUT[name]
    where = f"under {root}" if root is not None else "(no local data folder found)"
    missing = [f for f in files if root is None or not (root / f).exists()]
    return (f"{name}: local file{'s' if len(missing) > 1 else ''} {', '.join(missing)} not found {where}. "
            f"Expected layout: {layout}. "
            + (f"Online, the hub dataset {HUB[name][0]!r} is used instead." if name in HUB
               else "This task has no hub source."))


def read_raw(name: str, data_dir=None, source: str = "auto", seed: int = 0) -> RawData:
    """The raw train/eval records of task `name` (see the module docstring for `source`)."""
    if name not in LOCAL_LAYOUT:
        raise UnknownTask(f"unknown task {name!r}; known tasks: {', '.join(sorted(LOCAL_LAYOUT))}")
    if source not in ("auto", "local", "hub"):
        raise ValueError(f"source must be 'auto', 'local' or 'hub', got {source!r}")
    root = paths.data_dir(data_dir) if source != "hub" else None
    if source == "hub":
        return read_hub(name, seed)
    if local_files_present(name, root):
        return LOCAL_LAYOUT[name][2](root, seed)
    if source == "auto" and name in HUB and hub_reachable():
        return read_hub(name, seed)
    msg = missing_message(name, root)
    offline = source == "auto" and name in HUB
    raise DataUnavailable(msg + (" The hub is not reachable (offline)." if offline else ""))
