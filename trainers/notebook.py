"""What every tutorial needs from its surroundings: fast mode, a figure folder, the offline data.

Tutorials are `# %%` cell scripts. They read `FAST` to shrink steps and sizes
(the test suite runs them with NANOPEFT_FAST=1), save figures with `save_figure`
(into NANOPEFT_FIGURES, default `tutorials/figures/`), and find the real data the
way the trainers do (`trainers.paths.data_dir`), saying how to get it when absent.
"""
from __future__ import annotations

import os
from pathlib import Path

from trainers.paths import HUB_HINT, REPO_ROOT, data_dir

FAST = os.environ.get("NANOPEFT_FAST", "") not in ("", "0")


def fast(full, quick):
    """`quick` in fast mode, `full` otherwise: `steps = fast(2000, 40)`."""
    return quick if FAST else full


def figure_dir() -> Path:
    path = Path(os.environ.get("NANOPEFT_FIGURES") or REPO_ROOT / "tutorials" / "figures")
    path.mkdir(parents=True, exist_ok=True)
    return path


def save_figure(fig, name: str) -> Path:
    """Write a matplotlib figure as PNG and say where; returns the path."""
    path = figure_dir() / f"{name}.png"
    fig.savefig(path, dpi=110, bbox_inches="tight")
    print(f"figure: {path}")
    return path


def pyplot():
    """matplotlib.pyplot with a file-only backend when no display is set."""
    try:
        import matplotlib
    except ImportError as err:
        raise ImportError("the tutorials draw figures with matplotlib: pip install -e '.[plot]'") from err
    if not os.environ.get("DISPLAY") and not os.environ.get("MPLBACKEND"):
        matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def local_data(what: str, hub_id: str):
    """The offline data folder, or None after printing how to get `what` online."""
    root = data_dir()
    if root is None:
        print(f"[{what}] no local data folder; online, load the hub id {hub_id!r} instead, or {HUB_HINT}")
    return root
