"""Running experiments: one run, one run by names, and the matrix of many.

    exp = CONFIGS["B-Q4"]                                   # QLoRA: NF4 base + LoRA r=8
    row = run_experiment(exp, model, task, TrainConfig(steps=300), Path("results/sst2__B-Q4"), evaluate)
    row = run_task("B-Q4", "sst2", TrainConfig(steps=300), Path("results/sst2__B-Q4"))   # loads by name
    rows = run_matrix(["sst2"], ["B-FP", "B-Q4"], TrainConfig(), Path("results"))       # + the summary

`run_experiment` prepares the model (trainers/prepare.py), trains it (trainers/train.py),
evaluates it (trainers/evaluate.py), times its inference (trainers/inference.py) and writes
the run folder (trainers/results.py). The configurations are in trainers/configs.py, models
and tasks by name in trainers/loading.py; their names can be imported from here too. The
ablations (rank, target modules, memory) are in trainers/ablations.py.
"""
from __future__ import annotations

import json
import sys
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Callable

import torch
import torch.nn as nn
from safetensors.torch import save_model

from lora.adapter_save import save_adapter
from lora.targets import adapter_layers
from trainers.config_checks import check_ints
from trainers.configs import ALLOCATIONS, CONFIGS, METHODS, QUANTS, ExperimentConfig, get_config
from trainers.data import get_task
from trainers.device import Runtime, pick_device
from trainers.distributed import world_from_env
from trainers.evaluate import make_evaluator
from trainers.inference import inference_speed
from trainers.isolated import in_fresh_process
from trainers.loading import (LLAMA2C_MODELS, MODEL_HELP, MODEL_PRESETS, _task_texts, load_model, load_task_for,
                              model_kind)
from trainers.prepare import (DEFAULT_TARGETS, base_bits, default_targets, linear_layers, model_family, prepare,
                              task_heads, used)
from trainers.results import (atomic_write, atomic_write_json, check_run_dir, jsonable, run_folder, run_state,
                              summary_row, write_loss_log, write_summary)
from trainers.train import TrainConfig, train

# What this module offers, with the names of the files it was split into (imported from here before).
__all__ = ["run_experiment", "run_task", "run_matrix", "RunSettings", "describe", "ExperimentConfig", "CONFIGS",
           "METHODS", "ALLOCATIONS", "QUANTS", "get_config", "prepare", "used", "base_bits", "model_family",
           "DEFAULT_TARGETS", "default_targets", "linear_layers", "task_heads", "make_evaluator", "load_model",
           "load_task_for", "model_kind", "MODEL_PRESETS", "LLAMA2C_MODELS", "MODEL_HELP", "_task_texts"]


def run_experiment(exp: ExperimentConfig, model: nn.Module, task, train_cfg: TrainConfig, out_dir: Path,
                   evaluate: Callable[[nn.Module], dict] | None = None, *, overwrite: bool = False,
                   budget_rank: int = 8, model_name: str = "", calibration: Callable | None = None,
                   resume: bool = False, settings: dict | None = None, inference_iters: int = 3,
                   inference_batch_size: int = 8) -> dict:
    """Prepare `model` for `exp`, train it on `task` (a trainers.data.TaskData, or anything
    with `.batches(split, batch_size, shuffle=, seed=, drop_last=)` and `.spec.name/.metric`),
    and write the run folder. Returns the run's summary row (trainers.results.SUMMARY_COLUMNS).

    The folder is all or nothing (trainers.results.run_folder): an existing non-empty out_dir
    is an error unless `overwrite` (a finished run) or `resume` (a run stopped after a
    checkpoint: `model` must be built as the first time, and the configs must match those in
    its config.json). `settings`: anything else that defines the run, recorded (and compared
    on resume) in config.json. The lr is `train_cfg.lr * exp.lr_scale` (config.json's train.lr).

    The folder gets config.json (what was asked, and under "used" what prepare chose: layers,
    ranks, alphas, the allocator's settings), metrics.json (the task metric, parameters, peak
    and analytic training-state memory, throughput, inference speed with `inference_iters`
    timed calls per figure, 0: none), loss_log.csv, eval_log.json, rank_history.json, bits.json
    (quantized runs: {layer: 4 or 8}) and the adapter (or, for full fine-tuning, the model)."""
    train_cfg.__post_init__()                 # bad values and absent devices fail before the folder is touched
    cfg = replace(train_cfg, lr=train_cfg.lr * exp.lr_scale) if exp.lr_scale != 1 else train_cfg
    if isinstance(inference_iters, bool) or not isinstance(inference_iters, int) or inference_iters < 0:
        raise ValueError(f"run_experiment: inference_iters must be an int >= 0, got {inference_iters!r}")
    device = pick_device(cfg.device)
    world = world_from_env()            # under torchrun every rank runs this; rank 0 alone writes the folder
    if world.world_size > 1 and cfg.parallel == "fsdp":
        raise ValueError("run_experiment: parallel='fsdp' leaves the adapters sharded, and a run folder stores "
                         "them whole; train() alone supports it (trainers/distributed.py); use parallel='ddp'")
    run_config = {"experiment": asdict(exp), "train": asdict(cfg), "task": task.spec.name, "model": model_name,
                  "budget_rank": budget_rank, "settings": settings or {}, "world_size": world.world_size,
                  "data_source": getattr(task, "source", None), "data_note": getattr(task, "note", "")}

    def batches(epoch: int):
        return task.batches("train", cfg.batch_size, shuffle=True, seed=cfg.seed * 100_003 + epoch, drop_last=True)

    if calibration is None:
        calibration = lambda: task.batches("train", cfg.batch_size, shuffle=True, seed=cfg.seed + 7919)  # noqa: E731
    folder = run_folder(out_dir, overwrite=overwrite, resume=resume) if world.is_main else nullcontext(Path(out_dir))
    with folder as out_dir:
        if resume and world.is_main:
            _check_same_run(out_dir / "config.json", run_config)
        elif world.is_main:
            atomic_write_json(out_dir / "config.json", run_config)
        model.to(device)                      # calibrate and quantize where training will run
        torch.manual_seed(cfg.seed)           # adapter initialisation is part of the seeded run
        model, allocator = prepare(model, exp, calibration, budget_rank, steps=cfg.steps)
        bits = base_bits(model)
        if world.is_main:
            atomic_write_json(out_dir / "config.json", {**run_config, "used": used(model, allocator)})
        if bits and world.is_main:
            atomic_write_json(out_dir / "bits.json", bits)

        result = train(model, batches, cfg, evaluate=evaluate, allocator=allocator, out_dir=out_dir, resume=resume)

        if exp.method == "full" and world.is_main:
            atomic_write(out_dir / "model.safetensors", lambda tmp: save_model(model, str(tmp)))
        elif world.is_main:
            save_adapter(model, out_dir, base_model_name_or_path=model_name or None)
        speed = inference_speed(model, task, batch_size=inference_batch_size, iters=inference_iters,
                                rt=Runtime.create(cfg.device, cfg.dtype))
        metric = task.spec.metric if task.spec.metric in result.metrics else "final_loss"
        run_metrics = {"metric": metric, "metric_value": result.metrics.get(metric), **result.metrics, **speed,
                       "final_ranks": {n: int(r) for n, r in _final_ranks(model).items()}}
        if world.is_main:
            write_loss_log(out_dir / "loss_log.csv", result.loss_log)
            atomic_write_json(out_dir / "eval_log.json", result.eval_log)
            atomic_write_json(out_dir / "rank_history.json", list(getattr(allocator, "rank_history", [])))
            atomic_write_json(out_dir / "metrics.json", run_metrics)   # last: its presence marks a finished run
    return summary_row(out_dir.name, run_config, run_metrics)


# Settings that change what is shown or how it is run, not what is trained: a resumed run may
# differ in these.
DISPLAY_ONLY = ("progress", "log_every", "isolate", "inference_iters", "parallel")


def _check_same_run(config_path: Path, run_config: dict) -> None:
    """A resumed run must be the run that stopped: same experiment, training config (but for
    DISPLAY_ONLY), task, model and settings as its config.json, or the losses would differ."""
    if not config_path.exists():
        raise FileNotFoundError(f"resume: {str(config_path)!r} is missing, so the run cannot be checked")
    saved = json.loads(config_path.read_text())
    given = json.loads(json.dumps(jsonable(run_config)))
    differ = [f"{key}.{name}: {saved.get(key, {}).get(name)!r} there, {value!r} now"
              for key in ("experiment", "train", "settings") for name, value in given[key].items()
              if name not in DISPLAY_ONLY and saved.get(key, {}).get(name) != value]
    differ += [f"{key}: {saved.get(key)!r} there, {given[key]!r} now" for key in ("task", "model", "budget_rank")
               if saved.get(key) != given[key]]
    if differ:
        raise ValueError(f"resume: the run in {str(config_path.parent)!r} was started with other settings; "
                         f"give the same ones ({'; '.join(differ)})")


def _final_ranks(model: nn.Module) -> dict[str, int]:
    return {name: getattr(layer, "active_rank", layer.rank) for name, layer in adapter_layers(model)
            if hasattr(layer, "rank")}


@dataclass
class RunSettings:
    """What a named run needs besides the experiment and training configs."""
    model: str = "gpt2-tiny"               # see MODEL_HELP
    max_length: int = 128                  # tokens per example (lm: block size)
    limit: int | None = None               # at most this many examples (lm: blocks) per split
    eval_examples: int | None = 512        # evaluate on at most this many eval examples
    data_dir: str | None = None            # the local data folder (default: trainers.paths.data_dir())
    budget_rank: int = 8                   # the uniform rank whose budget adaptive methods match
    eval_batch_size: int = 32              # evaluation, and the batched inference-speed figures
    inference_iters: int = 3               # timed calls per inference-speed figure; 0: not measured
    isolate: bool = True                   # matrix: each run in a fresh process, so its peak memory is its
                                           # own (trainers/isolated.py); off: shares the tokenized task

    def __post_init__(self):
        check_ints(self, ("max_length", "budget_rank", "eval_batch_size"), minimum=1)
        check_ints(self, ("inference_iters",), minimum=0)
        check_ints(self, ("limit", "eval_examples"), minimum=1, optional=True)
        if not isinstance(self.model, str) or not self.model:
            raise ValueError(f"RunSettings.model (--model): expected {MODEL_HELP}, got {self.model!r}")


def run_task(config: str | ExperimentConfig, task_name: str, train_cfg: TrainConfig, out_dir: Path,
             settings: RunSettings = RunSettings(), *, overwrite: bool = False, resume: bool = False,
             loaded=None) -> dict:
    """One named run: load the model and task by name, then run_experiment (which see for
    `overwrite` and `resume`). `loaded` = (tokenizer, TaskData) reuses a tokenized task
    (run_matrix does)."""
    exp = get_config(config) if isinstance(config, str) else config
    get_task(task_name)
    train_cfg.__post_init__()
    settings.__post_init__()
    pick_device(train_cfg.device)                      # everything that can be checked early is,
    if world_from_env().is_main:                       # (rank 0 alone owns the folder under torchrun)
        check_run_dir(out_dir, overwrite, resume)      # before minutes of loading
    model, tokenizer = load_model(settings.model, task_name, max_length=settings.max_length,
                                  data_dir=settings.data_dir, seed=train_cfg.seed,
                                  tokenizer=loaded[0] if loaded is not None else None)
    if loaded is not None:
        data = loaded[1]
    else:
        data = load_task_for(task_name, tokenizer, max_length=settings.max_length, limit=settings.limit,
                             data_dir=settings.data_dir, seed=train_cfg.seed)
    evaluate = make_evaluator(data, tokenizer=tokenizer, batch_size=settings.eval_batch_size,
                              max_examples=settings.eval_examples)
    return run_experiment(exp, model, data, train_cfg, out_dir, evaluate, overwrite=overwrite, resume=resume,
                          budget_rank=settings.budget_rank, model_name=settings.model, settings=asdict(settings),
                          inference_iters=settings.inference_iters, inference_batch_size=settings.eval_batch_size)


def describe(row: dict) -> str:
    """One line about a finished run: its metric, final loss and time."""
    def text(column: str, spec: str) -> str:
        value = row.get(column)
        return format(value, spec) if isinstance(value, float) else str(value)
    return (f"{row['run']}: {row.get('metric')} = {text('metric_value', '.4g')}, final loss "
            f"{text('final_loss', '.4f')}, {text('wall_time_s', '.1f')} s")


def run_matrix(tasks: list[str], configs: list[str], train_cfg: TrainConfig, results_root: Path,
               settings: RunSettings = RunSettings(), *, overwrite: bool = False, resume: bool = False,
               overrides: dict | None = None) -> list[dict]:
    """Every task x config into results_root/<task>__<config>/, then the summary files.

    `overrides`: ExperimentConfig fields set in every config (e.g. {"target_modules": "all-linear"}).
    Each run runs in a fresh process (settings.isolate), so its peak memory is its own; a line
    per finished run goes to stderr. A failed run leaves its folder as it was
    (trainers.results.run_folder) and the others go on; if any failed, a RuntimeError naming
    them is raised after the summary is written. `resume`: continue a stopped matrix: finished
    runs are kept (not run again), runs stopped after a checkpoint are resumed, the others start."""
    exps = {name: replace(get_config(name), **(overrides or {})) for name in configs}   # bad names and values
    for name in tasks:                                                                   # fail before any work
        get_task(name)
    train_cfg.__post_init__()
    settings.__post_init__()
    pick_device(train_cfg.device)
    root = Path(results_root)
    todo = {}                                                # run folder -> "run" | "resume" | "keep"
    for task_name in tasks:
        for config in configs:
            out_dir = root / f"{task_name}__{config}"
            state = run_state(out_dir) if resume else None
            if state == "finished":
                todo[out_dir] = "keep"
            elif state == "resumable":
                check_run_dir(out_dir, resume=True)
                todo[out_dir] = "resume"
            else:
                try:
                    check_run_dir(out_dir, overwrite)
                except FileExistsError as err:
                    if run_state(out_dir) == "resumable":     # the message names resume already
                        raise
                    raise FileExistsError(f"{err}, or resume=True (--resume) to keep the matrix's finished runs "
                                          f"and continue the others") from None
                todo[out_dir] = "run"
    rows, failed = [], []
    for task_name in tasks:
        loaded = None
        for config in configs:
            out_dir = root / f"{task_name}__{config}"
            if todo[out_dir] == "keep":
                run_config, run_metrics = (json.loads((out_dir / name).read_text())
                                           for name in ("config.json", "metrics.json"))
                rows.append(summary_row(out_dir.name, run_config, run_metrics))
                continue
            flags = dict(overwrite=overwrite and todo[out_dir] == "run", resume=todo[out_dir] == "resume")
            start = time.perf_counter()
            try:
                if settings.isolate:              # the child loads the model and task itself
                    row = in_fresh_process(run_task, exps[config], task_name, train_cfg, out_dir, settings, **flags)
                else:
                    if loaded is None:
                        _, tokenizer = load_model(settings.model, task_name, max_length=settings.max_length,
                                                  data_dir=settings.data_dir, seed=train_cfg.seed)
                        loaded = (tokenizer, load_task_for(task_name, tokenizer, max_length=settings.max_length,
                                                           limit=settings.limit, data_dir=settings.data_dir,
                                                           seed=train_cfg.seed))
                    row = run_task(exps[config], task_name, train_cfg, out_dir, settings, loaded=loaded, **flags)
            except Exception as err:   # noqa: BLE001 - one broken run must not lose the others
                failed.append(f"{out_dir.name}: {type(err).__name__}: {err}")
                print(f"[{len(rows) + len(failed)}/{len(todo)}] {out_dir.name}: failed after "
                      f"{time.perf_counter() - start:.1f} s: {type(err).__name__}", file=sys.stderr)
                continue
            rows.append(row)
            print(f"[{len(rows) + len(failed)}/{len(todo)}] {describe(row)}", file=sys.stderr)
    if rows:
        write_summary(root)
    if failed:
        raise RuntimeError(f"{len(failed)} of {len(tasks) * len(configs)} runs failed:\n  " + "\n  ".join(failed))
    return rows
