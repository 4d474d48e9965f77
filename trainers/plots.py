"""Plots of runs, written as PNG next to the results (matplotlib: the optional `plot` extra).

    loss_curves.png       training loss per step, one line per run          (a results root)
    rank_heatmap.png      rank per layer x module; for a dynamic method also  (a run folder)
                          every layer's rank over the steps
    rank_ablation.png     metric and trainable % against the rank r          (rank_ablation.csv)
    memory_quality.png    metric against peak memory, one point per method   (memory_ablation.csv)

Every figure is drawn from files alone (metrics.json, loss_log.csv, rank_history.json,
the ablation CSVs), so `redraw(results_dir)` (`python -m trainers plots <dir>`) can
redraw them any time. Matplotlib is imported inside the functions, with the Agg
backend (no display needed), so the rest of nanopeft works without it.
"""
from __future__ import annotations

import csv
import json
import math
from pathlib import Path

PLOT_HINT = "plots need matplotlib: pip install 'nanopeft[plot]' (or pip install matplotlib)"
RANK_HISTORY = "rank_history.json"


def _pyplot():
    try:
        import matplotlib
    except ImportError as err:
        raise ImportError(PLOT_HINT) from err
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def _save(fig, path: Path) -> Path:
    from trainers.results import atomic_write
    import matplotlib.pyplot as plt
    path = Path(path)
    try:                                   # atomic, like every other results file
        atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight"))
    finally:
        plt.close(fig)
    return path


# --- loss curves ------------------------------------------------------------------------------
def plot_loss_curves(curves: dict[str, list[tuple[int, float]]], path: Path, *, title: str = "training loss",
                     log_y: bool = True, smooth: int = 10) -> Path:
    """One line per run: {label: [(step, loss), ...]}; a running mean over `smooth` steps."""
    if not curves:
        raise ValueError("plot_loss_curves: no curves given")
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for label, points in curves.items():
        steps = [s for s, _ in points]
        losses = [v for _, v in points]
        k = max(1, min(smooth, len(losses)))
        running = [sum(losses[max(0, i - k + 1):i + 1]) / len(losses[max(0, i - k + 1):i + 1])
                   for i in range(len(losses))]
        ax.plot(steps, running, label=label, linewidth=1.4)
    if log_y and all(v > 0 for pts in curves.values() for _, v in pts):
        ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel(f"loss (running mean of {smooth})" if smooth > 1 else "loss")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, path)


# --- rank heatmaps ----------------------------------------------------------------------------
def split_layer_module(name: str) -> tuple[int, str]:
    """'model.layers.3.self_attn.q_proj' -> (3, 'self_attn.q_proj'): the first integer in the
    dotted name is the layer, what follows it is the module (-1 and the name if there is none)."""
    parts = name.split(".")
    for i, part in enumerate(parts):
        if part.isdigit():
            return int(part), ".".join(parts[i + 1:]) or parts[-1]
    return -1, name


def rank_grid(ranks: dict[str, int]) -> tuple[list[int], list[str], list[list[float]]]:
    """(layers, modules, grid[layer][module]) from {layer name: rank}; NaN where no adapter."""
    cells = {split_layer_module(n): r for n, r in ranks.items()}
    layers = sorted({l for l, _ in cells})
    modules = []
    for _, m in cells:
        if m not in modules:
            modules.append(m)
    grid = [[float(cells.get((l, m), float("nan"))) for m in modules] for l in layers]
    return layers, modules, grid


def plot_rank_heatmap(rank_history: list[dict], path: Path, *, title: str = "rank allocation",
                      reference: dict[str, int] | None = None, reference_label: str = "planted ranks") -> Path:
    """Final ranks as a layer x module grid (and `reference`, e.g. planted ranks, beside it);
    when the ranks changed during training, also every layer's rank over the steps."""
    if not rank_history:
        raise ValueError("plot_rank_heatmap: empty rank history")
    plt = _pyplot()
    final = rank_history[-1]["ranks"]
    names = list(final)
    changed = any(h["ranks"] != rank_history[0]["ranks"] for h in rank_history)
    panels = [("final ranks", final)] + ([(reference_label, reference)] if reference else [])
    ncols = len(panels) + (1 if changed else 0)
    fig, axes = plt.subplots(1, ncols, figsize=(3.6 * ncols + (2.5 if changed else 0), 4.2), squeeze=False)
    vmax = max([max(p.values(), default=1) for _, p in panels] + [1])
    image = None
    for ax, (label, ranks) in zip(axes[0], panels):
        layers, modules, grid = rank_grid(ranks)
        image = ax.imshow(grid, cmap="viridis", vmin=0, vmax=vmax, aspect="auto")
        ax.set_xticks(range(len(modules)), modules, rotation=45, ha="right", fontsize=7)
        ax.set_yticks(range(len(layers)), [str(l) for l in layers], fontsize=7)
        ax.set_xlabel("module")
        ax.set_ylabel("layer")
        ax.set_title(label, fontsize=9)
        for i, row in enumerate(grid):
            for j, value in enumerate(row):
                if not math.isnan(value):
                    ax.text(j, i, f"{value:.0f}", ha="center", va="center", fontsize=7,
                            color="k" if value > 0.6 * vmax else "w")
    if changed:
        ax = axes[0][-1]
        steps = [h["step"] for h in rank_history]
        over_time = [[h["ranks"].get(n, float("nan")) for h in rank_history] for n in names]
        image = ax.imshow(over_time, cmap="viridis", vmin=0, vmax=vmax, aspect="auto", interpolation="nearest")
        ticks = sorted({0, len(steps) // 2, len(steps) - 1})
        ax.set_xticks(ticks, [str(steps[t]) for t in ticks], fontsize=7)
        ax.set_yticks(range(len(names)), [n[-28:] for n in names], fontsize=6)
        ax.set_xlabel("step")
        ax.set_title("rank over time", fontsize=9)
    fig.colorbar(image, ax=list(axes[0]), shrink=0.8, label="rank")
    fig.suptitle(title, fontsize=10)
    return _save(fig, path)


# --- ablations --------------------------------------------------------------------------------
def _number(value) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return float("nan")


def plot_rank_ablation(rows: list[dict], path: Path, *, title: str = "rank ablation") -> Path:
    """rows: {"r": int or "full", "metric": name, "metric_value", "trainable_pct"} per run."""
    plt = _pyplot()
    low_rank = sorted((r for r in rows if str(r["r"]) != "full"), key=lambda r: int(r["r"]))
    full = [r for r in rows if str(r["r"]) == "full"]
    if not low_rank and not full:
        raise ValueError("plot_rank_ablation: no rows")
    metric = (low_rank or full)[0].get("metric", "metric")
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    xs = [int(r["r"]) for r in low_rank]
    ax.plot(xs, [_number(r["metric_value"]) for r in low_rank], "o-", label=f"LoRA {metric}")
    for r in full:
        ax.axhline(_number(r["metric_value"]), color="k", linestyle="--", label=f"full fine-tuning {metric}")
    ax.set_xscale("log", base=2)
    ax.set_xticks(xs, [str(x) for x in xs])
    ax.minorticks_off()
    ax.set_xlabel("rank r")
    ax.set_ylabel(str(metric))
    ax.grid(alpha=0.3)
    twin = ax.twinx()
    twin.plot(xs, [_number(r["trainable_pct"]) for r in low_rank], "s:", color="tab:orange", label="trainable %")
    twin.set_ylabel("trainable parameters (%)")
    lines = ax.get_legend_handles_labels()
    more = twin.get_legend_handles_labels()
    ax.legend(lines[0] + more[0], lines[1] + more[1], fontsize=8, loc="best")
    ax.set_title(title)
    return _save(fig, path)


def plot_memory_quality(rows: list[dict], path: Path, *, title: str = "memory vs quality") -> Path:
    """rows: {"label", "peak_memory_bytes", "metric", "metric_value", "wall_time_s"} per run."""
    if not rows:
        raise ValueError("plot_memory_quality: no rows")
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for row in rows:
        x = _number(row["peak_memory_bytes"]) / 2 ** 20
        y = _number(row["metric_value"])
        ax.scatter([x], [y], s=40 + 4 * _number(row.get("wall_time_s", 0)))
        ax.annotate(f"{row['label']} ({_number(row.get('wall_time_s')):.1f}s)", (x, y), fontsize=8,
                    xytext=(4, 4), textcoords="offset points")
    ax.set_xlabel("peak memory (MiB)")
    ax.set_ylabel(str(rows[0].get("metric", "metric")))
    ax.grid(alpha=0.3)
    ax.set_title(title + " (marker area ~ wall time)")
    return _save(fig, path)


# --- from files -------------------------------------------------------------------------------
def read_loss_log(path: Path) -> list[tuple[int, float]]:
    with open(path, newline="") as f:
        return [(int(row["step"]), float(row["loss"])) for row in csv.DictReader(f)]


def read_csv(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _hidden(path: Path, top: Path) -> bool:
    """A name under `top` starting with '.' (a replaced run, a temporary) is not a result."""
    return any(part.startswith(".") for part in path.relative_to(top).parts)


def _run_folders(root: Path) -> list[Path]:
    return sorted(p.parent for p in root.glob("*/metrics.json") if not _hidden(p, root))


def redraw(results_dir) -> list[Path]:
    """Redraw every figure from the files under `results_dir` (a results root, a run folder,
    or the top `results/` holding several roots); returns the PNG paths written."""
    top = Path(results_dir)
    if not top.is_dir():
        raise FileNotFoundError(f"redraw: {str(top)!r} is not a folder of results")
    _pyplot()                                  # fail early, with the install hint
    written: list[Path] = []
    roots = sorted({p.parent.parent for p in top.rglob("metrics.json") if not _hidden(p, top)})
    for root in roots:
        runs = _run_folders(root)
        curves = {run.name: read_loss_log(run / "loss_log.csv") for run in runs if (run / "loss_log.csv").exists()}
        curves = {k: v for k, v in curves.items() if v}
        if curves:
            written.append(plot_loss_curves(curves, root / "loss_curves.png", title=f"training loss: {root.name}"))
        reference = None
        if (root / "planted.json").exists():
            reference = json.loads((root / "planted.json").read_text()).get("planted_ranks")
        for run in runs:
            history_path = run / RANK_HISTORY
            if history_path.exists():
                history = json.loads(history_path.read_text())
                if history:
                    written.append(plot_rank_heatmap(history, run / "rank_heatmap.png", title=run.name,
                                                     reference=reference))
        if (root / "rank_ablation.csv").exists():
            written.append(plot_rank_ablation(read_csv(root / "rank_ablation.csv"), root / "rank_ablation.png"))
        if (root / "memory_ablation.csv").exists():
            written.append(plot_memory_quality(read_csv(root / "memory_ablation.csv"),
                                               root / "memory_quality.png"))
    if not written:
        raise FileNotFoundError(f"redraw: nothing to draw under {str(top)!r} (no */metrics.json with "
                                f"loss_log.csv, {RANK_HISTORY} or ablation CSVs)")
    return written
