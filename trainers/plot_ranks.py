"""Rank heatmaps: where an allocation put its rank (matplotlib: the optional `plot` extra).

A model's adapted layers form a grid, layer (the first integer in the dotted name,
`model.layers.3.self_attn.q_proj` -> 3) x module (what follows it, `self_attn.q_proj`).
`plot_rank_heatmap` colours that grid by the final rank (a blank cell: no adapter there),
beside a reference grid when there is one (the planted ranks of trainers/planted.py),
and, when the ranks changed during training (AdaLoRA, DRaFT-Q), adds every layer's rank
over the steps. Names are never cut: rows of the over-time panel are `layer.module`
in full, and the figure grows with the number of layers and modules (with
constrained layout, so no tick label runs into the next panel).
"""
from __future__ import annotations

import math
from pathlib import Path

from trainers.plots import _pyplot, _save

MAX_ANNOTATED_CELLS = 400    # above this, numbers in the cells would be unreadable


def split_layer_module(name: str) -> tuple[int, str]:
    """'model.layers.3.self_attn.q_proj' -> (3, 'self_attn.q_proj'): the first integer in the
    dotted name is the layer, what follows it is the module (-1 and the name if there is none)."""
    parts = name.split(".")
    for i, part in enumerate(parts):
        if part.isdigit():
            return int(part), ".".join(parts[i + 1:]) or parts[-1]
    return -1, name


def short_name(name: str) -> str:
    """'model.layers.3.self_attn.q_proj' -> '3.self_attn.q_proj' (the name itself without a layer)."""
    layer, module = split_layer_module(name)
    return f"{layer}.{module}" if layer >= 0 else name


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


def _grid_panel(ax, label: str, ranks: dict[str, int], vmax: float):
    layers, modules, grid = rank_grid(ranks)
    image = ax.imshow(grid, cmap="viridis", vmin=0, vmax=vmax, aspect="auto", interpolation="nearest")
    ax.set_xticks(range(len(modules)), modules, rotation=35 if len(modules) > 2 else 0, ha="right"
                  if len(modules) > 2 else "center", fontsize=7)
    ax.set_yticks(range(len(layers)), [str(l) for l in layers], fontsize=7)
    ax.set_xlabel("module")
    ax.set_ylabel("layer")
    blank = any(math.isnan(v) for row in grid for v in row)
    ax.set_title(label + (" (blank: no adapter)" if blank else ""), fontsize=9)
    if len(layers) * len(modules) <= MAX_ANNOTATED_CELLS:
        for i, row in enumerate(grid):
            for j, value in enumerate(row):
                if not math.isnan(value):
                    ax.text(j, i, f"{value:.0f}", ha="center", va="center", fontsize=7,
                            color="k" if value > 0.6 * vmax else "w")
    return image


def _over_time_panel(ax, rank_history: list[dict], names: list[str], vmax: float):
    """Row per layer, x in real steps: each snapshot's ranks hold until the next snapshot."""
    steps = [h["step"] for h in rank_history]
    last = steps[-1] + max(1, (steps[-1] - steps[0]) // max(1, 2 * len(steps)))
    edges = steps + [last]                                               # (T + 1,) column edges
    over_time = [[h["ranks"].get(n, float("nan")) for h in rank_history] for n in names]   # (layers, T)
    image = ax.pcolormesh(edges, range(len(names) + 1), over_time, cmap="viridis", vmin=0, vmax=vmax)
    ax.set_ylim(len(names), 0)                                           # first layer on top, as in the grid
    ax.set_yticks([i + 0.5 for i in range(len(names))], [short_name(n) for n in names],
                  fontsize=6 if len(names) > 24 else 7)
    ax.tick_params(axis="x", labelsize=7)
    ax.set_xlabel("step")
    ax.set_title("rank over time", fontsize=9)
    return image


def plot_rank_heatmap(rank_history: list[dict], path: Path, *, title: str = "rank allocation",
                      reference: dict[str, int] | None = None, reference_label: str = "planted ranks") -> Path:
    """Final ranks as a layer x module grid (and `reference`, e.g. planted ranks, beside it);
    when the ranks changed during training, also every layer's rank over the steps.
    rank_history: [{"step": int, "ranks": {layer name: rank}}, ...], oldest first."""
    if not rank_history:
        raise ValueError("plot_rank_heatmap: empty rank history")
    plt = _pyplot()
    final = rank_history[-1]["ranks"]
    names = list(final)
    changed = any(h["ranks"] != rank_history[0]["ranks"] for h in rank_history)
    panels = [("final ranks", final)] + ([(reference_label, reference)] if reference else [])
    layers, modules, _ = rank_grid(final)
    panel_width = 1.6 + 0.55 * len(modules)
    time_width = 3.0 + 0.06 * max(len(short_name(n)) for n in names)      # the panel plus its row labels
    height = max(3.6, 1.8 + 0.32 * len(layers), 1.6 + 0.16 * len(names) if changed else 0)
    widths = [panel_width] * len(panels) + ([time_width] if changed else [])
    fig, axes = plt.subplots(1, len(widths), figsize=(sum(widths) + 1.2, height), squeeze=False,
                             width_ratios=widths, layout="constrained")
    # one colour scale for every panel, the history included (AdaLoRA starts above its final ranks)
    vmax = max([max(p.values(), default=1) for _, p in panels]
               + [max(h["ranks"].values(), default=1) for h in rank_history] + [1])
    image = None
    for ax, (label, ranks) in zip(axes[0], panels):
        image = _grid_panel(ax, label, ranks, vmax)
    if changed:
        image = _over_time_panel(axes[0][-1], rank_history, names, vmax)
    fig.colorbar(image, ax=list(axes[0]), shrink=0.8, label="rank")
    fig.suptitle(title, fontsize=10)
    return _save(fig, path)
