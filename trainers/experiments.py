"""The experiment matrix: named configurations (method x quantization x allocation),
`prepare` (turn a model into what a configuration trains), one run, and many runs.

    exp = CONFIGS["B-Q4"]                          # QLoRA: NF4 base + LoRA r=8
    model, allocator = prepare(model, exp, calibration)
    result = train(model, batches, TrainConfig(), allocator=allocator, evaluate=evaluate)

`run_experiment` does that and writes the run folder (trainers/results.py);
`run_task` first loads a model and a task by name (`load_model`, `load_task_for`,
`make_evaluator` below); `run_matrix` runs tasks x configs and writes the summary.
The ablations (rank, target modules, memory) are in trainers/ablations.py.

Methods and where they come from:
  LoRA (Hu et al. 2021), QLoRA = NF4 + double quantization under LoRA (Dettmers et al. 2023),
  AdaLoRA (Zhang et al. 2023), DoRA (Liu et al. 2024), HiRA (Huang et al. 2025),
  Sparse LoRA (L1 + magnitude pruning of the factors), SADRA (this project: one-shot
  Hutchinson Hessian-trace ranks, Hutchinson 1989 / Yao et al. 2020 "PyHessian"), DRaFT-Q
  (this project: EMA-curvature dynamic ranks under a memory cap on a 4-bit base).
"""
from __future__ import annotations

import itertools
import json
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Callable, Iterator

import torch
import torch.nn as nn
from safetensors.torch import save_model

from allocation.adalora import AdaLoRAAllocator, AdaLoRAConfig
from allocation.allocator import NullAllocator
from allocation.budget import adapter_params, training_bytes
from allocation.controller import ControllerConfig, CurvatureRankAllocator
from allocation.hutchinson import hessian_traces, module_shapes, sensitivity_ranks
from allocation.precision import choose_precision, total_base_bytes
from allocation.sparsity import SparsityAllocator
from lora.adapter_io import save_adapter
from lora.base import module_device
from lora.config import IA3Config
from lora.model import LoraConfig, adapter_layers, add_ia3_to_model, add_lora_to_model, find_targets
from quantization.model import HEAD_NAMES, quantize_model   # HEAD_NAMES: the task heads, never quantized or adapted
from trainers import metrics, models
from trainers.checkpoints import config_from_hf, load_hf_model, load_llama2c, read_hf_config, resolve_source
from trainers.config_checks import check_ints
from trainers.data import get_task, load_task, read_raw
from trainers.device import pick_device
from trainers.paths import data_file
from trainers.results import (atomic_write, atomic_write_json, check_run_dir, jsonable, run_folder, run_state,
                              summary_row, write_loss_log, write_summary)
from trainers.tokenization import Llama2cTokenizer, load_tokenizer, train_bpe_tokenizer
from trainers.train import TrainConfig, train

METHODS = ("lora", "sparse", "hira", "dora", "adalora", "ia3", "full")
ALLOCATIONS = ("uniform", "adalora", "hutchinson", "curvature", "manual")
QUANTS = (None, 4, 8, "mixed")


@dataclass
class ExperimentConfig:
    name: str                              # the configuration's name, e.g. "B-Q4"
    method: str = "lora"                   # "lora" | "sparse" | "hira" | "dora" | "adalora" | "full"
    r: int = 8                             # rank (initial rank for adaptive allocations)
    lora_alpha: float = 16                 # scaling = lora_alpha / r
    target_modules: tuple | None = None    # None: the model family's attention projections (PEFT defaults)
    quant: int | str | None = None         # None | 4 (NF4 + double quant) | 8 | "mixed" (8/4 by sensitivity)
    allocation: str = "uniform"            # "uniform" | "adalora" | "hutchinson" | "curvature" | "manual"
    rank_pattern: dict | None = None       # manual: {module name or pattern: rank}; None: a depth ramp
    description: str = ""
    target_r: int | None = None            # AdaLoRA: average rank at the end of the budget schedule
    lora_dropout: float = 0.0
    mixed_high_fraction: float = 0.5       # "mixed": base budget = all-4-bit + this share of the 8-bit extra
    sparsity: float = 0.5                  # "sparse": final fraction of zeros in A and B
    l1: float = 1e-4                       # "sparse": L1 coefficient on the factors

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"{self.name}: method must be one of {METHODS}, got {self.method!r}")
        if self.allocation not in ALLOCATIONS:
            raise ValueError(f"{self.name}: allocation must be one of {ALLOCATIONS}, got {self.allocation!r}")
        if self.quant not in QUANTS:
            raise ValueError(f"{self.name}: quant must be one of {QUANTS}, got {self.quant!r}")
        if self.method == "full" and (self.quant is not None or self.allocation != "uniform"):
            raise ValueError(f"{self.name}: full fine-tuning trains every weight, so it takes no quantized base "
                             f"and no rank allocation")
        if self.method == "ia3" and (self.quant is not None or self.allocation != "uniform"):
            raise ValueError(f"{self.name}: IA3 has no rank to allocate and is run on the float base here")
        if (self.method == "adalora") != (self.allocation == "adalora"):
            raise ValueError(f"{self.name}: method 'adalora' and allocation 'adalora' go together")
        if self.r < 1:
            raise ValueError(f"{self.name}: r must be >= 1, got {self.r}")
        if self.rank_pattern and self.allocation != "manual":
            raise ValueError(f"{self.name}: rank_pattern is used only with allocation='manual' (the other "
                             f"allocations choose the ranks), got allocation={self.allocation!r}")
        if self.target_modules is not None:
            self.target_modules = tuple(self.target_modules)


_C = ExperimentConfig
CONFIGS: dict[str, ExperimentConfig] = {c.name: c for c in [
    _C("B-FP", description="LoRA r=8 on the full-precision base (baseline)"),
    _C("B-Q4", quant=4, description="QLoRA: NF4 + double-quantized base, LoRA r=8"),
    _C("B-Ada", method="adalora", allocation="adalora", r=12, target_r=4,
       description="AdaLoRA: SVD-form adapters from r=12 pruned to an average r=4 by importance"),
    _C("Joint-1", method="adalora", allocation="adalora", r=12, target_r=4, quant=4,
       description="adaptive ranks (AdaLoRA 12->4) on an NF4 base"),
    _C("Joint-2", method="adalora", allocation="adalora", r=12, target_r=4, quant="mixed",
       description="adaptive ranks (AdaLoRA 12->4) on a mixed 8/4-bit base chosen by Hutchinson sensitivity"),
    _C("Joint-3", allocation="manual", quant="mixed",
       description="manual rank pattern (a depth ramp at the r=8 budget unless given) + mixed 8/4-bit base"),
    _C("SADRA", allocation="hutchinson",
       description="one-shot ranks from Hutchinson Hessian traces, r in [2, 32] at the uniform r=8 budget"),
    _C("DRaFT-Q", allocation="curvature", r=4, quant=4,
       description="EMA-curvature dynamic ranks from r=4 under the r=8 memory cap, NF4 base"),
    _C("Sparse-LoRA", method="sparse", description="LoRA r=8 with L1 and magnitude pruning of A and B"),
    _C("HiRA", method="hira", description="HiRA: high-rank update W0 * (B A), r=8"),
    _C("DoRA", method="dora", description="DoRA: magnitude and direction, LoRA r=8 on the direction"),
    _C("IA3", method="ia3", description="IA3: learned vectors rescaling keys, values and the feed-forward input"),
    _C("Full-FT", method="full", description="full fine-tuning: every weight trains (reference)"),
]}
del _C


def get_config(name: str) -> ExperimentConfig:
    if name not in CONFIGS:
        raise KeyError(f"unknown config {name!r}; known configs: {', '.join(CONFIGS)}")
    return CONFIGS[name]


# ----------------------------------------------------------------------------- prepare

def model_family(model: nn.Module) -> str | None:
    m = models
    for family, classes in (("gpt2", (m.GPT2LMHeadModel, m.GPT2ForSequenceClassification, m.GPT2Model)),
                            ("distilbert", (m.DistilBertForSequenceClassification,
                                            m.DistilBertForQuestionAnswering, m.DistilBertModel)),
                            ("llama", (m.LlamaForCausalLM, m.LlamaModel))):
        if isinstance(model, classes):
            return family
    return None


# PEFT's defaults for these families: the attention projections the LoRA paper adapts (Wq, Wv).
DEFAULT_TARGETS = {"gpt2": ("c_attn",), "distilbert": ("q_lin", "v_lin"), "llama": ("q_proj", "v_proj")}


# PEFT's IA3 defaults (target_modules, feedforward_modules): keys, values and the MLP's output projection.
IA3_TARGETS = {"gpt2": (("c_attn", "mlp.c_proj"), ("mlp.c_proj",)),
               "distilbert": (("k_lin", "v_lin", "lin2"), ("lin2",)),
               "llama": (("k_proj", "v_proj", "down_proj"), ("down_proj",))}


def default_targets(model: nn.Module) -> tuple[str, ...]:
    family = model_family(model)
    if family is None:
        raise ValueError(f"target_modules: {type(model).__name__} is not a GPT-2, DistilBERT or LLaMA model "
                         f"from trainers.models, so give target_modules explicitly")
    return DEFAULT_TARGETS[family]


def linear_layers(model: nn.Module, skip: tuple[str, ...] = HEAD_NAMES) -> list[str]:
    """Names of the nn.Linear layers outside the task heads: what quantization replaces."""
    return [name for name, m in model.named_modules()
            if isinstance(m, nn.Linear) and name.split(".")[-1] not in skip]


def task_heads(model: nn.Module) -> tuple[str, ...]:
    """Names of the task-specific heads (not a tied LM head): trained in full next to the adapters."""
    return tuple(name for name, m in model.named_modules()
                 if isinstance(m, nn.Linear) and name.split(".")[-1] in HEAD_NAMES
                 and name.split(".")[-1] != "lm_head")


def _calibration_batches(calibration, n: int, who: str) -> list[dict]:
    if calibration is None:
        raise ValueError(f"{who} needs calibration batches (calibration=lambda: iterator of batch dicts)")
    batches = list(itertools.islice(iter(calibration()), n))
    if not batches:
        raise ValueError(f"{who}: the calibration iterator yielded no batch")
    return batches


def _depth_ramp(names: list[str], shapes: dict, budget_rank: int) -> dict[str, int]:
    """The 'manual' pattern used when none is given: rank grows with depth (later layers adapt
    more, a common observation, e.g. in the AdaLoRA paper's rank maps), at the uniform budget."""
    return sensitivity_ranks({n: float(i + 1) for i, n in enumerate(names)}, shapes,
                             r_min=max(1, budget_rank // 4), r_max=budget_rank * 4, uniform_rank=budget_rank)


def prepare(model: nn.Module, exp: ExperimentConfig, calibration: Callable[[], Iterator[dict]] | None = None,
            budget_rank: int = 8, *, steps: int | None = None, n_calibration: int = 4, max_probes: int = 16):
    """Quantize, add adapters, and set up the allocator for `exp`; returns (model, allocator).

    calibration: a callable giving an iterator of batches, needed by the Hutchinson
    sensitivity (SADRA ranks, mixed precision): `n_calibration` batches, at most
    `max_probes` Rademacher probes. steps: the run's length (paces the adaptive
    allocators). The model is changed in place."""
    if exp.method == "full":
        for p in model.parameters():
            p.requires_grad_(True)
        return model, NullAllocator(None)

    if exp.method == "ia3":   # PEFT's per-family IA3 targets; the task head trains in full, as below
        family = model_family(model)
        targets, feedforward = IA3_TARGETS.get(family, (exp.target_modules, ()))
        add_ia3_to_model(model, IA3Config(target_modules=exp.target_modules or targets,
                                          feedforward_modules=feedforward, modules_to_save=task_heads(model)))
        return model, NullAllocator(None)             # no ranks to allocate

    targets = exp.target_modules or default_targets(model)
    probe = LoraConfig(r=exp.r, lora_alpha=exp.lora_alpha, target_modules=targets, method=exp.method)
    names = find_targets(model, probe)                 # raises, listing candidates, when nothing matches
    shapes = module_shapes(model, names)

    # 1. sensitivity, on the full-precision model (before quantizing)
    rank_pattern: dict[str, int] = {}
    quant_names = linear_layers(model)
    traces = None
    if exp.allocation == "hutchinson" or exp.quant == "mixed":
        batches = _calibration_batches(calibration, n_calibration, f"{exp.name} (Hutchinson sensitivity)")
        probed = sorted(set(names) | (set(quant_names) if exp.quant == "mixed" else set()),
                        key=list(dict(model.named_modules())).index)
        traces = hessian_traces(model, batches, probed, min_samples=min(4, max_probes), max_samples=max_probes)
    if exp.allocation == "hutchinson":
        rank_pattern = sensitivity_ranks({n: traces[n] for n in names}, shapes, r_min=2, r_max=4 * budget_rank,
                                         uniform_rank=budget_rank)
    elif exp.allocation == "manual":
        rank_pattern = dict(exp.rank_pattern) if exp.rank_pattern else _depth_ramp(names, shapes, budget_rank)

    # 2. quantize the base
    if exp.quant is not None:
        if exp.quant == "mixed":
            bits = _mixed_bits(model, quant_names, traces, exp.mixed_high_fraction)
        else:
            bits = {name: exp.quant for name in quant_names}
        quantize_model(model, bits=bits)

    # 3. adapters; a task head made for this task (classifier, span head) trains in full, as PEFT's
    #    modules_to_save does: a frozen random head would leave the adapters nothing to fit
    heads = task_heads(model)
    config = replace(probe, rank_pattern=rank_pattern, lora_dropout=exp.lora_dropout, modules_to_save=heads)
    add_lora_to_model(model, config)

    # 4. allocator
    if exp.allocation == "curvature":
        cap = sum(training_bytes(adapter_params(i, o, budget_rank, exp.method)) for i, o in shapes.values())
        # Ten decisions over the run, each growing a third of the layers by 2: from r=4 the
        # budget of uniform r=8 fills in about half of them, then rank flows to curved layers.
        interval = max(1, (steps or 400) // 10)
        cfg = ControllerConfig(interval=interval, warmup=interval, r_min=2, r_max=4 * budget_rank,
                               n_change=max(1, len(shapes) // 3), memory_cap_bytes=cap)
        return model, CurvatureRankAllocator(model, cfg)
    if exp.allocation == "adalora":
        return model, _adalora_allocator(model, exp, steps)
    if exp.method == "sparse":
        return model, SparsityAllocator(model, steps or 400, exp.sparsity, exp.l1)
    return model, NullAllocator(model)


def _mixed_bits(model: nn.Module, names: list[str], traces: dict, high_fraction: float) -> dict[str, int]:
    """8 bits for the most sensitive layers per extra byte, 4 for the rest (allocation.precision),
    under a base-weight budget of all-4-bit + `high_fraction` of what all-8-bit would add."""
    shapes = module_shapes(model, names)
    low = total_base_bytes({n: 4 for n in names}, shapes)
    high = total_base_bytes({n: 8 for n in names}, shapes)
    scores = {n: abs(traces[n].trace) for n in names}
    return choose_precision(scores, shapes, int(low + high_fraction * (high - low)))


def _adalora_allocator(model: nn.Module, exp: ExperimentConfig, steps: int | None):
    """AdaLoRA's schedule paced by the run: warm-up 10 % of the steps, final phase 20 %."""
    total = steps or 400
    cfg = AdaLoRAConfig(init_r=exp.r, target_r=exp.target_r or max(1, exp.r // 2),
                        tinit=total // 10, tfinal=total // 5, deltaT=max(1, total // 100))
    return AdaLoRAAllocator(model, cfg, total_steps=total)


# ----------------------------------------------------------------------------- evaluation

def make_evaluator(data, *, tokenizer=None, batch_size: int = 32, max_examples: int | None = None,
                   max_new_tokens: int = 16) -> Callable[[nn.Module], dict]:
    """evaluate(model) -> {metric: value} on the eval split of a trainers.data.TaskData.

    classification: accuracy (and F1 for two classes); lm: loss and perplexity of the
    next-token prediction (token-weighted); qa: SQuAD exact match / F1 of the best
    context span (needs the tokenizer to turn tokens back into text); summarization:
    ROUGE-L of greedy continuations of the prompt (needs the tokenizer)."""
    kind = data.spec.kind
    n = data.num_examples("eval") if max_examples is None else min(max_examples, data.num_examples("eval"))
    if n == 0:
        raise ValueError(f"evaluate: the eval split of {data.spec.name} is empty")
    if kind in ("qa", "summarization") and tokenizer is None:
        raise ValueError(f"evaluate: a {kind} task needs the tokenizer to score text")

    def batches(device):
        for start in range(0, n, batch_size):
            batch = data.collate("eval", list(range(start, min(n, start + batch_size))))
            yield {k: v.to(device) for k, v in batch.items()}

    @torch.no_grad()
    def evaluate(model: nn.Module) -> dict:
        device = module_device(model)
        if kind in ("classification", "pair_classification"):
            preds, labels = [], []
            for b in batches(device):
                logits, _ = model(b["input_ids"], attention_mask=b["attention_mask"])
                preds += logits.argmax(-1).tolist()
                labels += b["labels"].tolist()
            out = {"accuracy": metrics.accuracy(preds, labels)}
            if data.spec.num_labels == 2:
                out["f1"] = metrics.f1_score(preds, labels)
            return out
        if kind == "lm":
            nll, count = 0.0, 0
            for b in batches(device):
                _, loss = model(b["input_ids"], targets=b["labels"], attention_mask=b["attention_mask"])
                predicted = int(((b["labels"][:, 1:] != -100) & (b["attention_mask"][:, 1:] != 0)).sum())
                nll, count = nll + float(loss) * predicted, count + predicted
            return {"loss": nll / count, "perplexity": metrics.perplexity(nll / count)}
        if kind == "qa":                  # the best span inside the context (TaskData.qa_predictions)
            preds, truths = [], []
            for b in batches(device):
                logits, _ = model(b["input_ids"], attention_mask=b["attention_mask"])   # (B, T, 2)
                preds += data.qa_predictions("eval", b["index"], logits[..., 0], logits[..., 1], tokenizer)
                truths += [data.eval["answers"][i] for i in b["index"].tolist()]
            return {k: float(v) for k, v in metrics.squad_scores(preds, truths).items()}
        if kind == "summarization":
            cands, refs = [], []
            for i in range(n):
                prompt = torch.tensor([data.eval["prompt_ids"][i]], device=device)
                out = model.generate(prompt, max_new_tokens, temperature=0.0)[0, prompt.shape[1]:].tolist()
                eos = getattr(tokenizer, "eos_id", None)
                cands.append(tokenizer.decode(out[:out.index(eos)] if eos in out else out))
                refs.append(data.eval["references"][i])
            return {"rouge_l": metrics.mean_rouge_l(cands, refs)}
        raise ValueError(f"evaluate: no evaluation for task kind {kind!r}")
    return evaluate


# ----------------------------------------------------------------------------- one run

def run_experiment(exp: ExperimentConfig, model: nn.Module, task, train_cfg: TrainConfig, out_dir: Path,
                   evaluate: Callable[[nn.Module], dict] | None = None, *, overwrite: bool = False,
                   budget_rank: int = 8, model_name: str = "", calibration: Callable | None = None,
                   resume: bool = False, settings: dict | None = None) -> dict:
    """Prepare `model` for `exp`, train it on `task` (a trainers.data.TaskData, or anything
    with `.batches(split, batch_size, shuffle=, seed=, drop_last=)` and `.spec.name/.metric`),
    and write the run folder. Returns the run's summary row (trainers.results.SUMMARY_COLUMNS).

    The folder is all or nothing (trainers.results.run_folder): an existing non-empty out_dir
    is an error unless `overwrite` (a finished run) or `resume` (a run stopped after a
    checkpoint: `model` must be built as the first time, and the configs must match those in
    its config.json). `settings`: anything else that defines the run, recorded (and compared
    on resume) in config.json."""
    cfg = train_cfg
    cfg.__post_init__()                       # bad values and absent devices fail before the folder is touched
    device = pick_device(cfg.device)
    run_config = {"experiment": asdict(exp), "train": asdict(cfg), "task": task.spec.name, "model": model_name,
                  "budget_rank": budget_rank, "settings": settings or {},
                  "data_source": getattr(task, "source", None), "data_note": getattr(task, "note", "")}

    def batches(epoch: int):
        return task.batches("train", cfg.batch_size, shuffle=True, seed=cfg.seed * 100_003 + epoch, drop_last=True)

    if calibration is None:
        calibration = lambda: task.batches("train", cfg.batch_size, shuffle=True, seed=cfg.seed + 7919)  # noqa: E731
    with run_folder(out_dir, overwrite=overwrite, resume=resume) as out_dir:
        if resume:
            _check_same_run(out_dir / "config.json", run_config)
        else:
            atomic_write_json(out_dir / "config.json", run_config)
        model.to(device)                      # calibrate and quantize where training will run
        torch.manual_seed(cfg.seed)           # adapter initialisation is part of the seeded run
        model, allocator = prepare(model, exp, calibration, budget_rank, steps=cfg.steps)

        result = train(model, batches, cfg, evaluate=evaluate, allocator=allocator, out_dir=out_dir, resume=resume)

        if exp.method == "full":
            atomic_write(out_dir / "model.safetensors", lambda tmp: save_model(model, str(tmp)))
        else:
            save_adapter(model, out_dir, base_model_name_or_path=model_name or None)
        metric = task.spec.metric if task.spec.metric in result.metrics else "final_loss"
        run_metrics = {"metric": metric, "metric_value": result.metrics.get(metric), **result.metrics,
                       "final_ranks": {n: int(r) for n, r in _final_ranks(model).items()}}
        write_loss_log(out_dir / "loss_log.csv", result.loss_log)
        atomic_write_json(out_dir / "eval_log.json", result.eval_log)
        atomic_write_json(out_dir / "rank_history.json", list(getattr(allocator, "rank_history", [])))
        atomic_write_json(out_dir / "metrics.json", run_metrics)   # last: its presence marks a finished run
    return summary_row(out_dir.name, run_config, run_metrics)


# Settings that change what is shown, not what is computed: a resumed run may differ in these.
DISPLAY_ONLY = ("progress", "log_every")


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


# ----------------------------------------------------------------------------- models and tasks by name

# From-scratch presets: (family, config overrides); the tokenizer is a byte-level BPE
# trained on the task's training text (trainers.tokenization.train_bpe_tokenizer).
MODEL_PRESETS = {
    "gpt2-tiny": ("gpt2", dict(n_layer=2, n_head=2, n_embd=32)),
    "gpt2-mini": ("gpt2", dict(n_layer=4, n_head=4, n_embd=128)),
    "distilbert-tiny": ("distilbert", dict(n_layers=2, n_heads=2, dim=32, hidden_dim=64)),
    "llama-tiny": ("llama", dict(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=64)),
}
LLAMA2C_MODELS = {"stories260K": ("stories260K", "stories260K.bin", "tok512.bin")}
MODEL_HELP = (f"a from-scratch preset ({', '.join(MODEL_PRESETS)}), {', '.join(LLAMA2C_MODELS)} "
              f"(llama2.c, from the data folder), a local Hugging Face checkpoint folder, or a hub id")


def model_kind(family: str, task_kind: str) -> str:
    """The trainers.models head a task needs, for a family."""
    kinds = {("gpt2", "classification"): "gpt2-cls", ("gpt2", "pair_classification"): "gpt2-cls",
             ("gpt2", "lm"): "gpt2", ("gpt2", "summarization"): "gpt2",
             ("distilbert", "classification"): "distilbert-cls",
             ("distilbert", "pair_classification"): "distilbert-cls", ("distilbert", "qa"): "distilbert-qa",
             ("llama", "lm"): "llama", ("llama", "summarization"): "llama",
             ("llama", "classification"): "llama-cls", ("llama", "pair_classification"): "llama-cls",
             ("llama", "qa"): "llama-qa"}
    if (family, task_kind) not in kinds:
        fits = sorted({f for f, k in kinds if k == task_kind})
        raise ValueError(f"a {family} model has no head for a {task_kind} task; families that do: {fits}")
    return kinds[(family, task_kind)]


def _task_texts(name: str, data_dir=None, seed: int = 0, limit: int = 5000) -> list[str]:
    texts = []
    for record in read_raw(name, data_dir=data_dir, seed=seed).train[:limit]:
        texts += [record[k] for k in ("text", "text_pair", "summary", "question", "context")
                  if isinstance(record.get(k), str)]
    return texts


def load_model(model_name: str, task_name: str, *, max_length: int = 128, data_dir=None, seed: int = 0,
               vocab_size: int = 512, tokenizer=None):
    """(model, tokenizer) for a task from a name (see MODEL_HELP). Presets are built seeded,
    with `tokenizer` if given (else one trained on the task's text)."""
    spec = get_task(task_name)
    if model_name in MODEL_PRESETS:
        family, overrides = MODEL_PRESETS[model_name]
        if tokenizer is None:
            tokenizer = train_bpe_tokenizer(_task_texts(task_name, data_dir, seed), vocab_size=vocab_size)
        kind = model_kind(family, spec.kind)
        length = {"gpt2": "block_size", "distilbert": "max_position_embeddings", "llama": "max_seq_len"}[family]
        config_cls = models.MODELS[kind][0]
        fields = {**overrides, "vocab_size": tokenizer.vocab_size, length: max_length}
        if kind.endswith("-cls"):
            fields["num_labels"] = spec.num_labels
        torch.manual_seed(seed)
        return models.build_model(kind, config_cls.tiny(**fields)), tokenizer
    if model_name in LLAMA2C_MODELS:
        kind = model_kind("llama", spec.kind)
        overrides = {"num_labels": spec.num_labels} if kind.endswith("-cls") else {}
        folder, weights, tok = LLAMA2C_MODELS[model_name]
        return (load_llama2c(data_file(folder, weights, explicit=data_dir), kind, **overrides),
                Llama2cTokenizer.from_file(data_file(folder, tok, explicit=data_dir)))
    try:
        folder = resolve_source(model_name)
    except FileNotFoundError as err:
        raise ValueError(f"unknown model {model_name!r}: expected {MODEL_HELP} ({err})") from None
    family, _ = config_from_hf(read_hf_config(folder))
    kind = model_kind(family, spec.kind)
    overrides = {"num_labels": spec.num_labels} if kind.endswith("-cls") else {}
    return load_hf_model(folder, kind=kind, **overrides), load_tokenizer(folder)


def load_task_for(task_name: str, tokenizer, *, max_length: int = 128, limit: int | None = None,
                  data_dir=None, seed: int = 0):
    return load_task(task_name, tokenizer, max_length=max_length, limit=limit, data_dir=data_dir, seed=seed)


# ----------------------------------------------------------------------------- many runs

@dataclass
class RunSettings:
    """What a named run needs besides the experiment and training configs."""
    model: str = "gpt2-tiny"               # see MODEL_HELP
    max_length: int = 128                  # tokens per example (lm: block size)
    limit: int | None = None               # at most this many examples (lm: blocks) per split
    eval_examples: int | None = 512        # evaluate on at most this many eval examples
    data_dir: str | None = None            # the local data folder (default: trainers.paths.data_dir())
    budget_rank: int = 8                   # the uniform rank whose budget adaptive methods match
    eval_batch_size: int = 32

    def __post_init__(self):
        check_ints(self, ("max_length", "budget_rank", "eval_batch_size"), minimum=1)
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
    check_run_dir(out_dir, overwrite, resume)          # before minutes of loading
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
                          budget_rank=settings.budget_rank, model_name=settings.model, settings=asdict(settings))


def run_matrix(tasks: list[str], configs: list[str], train_cfg: TrainConfig, results_root: Path,
               settings: RunSettings = RunSettings(), *, overwrite: bool = False, resume: bool = False) -> list[dict]:
    """Every task x config into results_root/<task>__<config>/, then the summary files.

    A failed run leaves its folder as it was (trainers.results.run_folder) and the others go
    on; if any failed, a RuntimeError naming them is raised after the summary is written.
    `resume`: continue a stopped matrix: finished runs are kept (not run again), runs stopped
    after a checkpoint are resumed, the others start."""
    for name in configs:
        get_config(name)                                     # unknown names fail before any work
    for name in tasks:
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
            try:
                if loaded is None:
                    _, tokenizer = load_model(settings.model, task_name, max_length=settings.max_length,
                                              data_dir=settings.data_dir, seed=train_cfg.seed)
                    loaded = (tokenizer, load_task_for(task_name, tokenizer, max_length=settings.max_length,
                                                       limit=settings.limit, data_dir=settings.data_dir,
                                                       seed=train_cfg.seed))
                rows.append(run_task(config, task_name, train_cfg, out_dir, settings, loaded=loaded,
                                     overwrite=overwrite and todo[out_dir] == "run",
                                     resume=todo[out_dir] == "resume"))
            except Exception as err:   # noqa: BLE001 - one broken run must not lose the others
                failed.append(f"{out_dir.name}: {type(err).__name__}: {err}")
    if rows:
        write_summary(root)
    if failed:
        raise RuntimeError(f"{len(failed)} of {len(tasks) * len(configs)} runs failed:\n  " + "\n  ".join(failed))
    return rows
