"""The default job (`python -m trainers`): a planted-rank benchmark that needs no data and no network.

The question every rank-allocation method answers is "which layer needs how much
rank?". On real data nobody knows the answer; here we plant it.

    teacher   f(x; W)   a residual MLP; W random orthogonal, rounded to the NF4 grid
                        (singular values in [0.88, 1.12], and a 4-bit copy equals it)
                        h_0 = x,  h_{i+1} = h_i + fc2_i(gelu(fc1_i(h_i))) / sqrt(L),  f = h_L
    planted   W'_m = W_m + sigma * U_m V_m^T     U_m, V_m (d, k_m) random orthonormal columns,
                        so Delta W_m has rank k_m exactly and every planted direction has the
                        same singular value sigma (the problem is well conditioned)
    data      x ~ N(0, I_d),  y = f(x; W')       fresh seeded samples every step
    student   f(x; W + adapters), W frozen, loss = |f(x) - y|^2 (summed over outputs, batch mean)

The planted ranks k_m are 0, 1, 2, 4, 8, 16, twice each, spread over the 2 x 6 modules.
Every method gets the adapter budget of uniform LoRA r=8 (96 rank units over 12 equal
(d, d) layers); the oracle LoRA is given the planted ranks (`rank_pattern`, 62 units).
A layer with rank r < k_m cannot represent its planted update, so where the rank goes
decides the final loss: uniform r=8 is short of rank in the two k=16 layers and wastes
it in the k=0 ones, and the oracle fits the teacher to float precision.

What each allocator can see: AdaLoRA (importance |w * dL/dw|) and DRaFT-Q (an EMA of
the adapters' squared gradients) look at gradients during training, and gradients carry
the residual, so they can find the planted layers. SADRA's Hutchinson estimate of
tr(H_m) at the base is, for a layer that is linear in its weight and a squared loss,
(mostly) the Gauss-Newton term E[|x_m|^2 |J_m|^2], which does not depend on the targets:
it measures how sensitive the loss is to a layer, not how much the layer has to change.
All 12 layers here are alike, so their traces agree within noise and SADRA gives every
layer r=8: it is uniform LoRA, and the table says so rather than hiding it.

`input_ids` carries float features (B, d) here: the training loop only passes
`batch["input_ids"]` through to the model, and this is a regression, not a language model.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch
import torch.nn as nn
import torch.nn.functional as F

from lora.base import module_device
from trainers.config_checks import check_device, check_floats, check_ints

MODULES = ("fc1", "fc2")
# Planted rank per block: (fc1, fc2). Each of 0, 1, 2, 4, 8, 16 appears once in each column.
PLANTED_RANKS = ((16, 2), (0, 8), (4, 0), (1, 16), (8, 1), (2, 4))


@dataclass
class PlantedConfig:
    dim: int = 64                   # width d of every (d, d) layer
    planted: tuple = PLANTED_RANKS  # (fc1 rank, fc2 rank) per block; the number of blocks is len(planted)
    sigma: float = 0.5              # singular value of each planted direction (base weights have 1)
    budget_rank: int = 8            # every method's budget: that of uniform LoRA at this rank
    steps: int = 600                # optimizer steps per method
    batch_size: int = 256           # fresh samples per step
    lr: float = 1e-2                # AdamW learning rate (cosine schedule, short warm-up)
    eval_examples: int = 4096       # held-out samples for the final loss
    calibration_batches: int = 4    # batches SADRA's Hutchinson estimate sees before training
    nf4_grid: bool = True           # snap the base weights to the NF4 grid (see build_planted)
    seed: int = 0                   # teacher, planted directions, data and adapters
    device: str | None = None       # None: the best one present (trainers/device.py)

    def __post_init__(self):
        """Refuse a bad value when the config is built (trainers/config_checks.py)."""
        check_ints(self, ("dim", "budget_rank", "steps", "batch_size", "eval_examples", "calibration_batches"),
                   minimum=1)
        check_ints(self, ("seed",), minimum=0)
        check_floats(self, ("sigma", "lr"), minimum=0)
        check_device(self)
        ok = all(len(ks) == len(MODULES) and all(isinstance(k, int) and 0 <= k <= self.dim for k in ks)
                 for ks in self.planted) and len(self.planted) > 0
        if not ok:
            raise ValueError(f"PlantedConfig.planted: expected ({', '.join(MODULES)}) rank pairs, each rank an "
                             f"integer in [0, dim={self.dim}], got {self.planted!r}")

    @classmethod
    def quick(cls, **overrides) -> "PlantedConfig":
        """The small setting the tests use (a few seconds per method)."""
        return cls(**{"dim": 32, "steps": 400, "batch_size": 128, "eval_examples": 1024,
                      "calibration_batches": 2, **overrides})

    def planted_ranks(self) -> dict[str, int]:
        return {f"blocks.{i}.{m}": int(k) for i, ks in enumerate(self.planted) for m, k in zip(MODULES, ks)}


# --- the teacher ------------------------------------------------------------------------------
class PlantedBlock(nn.Module):
    def __init__(self, dim: int, scale: float):
        super().__init__()
        self.fc1 = nn.Linear(dim, dim, bias=False)
        self.fc2 = nn.Linear(dim, dim, bias=False)
        self.scale = scale

    def forward(self, h):                                                   # (B, d)
        return h + self.fc2(F.gelu(self.fc1(h))) * self.scale


class PlantedMLP(nn.Module):
    """h_0 = x, h_{i+1} = h_i + fc2_i(gelu(fc1_i(h_i))) / sqrt(L), output h_L; loss = |h_L - y|^2.

    forward(input_ids (B, d) float, targets (B, d) | None, attention_mask ignored) -> (output, loss),
    the signature of every model the training loop drives.
    """

    def __init__(self, dim: int, n_blocks: int):
        super().__init__()
        self.dim = dim
        self.blocks = nn.ModuleList(PlantedBlock(dim, 1.0 / math.sqrt(n_blocks)) for _ in range(n_blocks))

    def forward(self, input_ids, targets=None, attention_mask=None):
        h = input_ids                                                       # (B, d)
        for block in self.blocks:
            h = block(h)
        if targets is None:
            return h, None
        # squared error summed over the d outputs, averaged over the batch: d x the per-element
        # MSE. Adam does not care about the scale, but the regularisers added to it (AdaLoRA's
        # orthogonality at weight 0.1, Sparse LoRA's L1) are tuned for losses of order 1, as a
        # language model's cross-entropy; the per-element MSE here is ~0.03.
        loss = (h.float() - targets.float()).pow(2).sum(-1).mean()
        return h, loss


def _orthonormal(rows: int, cols: int, gen: torch.Generator) -> torch.Tensor:
    q, r = torch.linalg.qr(torch.randn(rows, cols, generator=gen))
    return q * torch.sign(torch.diagonal(r))                                # (rows, cols), Q^T Q = I


def build_planted(cfg: PlantedConfig) -> tuple[PlantedMLP, PlantedMLP, dict[str, int]]:
    """(base, teacher, planted ranks): the teacher is the base plus sigma * U V^T of rank k_m in layer m.

    With `nf4_grid` the base weights are rounded once through NF4 (QLoRA's 4-bit format,
    block 64, double quantization), so a 4-bit copy of the base is the base, up to ~2e-4 per
    weight (the double-quantized scales move a little). Otherwise the NF4 error of a (64, 64)
    orthogonal matrix (Frobenius ~0.75, full rank) would add an update of that size to every
    layer of the 4-bit methods and hide the planted ranks (a rank-1 plant is 0.5). QLoRA's
    cost on real weights is the memory ablation's and the matrix's business."""
    dim = cfg.dim
    planted = cfg.planted_ranks()                  # each <= dim (PlantedConfig checks)
    gen = torch.Generator().manual_seed(cfg.seed)
    base = PlantedMLP(dim, len(cfg.planted))
    with torch.no_grad():
        for block in base.blocks:
            for name in MODULES:
                layer = getattr(block, name)
                layer.weight.copy_(_orthonormal(dim, dim, gen))                 # singular values 1
                if cfg.nf4_grid:
                    from quantization.layers import Linear4bit
                    layer.weight.copy_(Linear4bit.from_linear(layer).dequantize())  # now in [0.88, 1.12]
    base.requires_grad_(False)
    teacher = copy.deepcopy(base)
    with torch.no_grad():
        for name, k in planted.items():
            if k > 0:
                layer = teacher.get_submodule(name)
                U, V = _orthonormal(dim, k, gen), _orthonormal(dim, k, gen)   # (d, k) each
                layer.weight.add_(cfg.sigma * U @ V.t())                      # rank exactly k
    return base, teacher, planted


@dataclass(frozen=True)
class PlantedSpec:
    """What the trainer reads of a task (as trainers.data.TaskSpec): its name and main metric."""
    name: str = "planted"
    kind: str = "regression"
    metric: str = "mse"


class PlantedTask:
    """x ~ N(0, I) labelled by the teacher, in the shape of a trainers.data task:
    `batches("train", batch_size, seed=...)` is an epoch of fresh seeded samples,
    `evaluate(model)` the held-out mean squared error."""

    spec = PlantedSpec()
    source = "generated (trainers.planted)"
    note = "synthetic: the labels come from a teacher with planted low-rank weight updates"

    def __init__(self, teacher: nn.Module, cfg: PlantedConfig, batches_per_epoch: int = 100):
        self.teacher, self.cfg, self.batches_per_epoch = teacher, cfg, batches_per_epoch
        gen = torch.Generator().manual_seed(cfg.seed + 1_000_003)
        self.eval_x = torch.randn(cfg.eval_examples, cfg.dim, generator=gen)       # (N, d)
        self.eval_y = self._label(self.eval_x)                                     # (N, d)

    @torch.no_grad()
    def _label(self, x):
        return self.teacher(x)[0]

    def sample(self, n: int, gen: torch.Generator) -> dict:
        x = torch.randn(n, self.cfg.dim, generator=gen)                            # (n, d)
        return {"input_ids": x, "labels": self._label(x)}

    def batches(self, split: str, batch_size: int, *, shuffle: bool = True, seed: int = 0,
                drop_last: bool = True) -> Iterator[dict]:
        """An epoch of `batches_per_epoch` fresh batches; the same seed gives the same batches."""
        if split != "train":
            raise ValueError(f"planted task: batches() serves the 'train' split, got {split!r} "
                             f"(evaluate() holds the eval set)")
        gen = torch.Generator().manual_seed(self.cfg.seed * 7919 + 17 + seed)
        for _ in range(self.batches_per_epoch):
            yield self.sample(batch_size, gen)

    @torch.no_grad()
    def evaluate(self, model: nn.Module) -> dict:
        """Held-out mean squared error (lower is better), in chunks, on the model's device."""
        device = module_device(model)
        total = 0.0
        for start in range(0, len(self.eval_x), 1024):
            x = self.eval_x[start:start + 1024].to(device)
            y = self.eval_y[start:start + 1024].to(device)
            out, _ = model(x)
            total += F.mse_loss(out.float(), y, reduction="sum").item()
        return {"mse": total / self.eval_y.numel()}


# --- scoring ----------------------------------------------------------------------------------
def _average_ranks(values: list[float]) -> list[float]:
    """1-based ranks with ties given their average rank (what Spearman's rho needs)."""
    order = sorted(range(len(values)), key=lambda i: values[i])
    ranks = [0.0] * len(values)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
            j += 1
        for t in range(i, j + 1):
            ranks[order[t]] = (i + j) / 2 + 1
        i = j + 1
    return ranks


def spearman(a: list[float], b: list[float]) -> float:
    """Spearman's rank correlation: Pearson's r of the tie-averaged ranks; NaN if either is constant."""
    if len(a) != len(b) or len(a) < 2:
        raise ValueError(f"spearman: need two equally long lists of >= 2 values, got {len(a)} and {len(b)}")
    ra, rb = _average_ranks(list(a)), _average_ranks(list(b))
    ma, mb = sum(ra) / len(ra), sum(rb) / len(rb)
    cov = sum((x - ma) * (y - mb) for x, y in zip(ra, rb))
    va, vb = sum((x - ma) ** 2 for x in ra), sum((y - mb) ** 2 for y in rb)
    if va == 0 or vb == 0:
        return float("nan")
    return cov / math.sqrt(va * vb)


# --- the benchmark ----------------------------------------------------------------------------
# (label in the table, name in trainers.experiments.CONFIGS); the oracle is built from B-FP.
METHODS = (("LoRA", "B-FP"), ("QLoRA", "B-Q4"), ("AdaLoRA", "B-Ada"), ("SADRA", "SADRA"), ("DRaFT-Q", "DRaFT-Q"))
ADAPTIVE = ("AdaLoRA", "SADRA", "DRaFT-Q")
ORACLE = "Oracle"


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
        # The matrix's B-Ada prunes 12 -> 4; here every method gets the same final budget
        # (uniform r = budget_rank), starting from twice that (so a layer can reach rank 16).
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
        _write_report(report, Path(out))
    return report


def score(report: dict) -> None:
    """Add to each row: Spearman's rho of its final ranks with the planted ranks (adaptive methods),
    its loss as a fraction of the base model's, and its excess over the oracle's loss."""
    planted = report["planted_ranks"]
    names = list(planted)
    oracle = next((r["eval_mse"] for r in report["rows"] if r["method"] == ORACLE), None)
    for row in report["rows"]:
        row["spearman"] = (spearman([row["ranks"][n] for n in names], [planted[n] for n in names])
                           if row["method"] in ADAPTIVE else float("nan"))
        row["of_base"] = row["eval_mse"] / report["base_mse"]
        row["over_oracle"] = row["eval_mse"] - oracle if oracle is not None else float("nan")


def _write_report(report: dict, out: Path) -> None:
    from trainers import results
    results.atomic_write_json(out / "planted.json", report)
    results.atomic_write_text(out / "planted_table.txt", format_table(report) + "\n")
    results.write_summary(out)
    try:
        from trainers.plots import redraw
        report["plots"] = [str(p) for p in redraw(out)]
    except ImportError as err:                       # matplotlib is an optional extra
        report["plots"] = []
        print(f"(no plots: {err})", file=sys.stderr)


def _fmt(value: float, spec: str) -> str:
    try:
        value = float(value)                         # planted.json holds NaN as the string "nan"
    except (TypeError, ValueError):
        return "-"
    return "-" if math.isnan(value) else format(value, spec)


def format_table(report: dict) -> str:
    lines = [f"planted-rank benchmark: base model MSE {report['base_mse']:.4g} (before fine-tuning)",
             f"{'method':<9} {'eval MSE':>10} {'% of base':>9} {'- oracle':>10} {'trainable':>10} "
             f"{'adapter B':>10} {'ranks':>6} {'time s':>7} {'rho':>6}"]
    for r in report["rows"]:
        lines.append(f"{r['method']:<9} {r['eval_mse']:>10.3e} {100 * r['of_base']:>9.2f} "
                     f"{_fmt(r['over_oracle'], '.2e'):>10} {r['trainable_params']:>10,} {r['adapter_bytes']:>10,} "
                     f"{r['rank_budget']:>6} {r['time_s']:>7.1f} {_fmt(r['spearman'], '.2f'):>6}")
    planted = report["planted_ranks"]
    adaptive = [r for r in report["rows"] if r["method"] in ADAPTIVE]
    if adaptive:
        lines.append("")
        lines.append(f"{'layer':<14} {'planted':>7} " + " ".join(f"{r['method']:>8}" for r in adaptive))
        for name, k in planted.items():
            lines.append(f"{name:<14} {k:>7} " + " ".join(f"{r['ranks'][name]:>8}" for r in adaptive))
    budget = report["config"]["budget_rank"] * len(planted)
    for r in adaptive:
        if len(set(r["ranks"].values())) == 1:
            lines.append(f"note: {r['method']} ended with rank {next(iter(r['ranks'].values()))} in every layer, "
                         f"so it ranks no layer above another (rho undefined)")
        if r["rank_budget"] < budget:
            lines.append(f"note: {r['method']} ended using {r['rank_budget']} of the {budget} rank units "
                         f"of the budget")
    lines.append("")
    lines.append("% of base: eval MSE as a percentage of the un-tuned base model's. - oracle: eval MSE minus "
                 "the oracle's (LoRA given the planted ranks).\nranks: total final rank over the layers (the "
                 "budget is uniform r=8: 8 per layer). rho: Spearman rank correlation of the final ranks with "
                 "the planted ranks (1 = same order).")
    return "\n".join(lines)


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
