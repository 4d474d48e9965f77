# %% [markdown]
# # 2. How much rank does a task need?
#
# LoRA restricts the fine-tuning update ΔW of each layer to rank r. Whether that
# hurts depends on the update the task *wants*. Two ways to look at it:
#
# 1. **Measure it.** Fine-tune the whole model (every weight free), then take each
#    layer's ΔW = W_after - W_before and look at its singular values
#    σ_1 >= σ_2 >= ... . The best rank-k approximation of ΔW (Eckart-Young) keeps
#    the top k of them, and its share of the update's squared size is
#
#        energy(k) = (σ_1² + ... + σ_k²) / (σ_1² + ... + σ_n²).
#
#    If energy(8) is close to 1, a rank-8 LoRA could have made almost the same change.
#    A yardstick: a random Gaussian matrix of the same shape has no preferred
#    directions, so its energy curve rises slowly; a "low-rank" update rises fast.
#
# 2. **Ask the task.** Train LoRA at r = 1, 2, 4, 8, 16 and compare held-out loss
#    (the rank ablation in `trainers.ablations`), with full fine-tuning as reference.
#
# The model is `stories260K`, a real pretrained 260K-parameter LLaMA-architecture
# model from Karpathy's llama2.c (trained on children's stories), and the task is
# next-token prediction on Tiny Shakespeare: a real change of domain.

# %%
import math
from pathlib import Path

import torch
import torch.nn as nn

from trainers.ablations import AblationSettings, format_rows, run_ablation
from trainers.notebook import FAST, fast, pyplot, save_figure, stories_or_planted
from trainers.planted import new_results_dir
from trainers.train import TrainConfig, train

torch.manual_seed(0)
print("fast mode" if FAST else "full mode")

# %% [markdown]
# ## The model and the data
#
# Both are found the way the trainers find them (`trainers.paths.data_dir`: the
# NANOPEFT_DATA variable, or `../shared/data` next to the checkout). When they are
# missing, get them online: the checkpoint and tokenizer are `stories260K.bin` and
# `tok512.bin` of the hub repository `karpathy/tinyllamas` (folder `stories260K`), and
# Tiny Shakespeare is `input.txt` of karpathy/char-rnn (data/tinyshakespeare); lay them
# out as in shared/data/PROVENANCE.md. Without them this tutorial still runs, on a
# synthetic stand-in: the planted-rank MLP of `trainers.planted`, whose "task" is to
# learn weight updates of known ranks (0, 1, 2, 4, 8, 16 per layer), so the spectrum
# can be compared with the ranks that were planted.

# %%
block = fast(64, 32)                       # tokens per training sequence
steps = fast(300, 25)
bench = stories_or_planted(steps, block, lr=1e-3)
model, batches, evaluate, batch_size, lr, what = (bench.model, bench.batches, bench.evaluate, bench.batch_size,
                                                  bench.lr, bench.what)
HAVE_DATA, planted_ranks = bench.planted_ranks is None, bench.planted_ranks
print(f"{sum(p.numel() for p in model.parameters()):,} parameters")

# %% [markdown]
# ## Full fine-tuning, and the update it makes
#
# Every weight trains (AdamW through the project's trainer, `trainers.train.train`).
# We keep a copy of each Linear weight first, so afterwards ΔW is a subtraction.
# (The token embedding changes too; we look at the Linear layers, where LoRA goes.)

# %%
linears = [(name, m) for name, m in model.named_modules()
           if isinstance(m, nn.Linear) and name.rsplit(".", 1)[-1] != "lm_head"]
before = {name: m.weight.detach().clone() for name, m in linears}
model.requires_grad_(True)
print("before:", {k: round(v, 4) for k, v in evaluate(model).items()})
result = train(model, batches, TrainConfig(steps=steps, batch_size=batch_size, lr=lr,
                                           warmup_steps=max(1, steps // 10), eval_every=0, progress=False),
               evaluate=evaluate)
print(f"full fine-tuning, {steps} steps: training loss {result.loss_log[0]['loss']:.3f} -> {result.final_loss:.3f}; "
      f"held-out {({k: round(v, 4) for k, v in result.eval_log[-1].items() if k != 'step'})}")

# %% [markdown]
# ## The singular values of ΔW
#
# For each layer: the relative size of the update ||ΔW|| / ||W0||, the energy its
# top 1, 4 and 8 directions carry, and k90, the number of directions needed for 90 %
# of it, next to k90 of a random Gaussian matrix of the same shape.

# %%
gen = torch.Generator().manual_seed(0)
spectra, random_spectra, k90s = {}, {}, {}
print(f"{'layer':36s} {'shape':>10s} {'|dW|/|W0|':>9s} {'top1':>5s} {'top4':>5s} {'top8':>5s} {'k90':>4s} "
      f"{'random k90':>10s}")
for name, m in linears:
    delta = m.weight.detach().float() - before[name].float()                       # (out, in)
    S = torch.linalg.svdvals(delta)
    energy = (S ** 2).cumsum(0) / (S ** 2).sum()
    S_rand = torch.linalg.svdvals(torch.randn(delta.shape, generator=gen))
    energy_rand = (S_rand ** 2).cumsum(0) / (S_rand ** 2).sum()
    spectra[name], random_spectra[name] = (S, energy), (S_rand, energy_rand)
    k90 = int((energy < 0.9).sum()) + 1
    k90_rand = int((energy_rand < 0.9).sum()) + 1
    k90s[name] = (k90, k90_rand)
    top = [energy[min(k, len(energy)) - 1].item() for k in (1, 4, 8)]
    print(f"{name:36s} {str(tuple(delta.shape)):>10s} {(delta.norm() / before[name].norm()).item():9.3f} "
          f"{top[0]:5.2f} {top[1]:5.2f} {top[2]:5.2f} {k90:4d} {k90_rand:10d}")

if not HAVE_DATA:
    print("planted ranks:", planted_ranks)

# %% [markdown]
# Read the table against the random column. On stories260K every update is at least a
# little more concentrated than noise (k90 at or below the random matrix's in every layer).
# The query and key updates clearly are: their k90, averaged over the layers, is under three
# quarters of the random matrix's (the keys' about half or a little more), and their top 8
# directions carry 55-90 % of the energy. The MLP updates are much closer to the random
# curve. How concentrated v is varies with the run: its row in the table (the checks after
# the next figure hold the other sentences to the numbers). And none of them is
# rank 4: a model of width 64, trained with Adam (whose normalised steps add small moves in
# every direction), spreads its update over a good part of its few dimensions. The LoRA paper's
# very low ranks are measured on layers of width 4,096 to 12,288, where r = 8 is a far
# smaller fraction of the whole. (On the planted stand-in, compare each layer's k90
# with the rank that was planted in it, printed above: the update concentrates on the
# planted directions over a long run, over a floor that Adam's noisy steps add.)
#
# Averaging the curves over the layers of each kind (q_proj, ..., down_proj):

# %%
kinds = sorted({name.rsplit(".", 1)[-1] for name in spectra})
plt = pyplot()
fig, (ax0, ax1) = plt.subplots(1, 2, figsize=(11, 4))
for i, kind in enumerate(kinds):
    names = [n for n in spectra if n.rsplit(".", 1)[-1] == kind]
    n_min = min(len(spectra[n][0]) for n in names)
    sv = torch.stack([spectra[n][0][:n_min] / spectra[n][0][0] for n in names]).mean(0)
    en = torch.stack([spectra[n][1][:n_min] for n in names]).mean(0)
    ks = range(1, n_min + 1)
    ax0.plot(ks, sv, color=f"C{i}", label=kind)
    ax1.plot(ks, en, color=f"C{i}", label=kind)
    print(f"{kind:10s} mean energy captured by top-k:  "
          + "  ".join(f"k={k}: {en[k - 1].item():.2f}" for k in (1, 2, 4, 8, 16) if k <= n_min))
S_rand = random_spectra[linears[0][0]]
shape = "x".join(map(str, before[linears[0][0]].shape))
ax0.plot(range(1, len(S_rand[0]) + 1), S_rand[0] / S_rand[0][0], "k--", label=f"random {shape} matrix")
ax1.plot(range(1, len(S_rand[1]) + 1), S_rand[1], "k--", label=f"random {shape} matrix")
ax0.set_xlabel("index i")
ax0.set_ylabel("σ_i / σ_1")
ax0.set_title(f"singular values of ΔW ({what})", fontsize=9)
ax1.set_xlabel("k")
ax1.set_ylabel("energy captured by the top k directions")
ax1.axhline(0.9, color="grey", linewidth=0.8)
ax1.set_title("energy(k) = Σ_{i≤k} σ_i² / Σ σ_i²", fontsize=9)
for ax in (ax0, ax1):
    ax.set_xscale("log", base=2)
    ax.xaxis.set_major_formatter(plt.FuncFormatter(lambda v, _: f"{v:g}"))   # 1, 2, 4, ... not 2^k
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
save_figure(fig, "02_update_spectrum")

if HAVE_DATA:
    def mean_of(kind, values):
        picked = [values(n) for n in k90s if n.endswith(kind)]
        return sum(picked) / len(picked)
    ratio = {kind: mean_of(kind, lambda n: k90s[n][0] / k90s[n][1]) for kind in kinds}
    top8 = {kind: mean_of(kind, lambda n: spectra[n][1][7].item()) for kind in kinds}
    print("mean k90 / random k90 per kind:", {k: round(v, 2) for k, v in ratio.items()})
    assert all(k90 <= k90_rand for k90, k90_rand in k90s.values())             # never noisier than noise
    assert ratio["q_proj"] < 0.75 and ratio["k_proj"] < 0.65, ratio           # q, k: clearly concentrated
    assert all(0.55 < top8[k] < 0.9 for k in ("q_proj", "k_proj")), top8
    mlp = min(ratio[k] for k in ("gate_proj", "up_proj", "down_proj"))
    assert mlp > max(ratio["q_proj"], ratio["k_proj"]), ratio                   # MLP: nearer the random curve

# %% [markdown]
# ## The rank ablation
#
# Now ask the task directly. `trainers.ablations.run_ablation("rank", ...)` trains a
# fresh copy of the model once per rank, LoRA on the query and value projections
# (PEFT's default for LLaMA) with alpha = 2r, so the scaling alpha / r is the same at
# every rank and only the rank changes, plus one full fine-tuning run as reference,
# and writes each run's folder, a CSV and a plot under `results/`. Its defaults pick
# stories260K on Tiny Shakespeare when the data is there, else the planted task.
# The metric is held-out perplexity (exp of the held-out loss) for the language model,
# mean squared error for the planted task.

# %%
settings = AblationSettings(steps=fast(200, 20), batch_size=batch_size, lr=fast(3e-3, 5e-3),
                            max_length=block, limit=fast(200, 20) * batch_size,
                            eval_examples=fast(256, 48), ranks=fast((1, 2, 4, 8, 16), (1, 8)))
out = new_results_dir(Path("results"), prefix="tutorial02-rank")
rows = run_ablation("rank", settings, out=out)
print(format_rows("rank", rows))
print(f"(runs, CSV and plot in {out})")

# %%
metric = rows[0]["metric"]
held_out = lambda row: math.log(row["metric_value"]) if metric == "perplexity" else row["metric_value"]  # noqa: E731
low_rank = [row for row in rows if row["r"] != "full"]
full = [row for row in rows if row["r"] == "full"][0]
for row in low_rank:
    print(f"r = {row['r']:2d}: {row['trainable_params']:7,} trainable ({row['trainable_pct']:.2f} %), "
          f"held-out {'loss' if metric == 'perplexity' else metric} {held_out(row):.4f}")
print(f"full FT: {full['trainable_params']:7,} trainable (100 %),    held-out {held_out(full):.4f}")
assert held_out(low_rank[-1]) < held_out(low_rank[0])       # more rank helped (the takeaways below)

fig, ax = plt.subplots(figsize=(6.5, 4))
ax.plot([row["r"] for row in low_rank], [held_out(row) for row in low_rank], "o-",
        label="LoRA (q_proj, v_proj); labels: trainable parameters")
ax.axhline(held_out(full), color="k", linestyle="--", label="full fine-tuning")
ax.set_xscale("log", base=2)
ax.set_xticks([row["r"] for row in low_rank], [str(row["r"]) for row in low_rank])
ax.minorticks_off()
ax.set_xlabel("rank r")
ax.set_ylabel("held-out loss" if metric == "perplexity" else f"held-out {metric}")
ax.set_title(f"rank ablation ({what}, {settings.steps} steps)", fontsize=9)
for row in low_rank:
    ax.annotate(f"{row['trainable_params']:,}", (row["r"], held_out(row)), fontsize=7,
                textcoords="offset points", xytext=(4, 4))
ax.grid(alpha=0.3)
ax.legend(fontsize=8)
save_figure(fig, "02_rank_ablation")

# %% [markdown]
# ## What to take away
#
# - The spectrum of a real update tells you how much rank the change *used*; compare
#   it with a random matrix of the same shape before calling it low rank.
# - The ablation tells you how much rank the task *needs* for a given budget of steps:
#   held-out loss improves with the rank here (checked above: the largest rank beats r = 1),
#   usually quickly over the first few ranks, then flattens,
#   and the gap to full fine-tuning is what the rank restriction costs (on a short
#   run, full fine-tuning can even be worse: more parameters to move with the same lr).
# - In fast mode the numbers come from a very short run; the full mode (no
#   NANOPEFT_FAST) trains longer on more data, and `python -m trainers ablate rank`
#   runs the same ablation from the command line with all its options.
#
# Different layers can need different ranks: tutorial 3 varies *which* layers get an
# adapter, tutorials 8 and 9 let the data decide each layer's rank.
