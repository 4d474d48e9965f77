"""The default job (`python -m trainers`): a planted-rank benchmark that needs no data and no network.

The question every rank-allocation method answers is "which layer needs how much
rank?". On real data nobody knows the answer; here we plant it: a teacher differs from
the frozen base by weight updates of known ranks 0..16 per layer (the problem, its math
and its task are in trainers/planted_problem.py). LoRA, QLoRA, AdaLoRA, SADRA and DRaFT-Q
fine-tune the base at the adapter budget of uniform LoRA r=8, against an oracle given
the planted ranks; trainers/planted_report.py scores the runs and writes the table.

What each allocator can see: AdaLoRA (importance |w * dL/dw|) and DRaFT-Q (an EMA of
the adapters' squared gradients) look at gradients during training, and gradients carry
the residual, so they can find the planted layers. SADRA's Hutchinson estimate of
tr(H_m) at the base is, for a layer that is linear in its weight and a squared loss,
(mostly) the Gauss-Newton term E[|x_m|^2 |J_m|^2], which does not depend on the targets:
it measures how sensitive the loss is to a layer, not how much the layer has to change.
All 12 layers here are alike, so their traces agree within noise and SADRA gives every
layer r=8: it is uniform LoRA, and the table says so rather than hiding it.

This file runs the methods (`run_method`, `run_planted`) and holds the command line (`main`);
the names of the other two files are re-exported here.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn

from trainers.planted_problem import (ADAPTIVE, METHODS, MODULES, ORACLE, PLANTED_RANKS, PlantedBlock, PlantedConfig,
                                      PlantedMLP, PlantedSpec, PlantedTask, build_planted)
from trainers.planted_report import format_table, score, spearman, write_report

__all__ = ["experiment_for", "new_results_dir", "train_config", "run_method", "run_planted", "main",
           "ADAPTIVE", "METHODS", "MODULES", "ORACLE", "PLANTED_RANKS", "PlantedBlock", "PlantedConfig", "PlantedMLP",
           "PlantedSpec", "PlantedTask", "build_planted", "format_table", "score", "spearman", "write_report"]


# --- the benchmark ----------------------------------------------------------------------------
def experiment_for(label: str, cfg: PlantedConfig):
    """The experiment config of one row: the named config, aimed at this model's fc1/fc2 layers;
    the oracle is LoRA on exactly the planted layers with the planted ranks."""
    from trainers.experiments import CONFIGS
    if label == ORACLE:
        planted = {n: k for n, k in cfg.planted_ranks().items() if k > 0}
        # prepare() reads rank_pattern only with allocation="manual"
        return dataclasses.replace(CONFIGS["B-FP"], name="Oracle", allocation="manual",
                                   target_modules=tuple(planted), rank_pattern=dict(planted),
                                   description="LoRA given the planted ranks (rank_pattern); no adapter where k=0")
    exp = dataclasses.replace(CONFIGS[dict(METHODS)[label]], target_modules=MODULES)
    if exp.allocation == "adalora":
        # The matrix's B-Ada prunes 12 -> the budget rank; here it starts from twice the budget
        # rank (so a layer can reach rank 16) and ends at uniform r = budget_rank like every method.
        exp = dataclasses.replace(exp, r=2 * cfg.budget_rank, target_r=cfg.budget_rank)
    return exp


def _slug(label: str) -> str:
    return label.lower().replace("-", "").replace(" ", "_")


def new_results_dir(root: Path, prefix: str = "planted") -> Path:
    """results/<prefix>-<timestamp>, with -2, -3, ... appended rather than reusing a folder
    (created here; a caller whose job fails removes it again)."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    path = Path(root) / f"{prefix}-{stamp}"
    n = 2
    while path.exists():
        path = Path(root) / f"{prefix}-{stamp}-{n}"
        n += 1
    path.mkdir(parents=True)
    return path


def train_config(cfg: PlantedConfig, progress: bool = False):
    """The training settings every method of the benchmark gets (AdamW, cosine, short warm-up)."""
    from trainers.train import TrainConfig
    return TrainConfig(steps=cfg.steps, batch_size=cfg.batch_size, lr=cfg.lr, weight_decay=0.0,
                       warmup_steps=max(1, cfg.steps // 20), schedule="cosine", clip=1.0,
                       eval_every=0, seed=cfg.seed, device=cfg.device, progress=progress)


def run_method(label: str, cfg: PlantedConfig, base: nn.Module, task: PlantedTask, run_dir: Path,
               progress: bool = False) -> dict:
    """Fine-tune a copy of `base` with one method through the trainer's run_experiment (which
    writes the run folder like any matrix run); returns the method's row of the table."""
    from trainers.experiments import run_experiment

    exp = experiment_for(label, cfg)
    train_cfg = train_config(cfg, progress)
    calibration = [task.sample(cfg.batch_size, torch.Generator().manual_seed(cfg.seed + 99 + i))
                   for i in range(cfg.calibration_batches)]
    model = copy.deepcopy(base)
    start = time.perf_counter()
    run_experiment(exp, model, task, train_cfg, run_dir, task.evaluate, budget_rank=cfg.budget_rank,
                   model_name=f"planted-mlp-d{cfg.dim}", calibration=lambda: iter(calibration))
    seconds = time.perf_counter() - start            # includes SADRA's calibration pass
    metrics = json.loads((Path(run_dir) / "metrics.json").read_text())
    ranks = {name: 0 for name in cfg.planted_ranks()}
    ranks.update({n: int(r) for n, r in metrics["final_ranks"].items() if n in ranks})
    return {"method": label, "config": exp.name, "eval_mse": metrics["mse"],
            "final_loss": metrics["final_loss"], "trainable_params": metrics["trainable_params"],
            "adapter_bytes": metrics["adapter_bytes"], "time_s": seconds, "ranks": ranks,
            "rank_budget": sum(ranks.values()), "run_dir": str(run_dir)}


def run_planted(cfg: PlantedConfig, out: Path, methods=None, progress: bool = False) -> dict:
    """Run every method (and the oracle) on the planted problem, one run folder each under
    `out`, then the summary, planted.json, planted_table.txt and the plots; all or nothing
    (a failure removes what it wrote under `out`). Returns
    {"planted_ranks", "base_mse", "rows": [one per method, scored], "results_dir", "config"}."""
    from trainers.device import pick_device
    from trainers.results import adding_to
    known = [m for m, _ in METHODS] + [ORACLE]
    labels = list(methods) if methods is not None else known
    unknown = [m for m in labels if m not in known]
    if unknown:
        raise ValueError(f"planted: unknown methods {unknown}; known: {known}")
    pick_device(cfg.device)                          # an absent device fails before anything is written
    with adding_to(out):
        base, teacher, planted = build_planted(cfg)
        task = PlantedTask(teacher, cfg)
        report = {"planted_ranks": planted, "base_mse": task.evaluate(base)["mse"], "rows": [],
                  "results_dir": str(out), "config": dataclasses.asdict(cfg)}
        for label in labels:
            report["rows"].append(run_method(label, cfg, base, task, Path(out) / _slug(label), progress))
        score(report)
        write_report(report, Path(out))
    return report


def main(argv=None) -> int:
    """`python -m trainers` with no subcommand; the results are in the folder it prints
    (use `run_planted` for them as a dict)."""
    parser = argparse.ArgumentParser(
        prog="python -m trainers",
        description="Planted-rank benchmark (offline, no data files): weight updates of known ranks are "
                    "planted in a small teacher; LoRA, QLoRA, AdaLoRA, SADRA and DRaFT-Q fine-tune the base "
                    "at the same adapter budget, against an oracle given the planted ranks.")
    parser.add_argument("--steps", type=int, default=None,
                        help="optimizer steps per method (default 600; 400 with --quick)")
    parser.add_argument("--out", type=Path, default=Path("results"),
                        help="results root; a new planted-<timestamp> folder is made inside (default ./results)")
    parser.add_argument("--quick", action="store_true", help="a small, fast setting (what the tests run)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default=None, help="cuda | mps | cpu (default: the best present)")
    parser.add_argument("--progress", action="store_true", help="show a progress bar per method")
    args = parser.parse_args(argv)
    overrides = {"seed": args.seed, "device": args.device}
    if args.steps is not None:
        overrides["steps"] = args.steps
    cfg = PlantedConfig.quick(**overrides) if args.quick else PlantedConfig(**overrides)   # checks the values
    from trainers.device import pick_device
    pick_device(cfg.device)
    out = new_results_dir(args.out)
    print(f"planted-rank benchmark: {len(cfg.planted)} blocks x {MODULES}, d={cfg.dim}, {cfg.steps} steps "
          f"per method; writing {out}", flush=True)
    try:
        report = run_planted(cfg, out, progress=args.progress)   # all or nothing under `out`
    except BaseException:
        with contextlib.suppress(OSError):
            out.rmdir()                              # empty again: a failed job leaves no folder behind
        raise
    print(format_table(report))
    print(f"\nresults: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
