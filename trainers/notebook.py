"""What every tutorial needs from its surroundings: fast mode, a figure folder, the offline data.

Tutorials are `# %%` cell scripts. They read `FAST` to shrink steps and sizes
(the test suite runs them with NANOPEFT_FAST=1), save figures with `save_figure`
(into NANOPEFT_FIGURES, default `tutorials/figures/`), and find the real data the
way the trainers do (`trainers.paths.data_dir`), saying how to get it when absent.
"""
from __future__ import annotations

import os
from pathlib import Path
from types import SimpleNamespace

import torch

from trainers.paths import HUB_HINT, REPO_ROOT, data_dir

FAST = os.environ.get("NANOPEFT_FAST", "") not in ("", "0")
if FAST:  # tiny models: a second intra-op thread only adds synchronisation (as in tests/conftest.py)
    torch.set_num_threads(1)


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


def have_stories() -> bool:
    """Whether stories260K and Tiny Shakespeare are in the local data folder (says how to get them if not)."""
    root = local_data("stories260K + Tiny Shakespeare", "karpathy/tinyllamas")
    return (root is not None and (root / "stories260K" / "stories260K.bin").exists()
            and (root / "tiny_shakespeare" / "input.txt").exists())


def stories_or_planted(steps: int, block: int, lr: float, planted_lr: float = 1e-2):
    """The tutorials' workbench: stories260K fine-tuned on Tiny Shakespeare when the files are
    here, else the synthetic planted-rank MLP of trainers.planted (so every tutorial runs).

    Returns a namespace: what, model, batches (epoch -> iterator), evaluate (model -> metrics),
    key (the metric to read: "loss" or "mse"), batch_size, lr, targets (module names for
    LoRA), planted_ranks (None for the real model).
    """
    if have_stories():
        from trainers.evaluate import make_evaluator
        from trainers.loading import load_model, load_task_for
        model, tokenizer = load_model("stories260K", "tiny_shakespeare", max_length=block)
        batch_size = fast(16, 8)
        data = load_task_for("tiny_shakespeare", tokenizer, max_length=block, limit=steps * batch_size)
        print(f"stories260K on Tiny Shakespeare: {data.num_examples('train')} training blocks of "
              f"{block} tokens, source {data.source}")
        return SimpleNamespace(
            what="stories260K on Tiny Shakespeare", model=model, key="loss", batch_size=batch_size, lr=lr,
            batches=lambda epoch: data.batches("train", batch_size, shuffle=True, seed=epoch, drop_last=True),
            evaluate=make_evaluator(data, max_examples=fast(256, 48)), targets=["q_proj", "v_proj"],
            planted_ranks=None)
    print("stories260K / Tiny Shakespeare not found: using the synthetic planted-rank MLP instead")
    from trainers.planted_problem import PlantedConfig, PlantedTask, build_planted
    cfg = PlantedConfig(dim=64, nf4_grid=False)
    model, teacher, planted_ranks = build_planted(cfg)
    task = PlantedTask(teacher, cfg)
    batch_size = fast(256, 128)
    return SimpleNamespace(
        what="planted-rank MLP (synthetic)", model=model, key="mse", batch_size=batch_size, lr=planted_lr,
        batches=lambda epoch: task.batches("train", batch_size, seed=epoch), evaluate=task.evaluate,
        targets=["fc1", "fc2"], planted_ranks=planted_ranks)
