"""Command line: `python -m trainers [run | matrix | ablate | plots] ...`.

    python -m trainers                                   the offline planted-rank benchmark (trainers/planted.py)
    python -m trainers run --config B-Q4 --task sst2 --model gpt2-tiny --steps 300
    python -m trainers matrix --tasks sst2,tiny_shakespeare --configs B-FP,B-Q4,SADRA --model gpt2-tiny
    python -m trainers matrix --preset real-ranks        a named protocol (trainers/presets.py); flags still win
    python -m trainers ablate rank ...                   trainers/ablations.py
    python -m trainers plots --results results/          redraw every figure from the files
    python -m trainers plan --model llama-7b --method qlora   will it fit? (trainers/plan.py)

The options of `run` and `matrix` are generated from the fields of TrainConfig
(trainers/train.py), RunSettings (trainers/experiments.py) and ExperimentConfig
(trainers/configs.py; trainers/flags.py): `--steps`, `--lr`, `--batch-size`, `--max-length`,
`--limit none`, ... and, replacing the named configuration's value, `--rank 16`,
`--targets all-linear`, `--bits c_attn=8,c_fc=4`, `--rank-pattern c_attn=4`,
`--alpha-per-rank 2`, `--lr-scale 10`, `--tinit 20`, `--memory-cap-bytes ...` (also for
`ablate`). The values used are written into each run's config.json. Every value is checked
(by the dataclasses) before anything is created or loaded. An existing run folder is
never overwritten unless `--overwrite` is given, and never loses a checkpoint: a run that
stopped part-way is continued with `--resume` (give the same options again).

A bad option, a missing file, a folder that cannot be written: one `error: ...` line on
stderr and a non-zero exit (2: what was given is wrong; 1: something failed while running).
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from pathlib import Path

from trainers.configs import CONFIGS, ExperimentConfig, get_config
from trainers.distributed import world_from_env
from trainers.experiments import MODEL_HELP, RunSettings, describe, run_matrix, run_task
from trainers.flags import (EXPERIMENT_DEST, add_dataclass_args, add_experiment_args, experiment_overrides,
                            from_args)
from trainers.presets import PRESETS, Preset, get_preset
from trainers.results import RUN_FILES, check_run_dir, checkpoint_progress, run_state, write_summary
from trainers.train import NonFiniteLossError, TrainConfig

SUBCOMMANDS = ("run", "matrix", "ablate", "plots")
ABLATIONS = ("rank", "targets", "memory")


def _known_tasks() -> list[str]:
    from trainers.data import TASKS
    return sorted(TASKS)


def _epilog() -> str:
    configs = "\n".join(f"  {name:<12} {c.description}" for name, c in CONFIGS.items())
    return (f"configs:\n{configs}\n\ntasks:\n  {', '.join(_known_tasks())}\n\nmodels:\n  {MODEL_HELP}\n\n"
            f"With no subcommand: the offline planted-rank benchmark (trainers/planted.py); its options come\n"
            f"first, e.g. `python -m trainers --quick`, and `python -m trainers --quick --help` lists them.")


def _names(text: str, known, what: str, parser: argparse.ArgumentParser) -> list[str]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in known]
    if unknown or not names:
        parser.error(f"unknown {what} {', '.join(unknown) or '(none given)'}; known {what}: {', '.join(known)}")
    return names


def _preset_in(argv: list[str]) -> Preset | None:
    """The preset `matrix --preset NAME` names (KeyError listing the known ones), else None."""
    if not argv or argv[0] != "matrix":
        return None
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--preset")
    known, _ = pre.parse_known_args(argv[1:])
    return None if known.preset is None else get_preset(known.preset)


def _preset_defaults(preset: Preset) -> dict:
    """The preset's values as argparse defaults: experiment fields under their override names."""
    fields = {f.name for cls in (TrainConfig, RunSettings) for f in dataclasses.fields(cls)}
    experiment = {f.name for f in dataclasses.fields(ExperimentConfig)}
    out = {"tasks": preset.tasks, "configs": preset.configs}
    for name, value in preset.options.items():
        if name in fields:
            out[name] = value
        elif name in experiment:
            out[EXPERIMENT_DEST + name] = value
        else:
            raise ValueError(f"preset {preset.name!r}: option {name!r} is not a TrainConfig, RunSettings or "
                             f"ExperimentConfig field")
    return out


def build_parser(preset: Preset | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m trainers", epilog=_epilog(),
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     description="nanopeft: parameter-efficient fine-tuning experiments.")
    sub = parser.add_subparsers(dest="command", metavar="{run,matrix,ablate,plots,plan}")
    for name, help_text in (("run", "one configuration on one task"),
                            ("matrix", "every task x configuration, plus the summary")):
        p = sub.add_parser(name, help=help_text, epilog=_epilog(),
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        if name == "run":
            p.add_argument("--config", required=True, choices=list(CONFIGS), metavar="CONFIG",
                           help=f"one of: {', '.join(CONFIGS)}")
            p.add_argument("--task", required=True, help=f"one of: {', '.join(_known_tasks())}")
            p.add_argument("--name", default=None, help="run folder name (default <task>__<config>)")
        else:
            p.add_argument("--tasks", required=preset is None, help="comma-separated task names")
            p.add_argument("--configs", default=",".join(CONFIGS), help="comma-separated config names (default all)")
            p.add_argument("--preset", choices=list(PRESETS), metavar="PRESET",
                           help="a named protocol filling in every option it names (flags given still win): "
                                + "; ".join(f"{k}: {v.description} ({v.run_time})" for k, v in PRESETS.items()))
        p.add_argument("--results", type=Path, default=Path("results"), help="results root (default results/)")
        p.add_argument("--overwrite", action="store_true",
                       help="replace a finished run in the folder (its files; others stay). It refuses a run "
                            "that stopped part-way after a checkpoint: --resume it, or delete its checkpoint.pt "
                            "yourself. If the new run fails, the old one is put back")
        p.add_argument("--resume", action="store_true",
                       help="continue a run that stopped part-way (killed, interrupted) from its checkpoint.pt "
                            "(written every --checkpoint-every steps), to the same losses as a run that never "
                            "stopped; give the same options as the first time" +
                            ("" if name == "run" else "; finished runs are kept, the others start"))
        add_dataclass_args(p, TrainConfig, "training (TrainConfig)")
        add_dataclass_args(p, RunSettings, "model and data (RunSettings)")
        add_experiment_args(p)
        if name == "matrix" and preset is not None:
            p.set_defaults(**_preset_defaults(preset))
    p = sub.add_parser("ablate", help="rank, target-module or memory ablation (trainers/ablations.py)")
    p.add_argument("kind", choices=ABLATIONS)
    p.add_argument("rest", nargs=argparse.REMAINDER,
                   help="options passed to the ablation (python -m trainers ablate KIND --help)")
    p = sub.add_parser("plots", help="redraw the figures from a results folder")
    p.add_argument("--results", type=Path, default=Path("results"))
    sub.add_parser("plan", help="will it fit? peak training memory (python -m trainers plan --help)")
    return parser


def _one_line(err: BaseException) -> str:
    message = err.args[0] if isinstance(err, KeyError) and err.args else str(err)
    return " ".join(str(message).split())


def main(argv: list[str] | None = None) -> int:
    """Run the command; a bad value or a failed write is one `error:` line and exit 2 or 1."""
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        return _main(argv)
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    except (ValueError, KeyError, FileExistsError, FileNotFoundError, NotADirectoryError) as err:
        print(f"error: {_one_line(err)}", file=sys.stderr)     # a bad value or name, a busy folder, missing data
        return 2
    except (OSError, NonFiniteLossError) as err:
        print(f"error: {_one_line(err)}", file=sys.stderr)     # a failed write, a diverged run
        return 1


def _run_dir(args) -> Path:
    name = args.name if args.name is not None else f"{args.task}__{args.config}"
    if not name or name in (".", "..") or name.startswith(".") or "/" in name or os.sep in name:
        raise ValueError(f"--name: expected a folder name (no '/', not starting with '.'), got {name!r}")
    return args.results / name


def _note_overwrite(out_dir: Path) -> None:
    if run_state(out_dir) == "finished":
        files = [name for name in RUN_FILES if (out_dir / name).exists()]
        print(f"--overwrite: replacing the finished run in {out_dir} ({', '.join(files)}); it is put back "
              f"if the new run fails", file=sys.stderr)


def _draw(folder: Path) -> list[Path]:
    """The figures of a run folder (loss curve; rank heatmap for adaptive methods) or of a results
    root (a loss panel per task, every run's heatmap); none, with a note, without matplotlib."""
    try:
        from trainers.plots import redraw            # a run folder: plots.draw_run; a root: every figure
        return list(redraw(folder))
    except ImportError as err:
        print(f"note: no figures drawn ({_one_line(err)})", file=sys.stderr)
        return []


def _main(argv: list[str]) -> int:
    if not argv or (argv[0].startswith("-") and argv[0] not in ("-h", "--help")):
        from trainers import planted                      # the offline default job, with its own options
        return planted.main(argv)
    if argv[0] == "plan":                                 # the memory planner parses its own options
        from trainers import plan
        return plan.main(argv[1:])
    parser = build_parser(_preset_in(argv))
    args = parser.parse_args(argv)
    if args.command in ("run", "matrix"):
        train_cfg, settings = from_args(TrainConfig, args), from_args(RunSettings, args)   # checked here
        overrides = experiment_overrides(args)
        if args.overwrite and args.resume:
            raise ValueError("--overwrite and --resume exclude each other: --resume continues the run in the "
                             "folder, --overwrite starts a new one")
    if args.command == "run":
        if args.task not in _known_tasks():
            parser.error(f"unknown task {args.task}; known tasks: {', '.join(_known_tasks())}")
        exp = dataclasses.replace(get_config(args.config), **overrides)                    # checked here
        out_dir = _run_dir(args)
        main = world_from_env().is_main                   # under torchrun, rank 0 alone writes and reports
        if args.overwrite and main:
            check_run_dir(out_dir, overwrite=True)
            _note_overwrite(out_dir)
        try:
            row = run_task(exp, args.task, train_cfg, out_dir, settings, overwrite=args.overwrite,
                           resume=args.resume)
        except BaseException:
            if main and run_state(out_dir) == "resumable":
                print(f"note: {out_dir} keeps the run's checkpoint ({checkpoint_progress(out_dir)}): run the "
                      f"same command with --resume to continue it", file=sys.stderr)
            raise
        if not main:
            return 0
        csv_path, _ = write_summary(args.results)
        figures = _draw(out_dir)
        print(f"{describe(row)}, trainable {row['trainable_params']} ({row['trainable_pct']:.3f} %)\n"
              f"results: {out_dir}  summary: {csv_path}" + "".join(f"\nfigure: {p}" for p in figures))
    elif args.command == "matrix":
        if world_from_env().world_size > 1:
            raise ValueError("matrix runs one process per run; under torchrun use `run` (one run over all "
                             "the processes)")
        tasks = _names(args.tasks, _known_tasks(), "tasks", parser)
        configs = _names(args.configs, list(CONFIGS), "configs", parser)
        if args.overwrite:
            for task in tasks:
                for config in configs:
                    check_run_dir(args.results / f"{task}__{config}", overwrite=True)
            for task in tasks:
                for config in configs:
                    _note_overwrite(args.results / f"{task}__{config}")
        try:
            rows = run_matrix(tasks, configs, train_cfg, args.results, settings, overwrite=args.overwrite,
                              resume=args.resume, overrides=overrides)
        except RuntimeError as err:       # some runs failed; the others and the summary are written
            print(f"error: {err}", file=sys.stderr)
            return 1
        figures = _draw(args.results)
        print(f"{len(rows)} runs; summary: {args.results / 'experiment_summary.csv'}"
              + "".join(f"\nfigure: {p}" for p in figures))
    elif args.command == "ablate":
        from trainers import ablations
        return ablations.main([args.kind, *args.rest])
    elif args.command == "plots":
        from trainers.plots import redraw
        try:
            paths = redraw(args.results)
        except ImportError as err:        # matplotlib is an optional extra
            print(f"error: {_one_line(err)}", file=sys.stderr)
            return 1
        for path in paths:
            print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
