# %% [markdown]
# # 10. Running the experiment matrix and reading its results
#
# Tutorials 1-9 took the methods apart one at a time. The experiment matrix runs them side by
# side: every *task* x every named *configuration* (method x base precision x rank allocation),
# same model, same data, same steps, and writes one folder per run plus a summary across runs.
# This tutorial runs a small matrix, then reads its files and plots the way you would read a
# big one.
#
# ## From the command line
#
# Everything here has a command (`python -m trainers --help` lists configs, tasks and models):
#
#     # the whole matrix on one task; one folder per run under results/matrix/
#     python -m trainers matrix --tasks tiny_shakespeare --configs B-FP,B-Q4,B-Ada,SADRA,DRaFT-Q,Full-FT \
#         --model stories260K --steps 300 --max-length 64 --limit 2000 --results results/matrix
#
#     # one configuration on one task
#     python -m trainers run --config B-Q4 --task sst2 --model gpt2-tiny --steps 300
#
#     # redraw every figure from the files of a results folder (no retraining)
#     python -m trainers plots --results results/matrix
#
#     # the offline planted-rank benchmark (no data, no network); --quick for a small run
#     python -m trainers --quick
#
#     # ablations: rank, target modules, memory (full FT vs LoRA vs QLoRA, each in a fresh process)
#     python -m trainers ablate memory
#
# The options of `run` and `matrix` are the fields of `TrainConfig` and `RunSettings`
# (`--lr`, `--batch-size`, `--eval-examples`, ...). An existing run folder is never
# overwritten unless you pass `--overwrite`.
#
# Below we call the same functions from Python (`trainers.experiments.run_matrix`).

# %%
import csv
import json
import tempfile
from pathlib import Path

import torch

from trainers.experiments import CONFIGS, RunSettings, load_model, load_task_for, make_evaluator, run_matrix
from trainers.notebook import FAST, fast, have_stories, pyplot, save_figure
from trainers.plots import redraw
from trainers.train import TrainConfig

torch.manual_seed(0)
print("fast mode" if FAST else "full mode")

# %% [markdown]
# ## The named configurations
#
# Each row of the matrix is an `ExperimentConfig` in `trainers.experiments.CONFIGS`. "B-" rows
# are baselines, "Joint-" rows combine adaptive ranks with a quantized base, SADRA and DRaFT-Q
# are the curvature methods of tutorials 8 and 9. Every adapter method gets the parameter
# budget of uniform LoRA r = 8 (AdaLoRA prunes from 12 to an average of 4).

# %%
for name, c in CONFIGS.items():
    print(f"{name:12s} method={c.method:7s} quant={str(c.quant):5s} allocation={c.allocation:10s} {c.description}")

# %% [markdown]
# ## A small matrix
#
# The real setting is stories260K (a pretrained 260K-parameter LLaMA from `karpathy/tinyllamas`)
# fine-tuned on Tiny Shakespeare (`karpathy/tiny_shakespeare`), both from the offline data folder.
# Without them, we run the planted-rank benchmark instead (`trainers.planted.run_planted`), which
# writes the same kind of results folder, so everything after this cell reads the same way.
#
# Fast mode trains each configuration for a handful of steps: enough to produce every file and
# figure, not enough to rank the methods. Run the tutorial without `NANOPEFT_FAST` (or the
# command above) for numbers worth comparing.

# %%
Path("results").mkdir(exist_ok=True)
results = Path(tempfile.mkdtemp(prefix="matrix-tutorial-", dir="results"))   # a new folder under ./results
have_real = have_stories()

if have_real:
    configs = fast(["B-FP", "B-Q4", "B-Ada", "SADRA", "DRaFT-Q", "Full-FT"], ["B-FP", "B-Q4", "SADRA", "DRaFT-Q"])
    train_cfg = TrainConfig(steps=fast(300, 16), batch_size=8, lr=5e-3, warmup_steps=fast(15, 2), eval_every=0,
                            progress=False, device="cpu")
    settings = RunSettings(model="stories260K", max_length=64, limit=fast(2000, 96), eval_examples=fast(256, 32))
    # the un-tuned model's score, for reference (run_matrix records only fine-tuned runs)
    model, tokenizer = load_model("stories260K", "tiny_shakespeare", max_length=64)
    data = load_task_for("tiny_shakespeare", tokenizer, max_length=64, limit=settings.limit)
    before = make_evaluator(data, max_examples=settings.eval_examples)(model.eval())["perplexity"]
    print(f"stories260K before fine-tuning: held-out perplexity {before:.2f}")
    rows = run_matrix(["tiny_shakespeare"], configs, train_cfg, results, settings)
else:
    from trainers.planted import PlantedConfig, run_planted
    planted_cfg = PlantedConfig.quick(steps=fast(200, 40)) if FAST else PlantedConfig()
    report = run_planted(planted_cfg, results, methods=["LoRA", "QLoRA", "SADRA", "DRaFT-Q", "Oracle"])
    before = report["base_mse"]
    print(f"planted problem before fine-tuning: held-out MSE {before:.4g}")
print(f"results folder: {results}")

# %% [markdown]
# ## What is in a results folder
#
#     results/
#       <run>/config.json          what was run: the experiment config, TrainConfig, task, model
#       <run>/metrics.json         what came out: the task metric, parameters, bytes, memory, time
#       <run>/loss_log.csv         step, loss, lr for every step
#       <run>/rank_history.json    {step, ranks} snapshots (static methods: one)
#       <run>/adapter_config.json, adapter_model.safetensors    the trained adapter (PEFT format)
#       experiment_summary.csv     one row per run, every column filled ("n/a" if not recorded)
#       all_results.json           every run's config and metrics in one file
#
# Every file is written atomically (a temporary file, then a rename), so a crashed or
# interrupted run never leaves half a file behind.

# %%
run_dirs = sorted(p.parent for p in results.glob("*/metrics.json"))
print("runs:", [p.name for p in run_dirs])
print(f"files of {run_dirs[0].name}:", sorted(p.name for p in run_dirs[0].iterdir()))

# %% [markdown]
# ## Reading experiment_summary.csv
#
# The columns that matter most:
#
# - `metric`, `metric_value`: the task's own score on held-out data: perplexity for language
#   modelling (lower is better), accuracy or F1 for classification (higher is better), MSE on the
#   planted problem (lower is better). Compare runs on this, never on `final_loss`, which is the
#   *training* loss of the last batch alone (noisy, and measured on data the model trained on).
# - `trainable_params`, `trainable_pct`: what the optimizer updates. Adaptive methods should sit
#   at (or under) the uniform r = 8 budget; full fine-tuning at 100 %. AdaLoRA (B-Ada) counts the
#   storage of its initial r = 12: pruned triplets are masked to zero, not removed, so its active
#   rank (in all_results.json below) is what its budget is about.
# - `adapter_bytes`: the bytes of the trainable tensors, i.e. what you save and ship.
# - `peak_memory_mib` (and `_bytes`, `_kind`): on a GPU the allocator's peak for the run; on the
#   CPU the peak resident set size, runtime included. Each run of a matrix runs in its own process
#   (`RunSettings.isolate`), so the peak is that run's own, not "the largest so far".
# - `state_mib` (and `_bytes`): the training state counted exactly: weights as stored (packed for
#   a 4-bit base), gradients and AdamW's moments; it separates the methods where the runtime hides them.
# - `inference_*`: inference speed (tokens/s of greedy generation here), at batch 1 and batched,
#   adapters unmerged and merged: a separate number from the training throughput below.
# - `wall_time_s`, `tokens_per_s`: speed of the training loop (SADRA's Hutchinson calibration runs
#   before the loop and is not included). The 4-bit runs pay for dequantizing weights on the fly,
#   but on a model this small and a run this short other load on the machine can hide that: compare
#   B-Q4 with B-FP over a longer run before reading anything into it.

# %%
with open(results / "experiment_summary.csv", newline="") as f:
    summary = list(csv.DictReader(f))
print(f"{len(summary)} rows; columns: {', '.join(summary[0])}\n")
print(f"{'run':28s} {'metric':>10} {'value':>10} {'trainable':>10} {'%':>7} {'adapter B':>10} {'time s':>7}")
for row in summary:
    print(f"{row['run']:28s} {row['metric']:>10} {float(row['metric_value']):10.4f} "
          f"{int(row['trainable_params']):>10,} {float(row['trainable_pct']):7.2f} "
          f"{int(row['adapter_bytes']):>10,} {float(row['wall_time_s']):7.1f}")
best = min(summary, key=lambda r: float(r["metric_value"]))
# What the list above promises, checked: every cell filled; the one-shot and dynamic rank methods
# at or under uniform r = 8's trainable parameters (B-Ada is the exception the text names).
assert all(value != "" for row in summary for value in row.values())
uniform = next(int(r["trainable_params"]) for r in summary if r["config"] == "B-FP")
assert all(int(r["trainable_params"]) <= uniform for r in summary if r["allocation"] in ("hutchinson", "curvature"))
assert all(float(r["trainable_pct"]) == 100 for r in summary if r["method"] == "full")
print(f"\nbest (lowest {best['metric']}): {best['run']}; un-tuned model: {before:.4g}")

# %% [markdown]
# ## Reading all_results.json
#
# The summary flattens each run to one row; `all_results.json` keeps everything, e.g. the
# final rank of every adapted layer, which is where the allocation methods differ.

# %%
everything = json.loads((results / "all_results.json").read_text())
for run, record in everything.items():
    ranks = record["metrics"].get("final_ranks", {})
    if ranks:
        values = list(ranks.values())
        print(f"{run:28s} {len(values)} adapted layers, ranks {min(values)}..{max(values)}, total {sum(values)}")
    else:
        print(f"{run:28s} no adapters (full fine-tuning)")

# %% [markdown]
# ## The plots
#
# `trainers.plots.redraw(folder)` (what `python -m trainers plots` calls) draws every figure
# from the files alone, so you can redraw them at any time without retraining:
#
# - `loss_curves.png`: training loss per step for every run (a running mean). Look at the
#   *shape* (did it still go down at the end? then more steps would help) more than at the
#   last value.
# - `<run>/rank_heatmap.png`: the final rank per layer x module; for a method whose ranks
#   changed (AdaLoRA, DRaFT-Q) also every layer's rank over the steps. On the planted problem it
#   shows the planted ranks beside it.
# - `rank_ablation.png`, `memory_quality.png`: when the folder holds an ablation's CSV.

# %%
for path in redraw(results):
    print("drawn:", path.relative_to(results))

# %% [markdown]
# Finally one figure of our own from the summary: each run's held-out score (bars, sorted) with
# its trainable parameters written beside it, the trade-off the whole framework is about. The
# un-tuned model's score is in the title (drawn as a line it would dwarf the differences).

# %%
plt = pyplot()
ordered = sorted(summary, key=lambda r: float(r["metric_value"]), reverse=True)
fig, ax = plt.subplots(figsize=(7, 0.5 * len(ordered) + 1.6))
values = [float(r["metric_value"]) for r in ordered]
ax.barh([r["config"] for r in ordered], values, color="tab:blue")
for i, row in enumerate(ordered):
    ax.text(values[i], i, f"  {int(row['trainable_params']):,} trainable ({float(row['trainable_pct']):.1f} %)",
            va="center", fontsize=8)
ax.set_xlim(min(values) * 0.9, max(values) * 1.25)
ax.set_xlabel(f"held-out {ordered[0]['metric']} (lower is better)")
ax.set_title(f"the matrix at a glance (before fine-tuning: {before:.4g})")
ax.grid(alpha=0.3, axis="x")
save_figure(fig, "10_matrix_summary")

# %% [markdown]
# ## How to read a matrix honestly
#
# - One seed is one sample. Differences smaller than the spread between seeds (`--seed`) are not
#   differences; run two or three seeds before believing a ranking.
# - Same budget, same steps, same learning rate: the matrix holds these fixed on purpose, but one
#   learning rate does not suit every method equally (full fine-tuning usually wants a smaller one).
# - The quantized rows (B-Q4, DRaFT-Q, Joint-*) trade a little quality for a 4-bit base; read them
#   against their float twins (B-Q4 against B-FP).
# - On real data nobody knows the right ranks; the planted benchmark (`python -m trainers`) is where
#   an allocation method can be checked against the truth.
