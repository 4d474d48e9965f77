# %% [markdown]
# # 3. Which modules to adapt
#
# A transformer block has several Linear layers: the attention projections W_q, W_k,
# W_v, W_o and the MLP (in LLaMA: gate, up and down projections). LoRA can sit on any
# subset. The original paper (Hu et al. 2021, section 7.1) adapted only W_q and W_v
# and found that, at a fixed budget, spreading the rank over more kinds of matrices
# beat a high rank on one; later work (QLoRA, Dettmers et al. 2023) put adapters on
# *every* Linear layer and found that mattered most for matching full fine-tuning.
#
# Here we climb a ladder, each rung adding modules to the one before, all at r = 8:
#
#     Q  ->  Q,K  ->  Q,K,V  ->  Q,K,V,O  ->  all (attention + MLP)
#
# and measure trainable parameters and held-out loss. The ladder is
# `trainers.ablations.TARGET_LADDERS`; `run_ablation("targets", ...)` runs it.
#
# In code, choosing modules is one argument, `target_modules`, with PEFT's rules: a
# name matches a module whose dotted name equals it or ends in "." + name.

# %%
import math
from pathlib import Path

import torch

from lora import add_lora_to_model, count_parameters
from trainers.ablations import TARGET_LADDERS, AblationSettings, format_rows, run_ablation
from trainers.notebook import FAST, fast, have_stories, pyplot, save_figure
from trainers.planted import new_results_dir

torch.manual_seed(0)
print("fast mode" if FAST else "full mode")

# %% [markdown]
# ## The model: stories260K on Tiny Shakespeare
#
# As in tutorial 2: the pretrained 260K-parameter llama2.c model, fine-tuned to next-token
# prediction on Shakespeare. When the data folder lacks them, get them from the hub
# (`karpathy/tinyllamas`, files stories260K/stories260K.bin and tok512.bin; Tiny
# Shakespeare from karpathy/char-rnn) laid out as in shared/data/PROVENANCE.md. Without
# them the ablation falls back to the synthetic planted-rank MLP, whose ladder is
# fc1, fc2, fc1+fc2 (it has no attention).

# %%
HAVE_DATA = have_stories()
family = "llama" if HAVE_DATA else "planted"
if not HAVE_DATA:
    print("stories260K / Tiny Shakespeare not found: the ablation runs on the synthetic planted-rank MLP")
for label, modules in TARGET_LADDERS[family]:
    print(f"{label:10s} -> target_modules={list(modules)}")

# %% [markdown]
# ## What each rung costs, before training anything
#
# For a (out x in) layer LoRA adds r (in + out) parameters. In stories260K the query
# and output projections are 64 x 64, keys and values 32 x 64 (grouped-query
# attention: 4 key/value heads for 8 query heads), and the MLP layers 172 x 64 or
# 64 x 172: the MLP is where most of the weights are, so "all" costs the most.

# %%
if HAVE_DATA:
    from trainers.experiments import load_model
    for label, modules in TARGET_LADDERS[family]:
        model, _ = load_model("stories260K", "tiny_shakespeare")
        add_lora_to_model(model, r=8, lora_alpha=16, target_modules=list(modules))
        trainable, total = count_parameters(model)
        print(f"{label:10s} {trainable:7,} trainable of {total:,} ({100 * trainable / total:.2f} %)")

# %% [markdown]
# ## The ablation
#
# One fresh model per rung, the same data, steps, learning rate and seed; LoRA r = 8,
# alpha = 16. The trainer writes each run to a folder under `results/`.

# %%
settings = AblationSettings(steps=fast(200, 20), batch_size=fast(16, 8),
                            lr=fast(3e-3, 5e-3) if HAVE_DATA else 1e-2,   # the planted MLP takes a larger lr
                            max_length=fast(64, 32), limit=fast(200 * 16, 20 * 8),
                            eval_examples=fast(256, 48))
out = new_results_dir(Path("results"), prefix="tutorial03-targets")
rows = run_ablation("targets", settings, out=out)
print(format_rows("targets", rows))
print(f"(runs, CSV and plot in {out})")

# %%
metric = rows[0]["metric"]
held_out = lambda row: math.log(row["metric_value"]) if metric == "perplexity" else row["metric_value"]  # noqa: E731
ylabel = "held-out loss" if metric == "perplexity" else f"held-out {metric}"
previous = None
for row in rows:   # the gain of each rung over the one before, per 1,000 parameters it adds
    added = row["trainable_params"] - (previous["trainable_params"] if previous else 0)
    if previous is None or added <= 0:   # (the planted ladder's fc1 -> fc2 adds nothing: a swap)
        gain = ""
    else:
        per_1k = 1000 * (held_out(previous) - held_out(row)) / added
        gain = f"   gain per 1k added parameters {per_1k:+.4f}"
    print(f"{row['targets']:10s} {row['trainable_params']:7,} trainable   {ylabel} {held_out(row):.4f}{gain}")
    previous = row
best = min(rows, key=held_out)
print(f"best: {best['targets']} ({best['trainable_params']:,} trainable parameters)")

plt = pyplot()
fig, ax = plt.subplots(figsize=(7, 4))
labels = [row["targets"] for row in rows]
values = [held_out(row) for row in rows]
bars = ax.bar(labels, values, color=[f"C{i}" for i in range(len(rows))])
for bar, row in zip(bars, rows):
    ax.annotate(f"{row['trainable_params']:,}\ntrainable", (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                ha="center", va="bottom", fontsize=7)
low, high = min(values), max(values)
ax.set_ylim(low - 0.6 * (high - low + 1e-3), high + 0.6 * (high - low + 1e-3))
ax.set_ylabel(ylabel)
ax.set_xlabel("adapted modules (LoRA r = 8 on each)")
ax.set_title(f"target-module ablation ({settings.steps} steps)", fontsize=9)
ax.grid(axis="y", alpha=0.3)
save_figure(fig, "03_target_modules")

# %% [markdown]
# ## Reading the result
#
# Each rung adds parameters, so some gain is expected from size alone; the question is
# how much each kind of module buys per parameter. Things to look for in the numbers:
#
# - whether adding K on top of Q helps at all (the LoRA paper found W_q and W_k
#   weaker than W_q and W_v at the same budget);
# - how much of the gain of "all" comes from the MLP, which here holds most of the
#   adapted parameters (its gain per added parameter is printed above).
#
# On stories260K, in both the fast and the full run we made, the largest single step
# was adding V (checked below whenever the stories260K data is here): the query and key
# projections only decide where attention looks, the value projection changes what it
# brings back.

# %%
if HAVE_DATA:
    steps_down = {row["targets"]: held_out(prev) - held_out(row) for prev, row in zip(rows, rows[1:])}
    print("loss drop of each rung:", {k: round(v, 4) for k, v in steps_down.items()})
    assert max(steps_down, key=steps_down.get) == "Q,K,V", steps_down
#
# Short runs on a tiny model are noisy: differences of a few hundredths in loss can
# flip with the seed. Run the full mode, or `python -m trainers ablate targets
# --steps 1000 --seed 1` with a few seeds, before trusting an ordering.
#
# GPT-2 has one fused Linear for Q, K and V (`attn.c_attn`, 768 -> 2304), so its ladder
# starts at "Q,K,V": an adapter there adapts all three (we do not pretend to split it).
#
# Next: making the adapter itself cheaper by pruning it (tutorial 4).
