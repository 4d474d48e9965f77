"""The results folder: one folder per run, written atomically, plus a summary across runs.

    results/
      <run>/config.json       what was run (experiment + training config, task, model; "used": the
                              layers, ranks, alphas and allocator settings prepare chose)
      <run>/metrics.json      what came out (task metric, parameters, bytes, memory, time, throughput,
                              inference speed, final ranks)
      <run>/loss_log.csv      step, loss, lr
      <run>/eval_log.json, rank_history.json ({step, ranks} of the adaptive methods' decisions)
      <run>/bits.json         quantized runs: {layer: 4 or 8} (which layers a mixed base kept at 8 bits)
      <run>/adapter_config.json, adapter_model.safetensors
      experiment_summary.csv  one row per run, every column filled
      all_results.json        every run's config and metrics

Every file is written to a temporary name in the same folder and moved into place
with `os.replace`, which is atomic on POSIX and Windows: a reader (or a crash)
sees the old file or the new one, never half of one (lora.files.atomic_write,
the project's one atomic write: files get the user's umask permissions, and a killed
writer's temporary is removed by the next write). Names that start with '.' are
never results: every reader here skips them (temporaries, a replaced run, .DS_Store).

A run folder is all or nothing (`run_folder`): a run that fails leaves the folder as
it was, with one exception made on purpose: once training has written checkpoint.pt,
the folder keeps config.json and that checkpoint, so `resume=True` (`--resume`) can
continue the run. `overwrite=True` replaces a finished run; it refuses to delete an
unfinished run's checkpoint (resume it, or delete checkpoint.pt yourself).
"""
from __future__ import annotations

import contextlib
import csv
import io
import json
import math
import numbers
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable, Iterator

import torch

from lora import files   # the one atomic write (lora may not import trainers)

# The summary's columns, in order. `metric`/`metric_value` is the task's own metric
# (accuracy, F1, perplexity, ...), so one table holds classification and LM runs alike.
# Memory is in MiB (2^20 bytes) next to the exact bytes: `peak_memory_*` is what the device
# reported (trainers.train.peak_memory), `state_*` the analytic training state (weights as
# stored, gradients, AdamW moments; trainers.train.training_state_bytes). `tokens_per_s` and
# `examples_per_s` are training throughput; the `inference_*` columns are inference speed
# (trainers/inference.py: per second at batch 1 and batched, adapters unmerged and merged).
SUMMARY_COLUMNS = (
    "run", "config", "method", "quant", "allocation", "task", "model",
    "metric", "metric_value", "final_loss", "trainable_params", "total_params", "trainable_pct",
    "adapter_bytes", "peak_memory_mib", "peak_memory_bytes", "peak_memory_kind", "state_mib", "state_bytes",
    "wall_time_s", "tokens_per_s", "examples_per_s",
    "inference_unit", "inference_b1_per_s", "inference_batched_per_s", "inference_b1_merged_per_s",
    "inference_batched_merged_per_s", "inference_latency_ms_b1", "inference_batch_size", "inference_merged_base",
    "steps", "seed", "device",
)
MIB = 2 ** 20
MISSING = "n/a"   # written (never an empty cell) when a run did not record a column


def atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """write(tmp) to a temporary beside `path`, then rename it into place (parents created)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    files.atomic_write(path, write)


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def jsonable(value):
    """Floats that JSON can hold (NaN/inf become strings), tensors/paths/dtypes as plain values."""
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, torch.Tensor):
        return jsonable(value.tolist())
    if isinstance(value, (str, bool)) or value is None:
        return value
    if isinstance(value, numbers.Integral):           # also numpy integers
        return int(value)
    if isinstance(value, numbers.Real):
        return float(value) if math.isfinite(value) else str(float(value))
    return str(value)


def atomic_write_json(path: Path, obj) -> None:
    atomic_write_text(path, json.dumps(jsonable(obj), indent=2, sort_keys=False) + "\n")


def atomic_torch_save(path: Path, obj) -> None:
    atomic_write(path, lambda tmp: torch.save(obj, tmp))


def write_loss_log(path: Path, loss_log: list[dict]) -> None:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=["step", "loss", "lr"], extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    writer.writerows(loss_log)
    atomic_write_text(path, buf.getvalue())


# What a run writes into its folder; `overwrite` replaces exactly these (and nothing else).
# (error.txt: what earlier versions wrote into a failed matrix run's folder.)
RUN_FILES = ("config.json", "metrics.json", "loss_log.csv", "eval_log.json", "rank_history.json", "bits.json",
             "checkpoint.pt", "adapter_config.json", "adapter_model.safetensors", "model.safetensors",
             "error.txt")
CHECKPOINT = "checkpoint.pt"          # trainers.train.CHECKPOINT_NAME
REPLACED = ".replaced-"               # prefix of the hidden folder that holds a run being replaced


def _visible(path: Path) -> list[Path]:
    return [p for p in path.iterdir() if not p.name.startswith(".")]


def run_state(path: Path) -> str:
    """What a run folder holds: "empty" (absent, or only hidden names), "finished" (metrics.json),
    "resumable" (checkpoint.pt and no metrics.json: a run stopped part-way), or "occupied"."""
    path = Path(path)
    if not path.is_dir() or not _visible(path):
        return "empty"
    if (path / "metrics.json").exists():
        return "finished"
    return "resumable" if (path / CHECKPOINT).exists() else "occupied"


def checkpoint_progress(path: Path) -> str:
    """'step S of N' of a run folder's checkpoint (memory-mapped: nothing big is read)."""
    try:
        state = torch.load(Path(path) / CHECKPOINT, map_location="cpu", weights_only=False, mmap=True)
        return f"step {state['step']} of {state['config']['steps']}"
    except Exception as err:                  # noqa: BLE001 - only a description for a message
        return f"unreadable: {type(err).__name__}"


def check_writable(path: Path) -> None:
    """The folder, or the nearest ancestor that exists, is a writable directory."""
    if path.exists() and not path.is_dir():
        raise FileExistsError(f"results folder: {str(path)!r} exists and is not a directory")
    ancestor = next(p for p in (path, *path.parents) if p.exists())
    if not ancestor.is_dir():
        raise NotADirectoryError(f"results folder {str(path)!r}: {str(ancestor)!r} is a file, not a folder")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise PermissionError(f"results folder {str(path)!r}: {str(ancestor)!r} is not writable")


def check_run_dir(path: Path, overwrite: bool = False, resume: bool = False) -> None:
    """Fail early (before loading models and data) unless `path` can take the run: an empty
    or absent folder; a finished run with `overwrite`; a resumable one with `resume`."""
    path = Path(path)
    if overwrite and resume:
        raise ValueError("overwrite and resume exclude each other: resume continues the run in the folder, "
                         "overwrite starts a new one")
    check_writable(path)
    state = run_state(path)
    if resume:
        if state != "resumable":
            why = {"empty": "it holds no run", "occupied": f"it holds no {CHECKPOINT} (the run stopped before "
                                                           f"its first checkpoint; use checkpoint_every > 0)",
                   "finished": "its run finished (metrics.json is there)"}[state]
            raise FileNotFoundError(f"resume: nothing to resume in {str(path)!r}: {why}")
        return
    if state == "resumable":
        where = f"{str(path)!r} holds an unfinished run with a checkpoint ({checkpoint_progress(path)})"
        if overwrite:
            raise FileExistsError(f"results folder {where}; overwrite (--overwrite) does not delete a checkpoint: "
                                  f"continue the run with --resume (resume=True), or delete "
                                  f"{str(path / CHECKPOINT)!r} yourself to start again")
        raise FileExistsError(f"results folder {where}; continue it with --resume (resume=True), or choose "
                              f"another name")
    if state != "empty" and not overwrite:
        raise FileExistsError(f"results folder {str(path)!r} already holds a run; choose another name "
                              f"or pass overwrite=True (--overwrite on the command line) to replace it")


@contextlib.contextmanager
def run_folder(path: Path, *, overwrite: bool = False, resume: bool = False) -> Iterator[Path]:
    """`with run_folder(out_dir) as folder:` write the run's files; all or nothing.

    On entry the folder is checked (check_run_dir) and created; with `overwrite` the previous
    run's files (RUN_FILES) move aside into a hidden `.replaced-*` folder. If the body
    finishes, the replaced files are deleted. If it raises (or is interrupted), every file and
    folder it made is removed and the replaced files move back, unless training wrote a
    checkpoint: then config.json and checkpoint.pt stay for `resume` (and a replaced run stays
    aside, hidden, until a run in this folder finishes). A resumed run keeps what it has."""
    path = Path(path)
    check_run_dir(path, overwrite, resume)
    created = [p for p in (path, *path.parents) if not p.exists()]      # deepest first
    path.mkdir(parents=True, exist_ok=True)
    before = {p.name for p in path.iterdir()}
    aside = None
    moved: list[str] = []
    try:
        if overwrite:
            moved = [name for name in RUN_FILES if (path / name).exists()]
            if moved:
                aside = Path(tempfile.mkdtemp(prefix=REPLACED, dir=path))
                for name in moved:
                    os.replace(path / name, aside / name)
        yield path
    except BaseException:
        if not resume and not (path / CHECKPOINT).exists():
            _undo(path, before - set(moved), aside, moved, created)
        raise
    for old in path.glob(f"{REPLACED}*"):      # this run and any earlier replaced one are over
        shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def adding_to(folder: Path) -> Iterator[Path]:
    """`with adding_to(out):` a body that only adds files and folders under `out` (made if
    needed): if it fails, what it added is removed, so `out` is left as it was."""
    folder = Path(folder)
    check_writable(folder)
    created = [p for p in (folder, *folder.parents) if not p.exists()]      # deepest first
    folder.mkdir(parents=True, exist_ok=True)
    before = {p.name for p in folder.iterdir()}
    try:
        yield folder
    except BaseException:
        _undo(folder, before, None, [], created)
        raise


def _undo(path: Path, kept: set[str], aside: Path | None, moved: list[str], created: list[Path]) -> None:
    """Put `path` back as it was: remove what is not in `kept`, move `moved` back from `aside`,
    and remove the folders in `created` (deepest first) that are empty again."""
    for entry in path.iterdir():
        if entry.name in kept or entry == aside:
            continue
        if entry.is_dir():
            shutil.rmtree(entry)
        else:
            entry.unlink()
    for name in moved:
        os.replace(aside / name, path / name)
    if moved:
        aside.rmdir()
    for folder in created:
        with contextlib.suppress(OSError):    # not empty: someone else wrote there meanwhile
            folder.rmdir()


def summary_row(run: str, config: dict, metrics: dict) -> dict:
    """One summary row from a run's config.json and metrics.json (see SUMMARY_COLUMNS)."""
    exp = config.get("experiment", {})
    quant = exp.get("quant")
    if isinstance(quant, dict):                      # a fixed {pattern: bits}: one cell, readable in a CSV
        quant = " ".join(f"{k}={v}" for k, v in quant.items())
    source = {"run": run, "config": exp.get("name", config.get("name")), "method": exp.get("method"),
              "quant": quant if quant is not None else "none",
              "allocation": exp.get("allocation"), "task": config.get("task"), "model": config.get("model"),
              "seed": config.get("train", {}).get("seed")}
    row = {}
    for column in SUMMARY_COLUMNS:
        value = source.get(column)
        if value is None:
            value = metrics.get(column)
        if value is None and column.endswith("_mib"):
            exact = metrics.get(column[:-len("_mib")] + "_bytes")
            value = round(exact / MIB, 3) if isinstance(exact, numbers.Real) else None
        row[column] = MISSING if value is None or value == "" else value
    return row


def load_runs(results_root: Path) -> list[tuple[str, dict, dict]]:
    """(run name, config, metrics) for every sub-folder holding a metrics.json, sorted by name."""
    root = Path(results_root)
    if not root.is_dir():
        raise FileNotFoundError(f"results folder {str(root)!r} does not exist")
    runs = []
    for metrics_path in sorted(root.glob("*/metrics.json")):
        folder = metrics_path.parent
        if folder.name.startswith("."):
            continue
        config_path = folder / "config.json"
        config = json.loads(config_path.read_text()) if config_path.exists() else {}
        runs.append((folder.name, config, json.loads(metrics_path.read_text())))
    return runs


def write_summary(results_root: Path) -> tuple[Path, Path]:
    """Write experiment_summary.csv (one row per run) and all_results.json under
    `results_root`; returns both paths."""
    root = Path(results_root)
    runs = load_runs(root)
    if not runs:
        raise FileNotFoundError(f"results folder {str(root)!r} holds no run (no */metrics.json)")
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(SUMMARY_COLUMNS), lineterminator="\n")
    writer.writeheader()
    for run, config, metrics in runs:
        writer.writerow(summary_row(run, config, metrics))
    csv_path, json_path = root / "experiment_summary.csv", root / "all_results.json"
    atomic_write_text(csv_path, buf.getvalue())
    atomic_write_json(json_path, {run: {"config": config, "metrics": metrics} for run, config, metrics in runs})
    return csv_path, json_path
