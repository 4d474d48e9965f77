"""Ablations: how much rank, which modules, and what it costs in memory.

    rank      LoRA r = 1, 2, 4, 8, 16, 32, 64 and full fine-tuning: trainable %, metric
    targets   LoRA r=8 on Q; Q,K; Q,K,V; Q,K,V,O; all (attention + MLP)
    memory    full fine-tuning vs LoRA vs QLoRA (NF4 base): peak memory, metric, time

Each point is one ordinary run (trainers.experiments.run_experiment writes its folder),
so an ablation folder looks like a matrix folder: results/ablation-<kind>-<timestamp>/
<point>/..., experiment_summary.csv, all_results.json, plus <kind>_ablation.csv (the
ablation's own columns, one row per run, every cell filled) and its plot.

The settings, the defaults (stories260K on Tiny Shakespeare when the offline data folder
has them, else the planted-rank task of trainers/planted.py) and the target-module ladders
per model family (GPT-2's fused c_attn has no Q or Q,K rung) are in trainers/ablation_settings.py.

Memory: the figure the trainer records on the CPU is the process's peak resident set size,
which only ever grows within a process; so, off CUDA (whose peak the trainer resets per run),
each point runs in a fresh process (`isolate`, trainers/isolated.py), and every table also
gives `state_bytes` / `state_mib`, the exact bytes of weights (packed for a 4-bit base) plus
gradients and AdamW's two moments of the trainable parameters.

The LoRA points start from B-FP with the `experiment` fields replaced (the command line's
--targets, --bits, --alpha-per-rank, ...: trainers/flags.py); the ablated field itself is the
ablation's to set. A line per finished point goes to stderr, and the folder is printed last.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import csv
import dataclasses
import io
import sys
import time
from pathlib import Path

import torch.nn as nn

from trainers.ablation_settings import (COLUMNS, KINDS, RANKS, TARGET_LADDERS, AblationSettings,
                                        resolve_defaults)

__all__ = ["COLUMNS", "KINDS", "RANKS", "TARGET_LADDERS", "AblationSettings", "resolve_defaults", "run_point",
           "ablation_points", "run_ablation", "format_rows", "build_parser", "main", "main_rank", "main_targets",
           "main_memory"]


# --- one point --------------------------------------------------------------------------------
class _Context:
    """What every run of an ablation shares: the tokenized task (or the planted problem)."""

    def __init__(self, s: AblationSettings):
        self.s = s
        if s.task == "planted":
            from trainers.planted_problem import PlantedConfig, PlantedTask, build_planted
            self.planted_cfg = PlantedConfig(dim=s.planted_dim, seed=s.seed, batch_size=s.batch_size,
                                             eval_examples=s.eval_examples or 1024)
            self.base, teacher, _ = build_planted(self.planted_cfg)
            self.data = PlantedTask(teacher, self.planted_cfg)
            self.family, self.tokenizer = "planted", None
        else:
            from trainers.loading import load_model, load_task_for
            from trainers.prepare import model_family
            model, self.tokenizer = load_model(s.model, s.task, max_length=s.max_length, data_dir=s.data_dir,
                                               seed=s.seed)
            self.family = model_family(model)
            self.data = load_task_for(s.task, self.tokenizer, max_length=s.max_length, limit=s.limit,
                                      data_dir=s.data_dir, seed=s.seed)

    def model(self) -> nn.Module:
        if self.s.task == "planted":
            return copy.deepcopy(self.base)
        from trainers.loading import load_model
        return load_model(self.s.model, self.s.task, max_length=self.s.max_length, data_dir=self.s.data_dir,
                          seed=self.s.seed, tokenizer=self.tokenizer)[0]

    def evaluator(self):
        if self.s.task == "planted":
            return self.data.evaluate
        from trainers.evaluate import make_evaluator
        return make_evaluator(self.data, tokenizer=self.tokenizer, max_examples=self.s.eval_examples)

    def default_targets(self) -> tuple | None:
        return ("fc1", "fc2") if self.s.task == "planted" else None


def run_point(exp, s: AblationSettings, ctx: _Context, out_dir: Path) -> dict:
    """One run: a fresh model, prepared for `exp` and trained by the trainer; returns its summary
    row (trainers.results.SUMMARY_COLUMNS: state_bytes, peak memory, inference speed, ...)."""
    from trainers.experiments import run_experiment
    from trainers.train import TrainConfig
    lr = s.full_ft_lr if exp.method == "full" and s.full_ft_lr is not None else s.lr
    train_cfg = TrainConfig(steps=s.steps, batch_size=s.batch_size, lr=lr, warmup_steps=max(1, s.steps // 20),
                            eval_every=0, seed=s.seed, device=s.device, progress=False)
    model = ctx.model()
    model_name = s.model or f"planted-mlp-d{s.planted_dim}"
    return run_experiment(exp, model, ctx.data, train_cfg, out_dir, ctx.evaluator(), model_name=model_name)


def _isolated_point(exp, s: AblationSettings, out_dir: Path) -> dict:
    """Child-process entry (trainers.isolated): rebuild the context and run one point, so the
    process's peak RSS belongs to this run alone."""
    return run_point(exp, s, _Context(s), out_dir)


# --- the three ablations ----------------------------------------------------------------------
def ablation_points(kind: str, ctx: _Context) -> list[tuple[str, object, dict]]:
    """[(folder name, ExperimentConfig, the ablation's own columns)] for one kind."""
    from trainers.configs import CONFIGS
    given = ctx.s.experiment
    ablated = {"rank": ("r",), "targets": ("target_modules",), "memory": ("quant", "method")}.get(kind, ())
    if any(name in given for name in ablated):
        raise ValueError(f"the {kind} ablation sets {', '.join(ablated)} itself; leave out that option")
    lora = dataclasses.replace(CONFIGS["B-FP"], **{"target_modules": ctx.default_targets(), **given})
    if kind == "rank":
        # alpha = 2 r keeps the scaling alpha / r = 2 (B-FP's) at every rank, so the ablation
        # changes the rank and not the effective step size of the update (unless a fixed
        # --lora-alpha or another --alpha-per-rank is given).
        per_rank = None if "lora_alpha" in given and "alpha_per_rank" not in given else lora.alpha_per_rank or 2.0
        points = [(f"r{r:02d}", dataclasses.replace(lora, name=f"LoRA-r{r}", r=r, alpha_per_rank=per_rank),
                   {"r": r}) for r in ctx.s.ranks]
        return points + [("full", CONFIGS["Full-FT"], {"r": "full"})]
    if kind == "targets":
        if ctx.family not in TARGET_LADDERS:
            raise ValueError(f"target ablation: no module ladder for model family {ctx.family!r}; "
                             f"known: {sorted(TARGET_LADDERS)}")
        return [(f"t{i}-{label.split(' ')[0].replace(',', '')}",
                 dataclasses.replace(lora, name=f"LoRA-{label}", target_modules=modules),
                 {"targets": label, "modules": " ".join(modules)})
                for i, (label, modules) in enumerate(TARGET_LADDERS[ctx.family])]
    if kind == "memory":
        qlora = dataclasses.replace(lora, name="B-Q4", quant=4, description=CONFIGS["B-Q4"].description)
        return [("full", CONFIGS["Full-FT"], {"label": "full FT", "method": "full"}),
                ("lora", lora, {"label": "LoRA r=8", "method": "lora"}),
                ("qlora", qlora, {"label": "QLoRA r=8 (NF4)", "method": "lora+nf4"})]
    raise ValueError(f"unknown ablation {kind!r}; known: {', '.join(KINDS)}")


def run_ablation(kind: str, settings: AblationSettings | None = None, out: Path | None = None,
                 results_root: Path = Path("results")) -> list[dict]:
    """Run one ablation; writes its runs, the summary, <kind>_ablation.csv and its plot under `out`
    (default: a new results/ablation-<kind>-<timestamp>). Returns the CSV's rows."""
    if kind not in KINDS:
        raise ValueError(f"unknown ablation {kind!r}; known: {', '.join(KINDS)}")
    from trainers.planted import new_results_dir
    from trainers.results import adding_to
    s = resolve_defaults(settings or AblationSettings())
    device_type = _device_type(s.device)        # an absent device fails before anything is written
    isolate = s.isolate if s.isolate is not None else device_type != "cuda"   # train() resets CUDA's peak
    ctx = _Context(s)                            # loads the model and data: no folder exists yet
    points = ablation_points(kind, ctx)
    made = out is None
    out = new_results_dir(results_root, prefix=f"ablation-{kind}") if made else Path(out)
    try:
        with adding_to(out):                     # all or nothing under `out`
            rows = _run_points(kind, s, ctx, points, out, isolate)
        print(f"results: {out}  table: {out / f'{kind}_ablation.csv'}")
        return rows
    except BaseException:
        if made:
            with contextlib.suppress(OSError):
                out.rmdir()                      # empty again: a failed ablation leaves no folder behind
        raise


def _run_points(kind: str, s: AblationSettings, ctx: _Context, points: list, out: Path, isolate: bool) -> list[dict]:
    """Each point's run, then the summary, <kind>_ablation.csv and the plot."""
    from trainers.experiments import describe
    from trainers.isolated import in_fresh_process
    from trainers.results import MISSING, atomic_write_text, write_summary
    rows = []
    print(f"{kind} ablation: {len(points)} runs into {out}" + (" (each in a fresh process)" if isolate else ""),
          file=sys.stderr)
    for i, (folder, exp, own) in enumerate(points, 1):
        start = time.perf_counter()
        if isolate:
            row = in_fresh_process(_isolated_point, exp, s, out / folder)
        else:
            row = run_point(exp, s, ctx, out / folder)
        rows.append({**own, **{k: v for k, v in row.items() if k not in own}})
        print(f"[{i}/{len(points)}] {describe(row)} ({time.perf_counter() - start:.1f} s with setup)", file=sys.stderr)
    write_summary(out)
    columns = list(COLUMNS[kind]) + [c for c in rows[0] if c not in COLUMNS[kind]]
    for row in rows:
        for column in columns:
            if row.get(column) is None or row.get(column) == "":
                row[column] = MISSING
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns, lineterminator="\n", extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(out / f"{kind}_ablation.csv", buf.getvalue())
    try:
        from trainers.plots import redraw
        redraw(out)
    except ImportError as err:
        print(f"(no plots: {err})", file=sys.stderr)
    return rows


def _device_type(device: str | None) -> str:
    from trainers.device import pick_device
    return pick_device(device).type


def format_rows(kind: str, rows: list[dict]) -> str:
    """The ablation's own columns as a text table; each column as wide as its widest cell, so no
    label is cut ("Q,K,V (fused c_attn)"); text left-aligned, numbers right-aligned."""
    columns = COLUMNS[kind]
    cells = [[f"{row[c]:.4g}" if isinstance(row[c], float) else str(row[c]) for c in columns] for row in rows]
    numeric = [all(isinstance(row[c], (int, float)) for row in rows) for c in columns]
    widths = [max([len(c)] + [len(line[i]) for line in cells]) for i, c in enumerate(columns)]

    def line(values):
        return "  ".join(v.rjust(w) if num else v.ljust(w) for v, w, num in zip(values, widths, numeric)).rstrip()
    return "\n".join([line(columns)] + [line(values) for values in cells])


# --- command line -----------------------------------------------------------------------------
def build_parser(kind: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=f"python -m trainers ablate {kind or '{rank,targets,memory}'}",
        description=__doc__.split("\n\n")[0] + " Defaults: stories260K on Tiny Shakespeare when the offline "
                    "data exists, else the planted task.")
    if kind is None:
        parser.add_argument("kind", choices=KINDS)
    defaults = AblationSettings()
    parser.add_argument("--task", default=None, help="a task name, or 'planted' (no data needed)")
    parser.add_argument("--model", default=None, help="model name or path (see `python -m trainers --help`)")
    for name in ("steps", "batch_size", "max_length", "seed"):
        parser.add_argument(f"--{name.replace('_', '-')}", type=int, default=getattr(defaults, name))
    parser.add_argument("--lr", type=float, default=defaults.lr)
    parser.add_argument("--full-ft-lr", type=float, default=None, help="lr for full fine-tuning (default: --lr)")
    from trainers.configs import parse_optional_number
    from trainers.flags import add_experiment_args
    parser.add_argument("--limit", type=parse_optional_number(int), default=defaults.limit,
                        help=f"(default {defaults.limit}; none: every example)")
    parser.add_argument("--eval-examples", type=parse_optional_number(int), default=defaults.eval_examples,
                        help=f"(default {defaults.eval_examples}; none: every example)")
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--device", default=None)
    parser.add_argument("--ranks", default=",".join(map(str, RANKS)), help="rank ablation: comma-separated ranks")
    parser.add_argument("--isolate", action=argparse.BooleanOptionalAction, default=None,
                        help="each point in a fresh process (default: unless on CUDA)")
    parser.add_argument("--out", type=Path, default=None,
                        help="folder for the runs (default: a new results/ablation-<kind>-<timestamp>)")
    add_experiment_args(parser)
    return parser


def _ranks(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(r) for r in text.split(",") if r.strip())
    except ValueError:
        raise ValueError(f"--ranks: expected comma-separated integers, e.g. 1,4,16, got {text!r}") from None


def main(argv=None, kind: str | None = None) -> int:
    """`python -m trainers ablate KIND ...`; a bad value raises ValueError before anything is
    written (the trainers CLI prints it as one `error:` line)."""
    from trainers.flags import experiment_overrides
    args = build_parser(kind).parse_args(argv)
    kind = kind or args.kind
    settings = AblationSettings(task=args.task, model=args.model, steps=args.steps, batch_size=args.batch_size,
                                lr=args.lr, full_ft_lr=args.full_ft_lr, max_length=args.max_length,
                                limit=args.limit, eval_examples=args.eval_examples, data_dir=args.data_dir,
                                seed=args.seed, device=args.device, ranks=_ranks(args.ranks), isolate=args.isolate,
                                experiment=experiment_overrides(args))
    if args.out is not None:
        from trainers.results import check_writable
        check_writable(args.out)
        if args.out.is_dir() and any(p for p in args.out.iterdir() if not p.name.startswith(".")):
            raise FileExistsError(f"ablation: --out {str(args.out)!r} already holds results; choose another folder")
    rows = run_ablation(kind, settings, args.out)
    print(format_rows(kind, rows))
    return 0


def main_rank(argv=None) -> int:
    return main(argv, "rank")


def main_targets(argv=None) -> int:
    return main(argv, "targets")


def main_memory(argv=None) -> int:
    return main(argv, "memory")


if __name__ == "__main__":
    sys.exit(main())
