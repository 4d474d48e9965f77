"""Plots of runs, written as PNG next to the results (matplotlib: the optional `plot` extra).

    loss_curves.png       training loss per step, one panel per task, one line   (a results root)
                          per run
    loss_curve.png        the training loss of one run                           (a run folder)
    rank_heatmap.png      rank per layer x module; for a dynamic method also     (a run folder)
                          every layer's rank over the steps (trainers/plot_ranks.py)
    rank_ablation.png     metric and trainable % against the rank r             (rank_ablation.csv)
    memory_quality.png    metric against peak memory (and against the exact      (memory_ablation.csv)
                          training-state bytes), one point per method

Every figure is drawn from files alone (config.json, metrics.json, loss_log.csv,
rank_history.json, the ablation CSVs), so `redraw(results_dir)` (`python -m trainers
plots <dir>`) can redraw them any time, and `draw_run(run_dir)` draws one run's own.
Matplotlib is imported inside the functions, with the Agg backend (no display
needed), so the rest of nanopeft works without it.

Reading a loss plot. Tasks have different losses (cross-entropy of a language model,
of a classifier, the planted task's squared error), so each task gets its own panel.
The y axis is logarithmic when the losses span more than a decade, with labelled
ticks at 1, 2 and 5 times the powers of ten; it stops `FLOOR_DECADES` decades below
the median final loss (rounded down to a power of ten), so one run that falls to float
precision (the planted benchmark's oracle reaches ~1e-12) cannot squeeze the others into
a band, and that run's legend entry says how low it went; within a decade the axis is
linear. Every line has its own colour and marker shape (markers staggered), and lines
within `COINCIDE_FRACTION` of the axis height of an earlier one at every step (LoRA and
QLoRA on the planted problem draw the same line) are dashed, with a legend entry naming
the line they overlap. Legends sit beside the axes, never over the lines.
"""
from __future__ import annotations

import csv
import json
import math
from pathlib import Path

PLOT_HINT = "plots need matplotlib: pip install 'nanopeft[plot]' (or pip install matplotlib)"
RANK_HISTORY = "rank_history.json"
COINCIDE_FRACTION = 0.005  # lines closer than this share of the axis height at every step overlap (~1 px)
FLOOR_DECADES = 3        # the loss axis shows this many decades below the median final loss
MARKERS = "osD^vP*Xh<"
FOLLOWER_DASHES = ("--", ":", "-.", (0, (1, 3)), (0, (5, 1)))


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
def running_mean(values: list[float], k: int) -> list[float]:
    """The mean of the last k values at each position (fewer at the start)."""
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v - (values[i - k] if i >= k else 0.0)
        out.append(total / min(i + 1, k))
    return out


def coincident_groups(curves: dict[str, tuple[list, list[float]]], atol: float) -> list[list[str]]:
    """Labels grouped by curves within `atol` of each other at every step ({label: (steps,
    values)}, values in axis units); each group's first label is its leader, in the order given."""
    groups: list[list[str]] = []
    for label, (steps, values) in curves.items():
        for group in groups:
            lead_steps, lead = curves[group[0]]
            if lead_steps == steps and all(abs(a - b) <= atol for a, b in zip(lead, values)):
                group.append(label)
                break
        else:
            groups.append([label])
    return groups


def _fmt_tick(value: float, _pos=None) -> str:
    return f"{value:g}"


def _loss_axis(ax, values: list[float], finals: list[float], log_y: bool = True):
    """Log (with a floor; when `log_y`) or linear y axis for these losses. Returns (floor or None, to_axis):
    the floor when it cuts a curve, and the map from a loss to its height as a fraction of the axis."""
    from matplotlib import ticker
    lo, hi = min(values), max(values)
    if not log_y or lo <= 0 or hi <= 10 * lo:     # within a decade (or not positive): linear reads best
        ax.yaxis.set_major_formatter(ticker.FuncFormatter(_fmt_tick))
        span = (hi - lo) * 1.1 or 1.0
        return None, lambda v: v / span
    top = hi * 1.3
    median = sorted(finals)[len(finals) // 2]
    floor = 10.0 ** (math.floor(math.log10(median)) - FLOOR_DECADES)      # a power of ten: a labelled tick
    bottom = max(lo / 1.3, floor)
    ax.set_yscale("log")
    ax.set_ylim(bottom, top)
    decades = math.log10(top / bottom)
    subs = (1.0,) if decades > 4 else (1.0, 2.0, 5.0) if decades > 1.2 else tuple(float(s) for s in range(1, 10))
    ax.yaxis.set_major_locator(ticker.LogLocator(base=10, subs=subs))
    ax.yaxis.set_major_formatter(ticker.FuncFormatter(_fmt_tick))
    ax.yaxis.set_minor_locator(ticker.LogLocator(base=10, subs=tuple(float(s) for s in range(2, 10))))
    ax.yaxis.set_minor_formatter(ticker.NullFormatter())
    return (bottom if lo < bottom else None), lambda v: math.log10(max(v, bottom)) / decades


def _loss_panel(ax, curves: dict[str, list[tuple[int, float]]], smooth: int, log_y: bool) -> int:
    """One axes: a line per run (running mean over up to `smooth` steps, a tenth of a short run);
    returns the window used."""
    k = max(1, min([smooth] + [max(1, len(points) // 10) for points in curves.values()]))
    drawn = {label: ([s for s, _ in points], running_mean([v for _, v in points], k))
             for label, points in curves.items()}
    everything = [x for _, v in drawn.values() for x in v]
    floor, to_axis = _loss_axis(ax, everything, [v[-1] for _, v in drawn.values()], log_y)
    on_axis = {label: (steps, [to_axis(v) for v in values]) for label, (steps, values) in drawn.items()}
    # Every line has its own colour and marker shape, the markers staggered along the steps, so
    # lines that run close together stay distinguishable; lines within COINCIDE_FRACTION of the
    # axis height of an earlier one at every step are dashed, and the legend names that one.
    order = {label: i for i, label in enumerate(drawn)}
    for group in coincident_groups(on_axis, COINCIDE_FRACTION):
        for j, label in enumerate(group):
            steps, values = drawn[label]
            i = order[label]
            name = label if j == 0 else f"{label} (overlaps {group[0]})"
            if floor is not None and min(values) < floor:
                name += f" (below the axis: min {min(values):.1e})"
            every = max(1, len(steps) // 8)
            ax.plot(steps, values, color=f"C{i % 10}", marker=MARKERS[i % len(MARKERS)], markersize=4,
                    markevery=(every * i // len(drawn), every), label=name,
                    linestyle="-" if j == 0 else FOLLOWER_DASHES[(j - 1) % len(FOLLOWER_DASHES)],
                    linewidth=2.6 if j == 0 and len(group) > 1 else 1.4)
    ax.set_xlabel("step")
    ax.set_ylabel(f"training loss (running mean of {k})" if k > 1 else "training loss")
    ax.grid(alpha=0.3, which="major")
    ax.grid(alpha=0.1, which="minor")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)   # beside, never over
    return k


def plot_loss_panels(panels: dict[str, dict[str, list[tuple[int, float]]]], path: Path, *,
                     title: str = "training loss", log_y: bool = True, smooth: int = 10) -> Path:
    """One axes per panel ({panel title: {label: [(step, loss), ...]}}), each line a running mean
    over `smooth` steps (fewer for short runs); see the module docstring for the axis."""
    panels = {name: curves for name, curves in panels.items() if curves}
    if not panels:
        raise ValueError("plot_loss_curves: no curves given")
    plt = _pyplot()
    ncols = 1 if len(panels) <= 2 else 2
    nrows = math.ceil(len(panels) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(9.5 * ncols, 4.2 * nrows), squeeze=False, layout="constrained")
    for ax, (name, curves) in zip(axes.flat, panels.items()):
        _loss_panel(ax, curves, smooth, log_y)
        ax.set_title(name, fontsize=10)
    for ax in list(axes.flat)[len(panels):]:
        ax.set_visible(False)
    if title:
        fig.suptitle(title, fontsize=11)
    return _save(fig, path)


def plot_loss_curves(curves: dict[str, list[tuple[int, float]]], path: Path, *, title: str = "training loss",
                     log_y: bool = True, smooth: int = 10) -> Path:
    """One panel, one line per run: {label: [(step, loss), ...]} (runs of one task)."""
    if not curves:
        raise ValueError("plot_loss_curves: no curves given")
    return plot_loss_panels({title: curves}, path, title="", log_y=log_y, smooth=smooth)


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
    fig, ax = plt.subplots(figsize=(6.5, 4.6), layout="constrained")
    xs = [int(r["r"]) for r in low_rank]
    ax.plot(xs, [_number(r["metric_value"]) for r in low_rank], "o-", label=f"LoRA: {metric}")
    for r in full:
        ax.axhline(_number(r["metric_value"]), color="k", linestyle="--", label=f"full fine-tuning: {metric}")
    ax.set_xscale("log", base=2)
    ax.set_xticks(xs, [str(x) for x in xs])
    ax.minorticks_off()
    ax.set_xlabel("rank r")
    ax.set_ylabel(str(metric))
    ax.grid(alpha=0.3)
    twin = ax.twinx()
    twin.plot(xs, [_number(r["trainable_pct"]) for r in low_rank], "s:", color="tab:orange",
              label="LoRA: trainable % (right axis)")
    twin.set_ylabel("trainable parameters (%)")
    lines, labels = ax.get_legend_handles_labels()
    more, more_labels = twin.get_legend_handles_labels()
    # below the axes, so it never covers a point
    fig.legend(lines + more, labels + more_labels, fontsize=8, loc="outside lower center", ncol=3)
    ax.set_title(title)
    return _save(fig, path)


def plot_memory_quality(rows: list[dict], path: Path, *, title: str = "memory vs quality") -> Path:
    """rows: {"label", "peak_memory_bytes", "metric", "metric_value", "wall_time_s"} per run, and
    "state_bytes" (trainers.memory.training_state_bytes) when known: a second panel against those."""
    if not rows:
        raise ValueError("plot_memory_quality: no rows")
    plt = _pyplot()
    panels = [("peak_memory_bytes", f"peak memory (MiB, {rows[0].get('peak_memory_kind') or 'measured'})")]
    if all(not math.isnan(_number(r.get("state_bytes"))) for r in rows):
        panels.append(("state_bytes", "weights + grads + AdamW moments (MiB, exact)"))
    fig, axes = plt.subplots(1, len(panels), figsize=(6.2 * len(panels), 4.4), squeeze=False, sharey=True,
                             layout="constrained")
    for ax, (column, xlabel) in zip(axes[0], panels):
        for i, row in enumerate(rows):
            x, y = _number(row[column]) / 2 ** 20, _number(row["metric_value"])
            ax.scatter([x], [y], s=40 + 4 * _number(row.get("wall_time_s", 0)), color=f"C{i % 10}")
            ax.annotate(f"{row['label']} ({_number(row.get('wall_time_s')):.1f} s)", (x, y), fontsize=8,
                        xytext=(0, 7), textcoords="offset points", ha="center")
        ax.margins(x=0.25, y=0.18)          # room for the labels inside the axes
        ax.set_xlabel(xlabel)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel(str(rows[0].get("metric", "metric")))
    fig.suptitle(title + " (marker area ~ wall time)")
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


def _task_of(run: Path) -> str:
    """The run's task (config.json), else the part of the folder name before '__', else '?'."""
    try:
        task = json.loads((run / "config.json").read_text()).get("task")
    except (OSError, ValueError):
        task = None
    return str(task) if task else (run.name.split("__")[0] if "__" in run.name else "?")


def _loss_panels(runs: list[Path]) -> dict[str, dict[str, list[tuple[int, float]]]]:
    """{task: {run label: loss log}}; a matrix run's label drops its 'task__' prefix."""
    panels: dict[str, dict[str, list]] = {}
    for run in runs:
        if (run / "loss_log.csv").exists():
            points = read_loss_log(run / "loss_log.csv")
            task = _task_of(run)
            if points:
                panels.setdefault(task, {})[run.name.removeprefix(f"{task}__")] = points
    return panels


def _reference_ranks(root: Path) -> dict | None:
    """The planted ranks, when `root` is a planted-benchmark folder."""
    if (root / "planted.json").exists():
        return json.loads((root / "planted.json").read_text()).get("planted_ranks")
    return None


def _heatmap(run: Path, reference: dict | None) -> Path | None:
    from trainers.plot_ranks import plot_rank_heatmap
    history_path = run / RANK_HISTORY
    if history_path.exists():
        history = json.loads(history_path.read_text())
        if history:
            return plot_rank_heatmap(history, run / "rank_heatmap.png", title=run.name, reference=reference)
    return None


def draw_run(run_dir) -> list[Path]:
    """One run folder's own figures, from its files: loss_curve.png (from loss_log.csv) and
    rank_heatmap.png (from rank_history.json; beside the planted ranks in a planted folder)."""
    run = Path(run_dir)
    if not (run / "metrics.json").exists() and not (run / "loss_log.csv").exists():
        raise FileNotFoundError(f"draw_run: {str(run)!r} is not a run folder (no metrics.json or loss_log.csv)")
    _pyplot()                                  # fail early, with the install hint
    written = []
    points = read_loss_log(run / "loss_log.csv") if (run / "loss_log.csv").exists() else []
    if points:
        written.append(plot_loss_curves({run.name: points}, run / "loss_curve.png",
                                        title=f"training loss: {run.name} ({_task_of(run)})"))
    heatmap = _heatmap(run, _reference_ranks(run.parent))
    if heatmap is not None:
        written.append(heatmap)
    if not written:
        raise FileNotFoundError(f"draw_run: nothing to draw in {str(run)!r} (empty loss_log.csv and no "
                                f"{RANK_HISTORY})")
    return written


def redraw(results_dir) -> list[Path]:
    """Redraw every figure from the files under `results_dir` (a results root, a run folder,
    or the top `results/` holding several roots); returns the PNG paths written."""
    top = Path(results_dir)
    if not top.is_dir():
        raise FileNotFoundError(f"redraw: {str(top)!r} is not a folder of results")
    _pyplot()                                  # fail early, with the install hint
    if (top / "metrics.json").exists():
        return draw_run(top)
    written: list[Path] = []
    roots = sorted({p.parent.parent for p in top.rglob("metrics.json") if not _hidden(p, top)})
    for root in roots:
        runs = _run_folders(root)
        panels = _loss_panels(runs)
        if panels:
            written.append(plot_loss_panels(panels, root / "loss_curves.png", title=f"training loss: {root.name}"))
        reference = _reference_ranks(root)
        written.extend(p for p in (_heatmap(run, reference) for run in runs) if p is not None)
        if (root / "rank_ablation.csv").exists():
            written.append(plot_rank_ablation(read_csv(root / "rank_ablation.csv"), root / "rank_ablation.png"))
        if (root / "memory_ablation.csv").exists():
            written.append(plot_memory_quality(read_csv(root / "memory_ablation.csv"),
                                               root / "memory_quality.png"))
    if not written:
        raise FileNotFoundError(f"redraw: nothing to draw under {str(top)!r} (no */metrics.json with "
                                f"loss_log.csv, {RANK_HISTORY} or ablation CSVs)")
    return written
