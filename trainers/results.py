"""The results folder: one folder per run, written atomically, plus a summary across runs.

    results/
      <run>/config.json       what was run (experiment + training config, task, model)
      <run>/metrics.json      what came out (task metric, parameters, bytes, memory, time, throughput)
      <run>/loss_log.csv      step, loss, lr
      <run>/adapter_config.json, adapter_model.safetensors
      experiment_summary.csv  one row per run, every column filled
      all_results.json        every run's config and metrics

Every file is written to a temporary name in the same folder and moved into place
with `os.replace`, which is atomic on POSIX and Windows: a reader (or a crash)
sees the old file or the new one, never half of one.
"""
from __future__ import annotations

import csv
import io
import json
import math
import numbers
import os
import tempfile
from pathlib import Path
from typing import Callable

import torch

# The summary's columns, in order. `metric`/`metric_value` is the task's own metric
# (accuracy, F1, perplexity, ...), so one table holds classification and LM runs alike.
SUMMARY_COLUMNS = (
    "run", "config", "method", "quant", "allocation", "task", "model",
    "metric", "metric_value", "final_loss", "trainable_params", "total_params", "trainable_pct",
    "adapter_bytes", "peak_memory_bytes", "peak_memory_kind", "wall_time_s", "tokens_per_s",
    "examples_per_s", "steps", "seed", "device",
)
MISSING = "n/a"   # written (never an empty cell) when a run did not record a column


def _atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(Path(tmp))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    _atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def _jsonable(value):
    """Floats that JSON can hold (NaN/inf become strings), tensors/paths/dtypes as plain values."""
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, torch.Tensor):
        return _jsonable(value.tolist())
    if isinstance(value, (str, bool)) or value is None:
        return value
    if isinstance(value, numbers.Integral):           # also numpy integers
        return int(value)
    if isinstance(value, numbers.Real):
        return float(value) if math.isfinite(value) else str(float(value))
    return str(value)


def atomic_write_json(path: Path, obj) -> None:
    atomic_write_text(path, json.dumps(_jsonable(obj), indent=2, sort_keys=False) + "\n")


def atomic_torch_save(path: Path, obj) -> None:
    _atomic_write(path, lambda tmp: torch.save(obj, tmp))


def write_loss_log(path: Path, loss_log: list[dict]) -> None:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=["step", "loss", "lr"], extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    writer.writerows(loss_log)
    atomic_write_text(path, buf.getvalue())


# What a run writes into its folder; `overwrite` removes exactly these (and nothing else).
RUN_FILES = ("config.json", "metrics.json", "loss_log.csv", "eval_log.json", "rank_history.json",
             "checkpoint.pt", "adapter_config.json", "adapter_model.safetensors", "model.safetensors",
             "error.txt")


def check_run_dir(path: Path, overwrite: bool = False) -> None:
    """Fail early (before loading models and data) if `path` already holds a run."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise FileExistsError(f"results folder: {str(path)!r} exists and is not a directory")
    if path.is_dir() and any(path.iterdir()) and not overwrite:
        raise FileExistsError(f"results folder {str(path)!r} already holds a run; choose another name "
                              f"or pass overwrite=True (--overwrite on the command line) to replace it")


def prepare_run_dir(path: Path, overwrite: bool = False, keep_checkpoint: bool = False) -> Path:
    """Create the run folder; an existing non-empty one is an error unless `overwrite`,
    which deletes the previous run's files (RUN_FILES; checkpoint.pt survives when
    `keep_checkpoint`, for resuming) so nothing stale is mixed with the new run."""
    path = Path(path)
    check_run_dir(path, overwrite)
    if path.is_dir() and overwrite:
        for name in RUN_FILES:
            if not (keep_checkpoint and name == "checkpoint.pt"):
                (path / name).unlink(missing_ok=True)
    path.mkdir(parents=True, exist_ok=True)
    return path


def summary_row(run: str, config: dict, metrics: dict) -> dict:
    """One summary row from a run's config.json and metrics.json (see SUMMARY_COLUMNS)."""
    exp = config.get("experiment", {})
    source = {"run": run, "config": exp.get("name", config.get("name")), "method": exp.get("method"),
              "quant": exp.get("quant") if exp.get("quant") is not None else "none",
              "allocation": exp.get("allocation"), "task": config.get("task"), "model": config.get("model"),
              "seed": config.get("train", {}).get("seed")}
    row = {}
    for column in SUMMARY_COLUMNS:
        value = source.get(column)
        if value is None:
            value = metrics.get(column)
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
