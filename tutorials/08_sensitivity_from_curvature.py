# %% [markdown]
# # 8. Sensitivity from curvature
#
# Uniform LoRA gives every adapted layer the same rank. But layers are not equally
# important: nudging some weights changes the loss a lot, others barely at all. A classic
# measure of "how much the loss cares about a layer" is the **curvature** of the loss in that
# layer's weights: the Hessian block H_W = ∂²L / ∂w² (w = the layer's weight, flattened), and
# its trace tr(H_W), the sum of the curvatures along every coordinate (Hessian-aware
# quantization and pruning use it, e.g. HAWQ, Dong et al. 2019, and PyHessian, Yao et al. 2020).
#
# A layer with n weights has an n x n Hessian block: far too big to form. **Hutchinson's
# estimator** (Hutchinson 1990) gets its trace from Hessian-*vector* products alone:
#
#     tr(H) = E[zᵀ H z]     for random z with E[z zᵀ] = I
#
# because E[zᵀ H z] = Σ_ij H_ij E[z_i z_j] = Σ_i H_ii. With Rademacher z (entries ±1 with
# probability ½) the diagonal is counted exactly (z_i² = 1) and only the off-diagonal terms
# make noise: Var[zᵀ H z] = 2 Σ_{i≠j} H_ij². And H z never needs H: differentiate the
# gradient once more along z (Pearlmutter 1994), H z = ∇_w (∇_w L · z).
#
# This tutorial checks the estimator against an exact Hessian on a tiny network, then uses
# it to choose LoRA ranks per layer on a real model (the SADRA configuration of the matrix).

# %%
import math

import torch
import torch.nn as nn

from allocation import choose_precision, hessian_traces, hutchinson_traces, module_shapes, sensitivity_ranks
from allocation.budget import adapter_params, base_bytes
from lora import add_lora_to_model, count_parameters
from trainers.notebook import FAST, fast, figure_dir, have_stories, pyplot, save_figure
from trainers.plot_ranks import plot_rank_heatmap
from trainers.train import TrainConfig, train

torch.manual_seed(0)
plt = pyplot()
print("fast mode" if FAST else "full mode")

# %% [markdown]
# ## A network small enough for the exact Hessian
#
# Two layers, 6 -> 8 -> 3, tanh in between, squared error on one fixed batch: 48 + 24 = 72
# weights, so the full Hessian is a 72 x 72 matrix that `torch.autograd.functional.hessian`
# computes exactly. Its two diagonal blocks are the layers' Hessians.

# %%
net = nn.Sequential(nn.Linear(6, 8, bias=False), nn.Tanh(), nn.Linear(8, 3, bias=False))
x, y = torch.randn(32, 6), torch.randn(32, 3)                       # one fixed batch
shapes = [net[0].weight.shape, net[2].weight.shape]                  # (8, 6), (3, 8)
sizes = [s.numel() for s in shapes]

def loss_of(flat):
    """The loss as a function of all 72 weights, for the exact Hessian."""
    w1, w2 = flat[: sizes[0]].view(shapes[0]), flat[sizes[0]:].view(shapes[1])
    return (torch.tanh(x @ w1.t()) @ w2.t() - y).pow(2).mean()

flat = torch.cat([net[0].weight.detach().reshape(-1), net[2].weight.detach().reshape(-1)])
H = torch.autograd.functional.hessian(loss_of, flat)                 # (72, 72)
blocks = {"fc1": slice(0, sizes[0]), "fc2": slice(sizes[0], sum(sizes))}
exact = {name: torch.diagonal(H[b, b]).sum().item() for name, b in blocks.items()}
print("exact traces of the diagonal Hessian blocks:", {k: round(v, 5) for k, v in exact.items()})
print(f"the Hessian is symmetric: {torch.allclose(H, H.t(), atol=1e-6)}")
assert torch.allclose(H, H.t(), atol=1e-6)

# %% [markdown]
# ## Hutchinson against the exact answer
#
# `hutchinson_traces(loss_fn, params)` draws one Rademacher probe per layer per sample and
# gets all the H z products from a single double backward. (Probing all layers jointly adds
# cross terms z_kᵀ H_kj z_j to layer k's sample; they average to zero because the probes are
# independent, but they add variance ||H_kj||²_F.) Setting `tol=0` with `min_samples =
# max_samples = n` makes it take exactly n samples; with the same seed, a run with more
# samples continues the same probe sequence, so the runs below trace the running estimate.
# The band is ± 2 standard errors: the exact value should lie inside it about 95 % of the time.

# %%
params = {"fc1": net[0].weight, "fc2": net[2].weight}
loss_fn = lambda i: (net(x) - y).pow(2).mean()                     # noqa: E731 - the same batch every sample
counts = [2 ** k for k in range(1, int(math.log2(fast(1024, 128))) + 1)]
runs = {n: hutchinson_traces(loss_fn, params, min_samples=n, max_samples=n, tol=0.0, seed=0) for n in counts}

# The variance the math predicts for each layer's samples (see the text above)
predicted_std = {}
for name, b in blocks.items():
    Hkk = H[b, b]
    off_diag = (Hkk.pow(2).sum() - torch.diagonal(Hkk).pow(2).sum()).item()
    cross = sum(H[b, other].pow(2).sum().item() for other_name, other in blocks.items() if other_name != name)
    predicted_std[name] = math.sqrt(2 * off_diag + cross)

print(f"{'n':>5}  " + "  ".join(f"{name + ' estimate ± s.e.':>24}" for name in params))
for n in counts:
    print(f"{n:>5}  " + "  ".join(f"{runs[n][k].trace:13.4f} ± {runs[n][k].stderr:7.4f}" for k in params))
print("exact  " + "  ".join(f"{exact[k]:13.4f}{'':10s}" for k in params))
last = runs[counts[-1]]
for name in params:
    sample_std = last[name].stderr * math.sqrt(last[name].n_samples)
    z = (last[name].trace - exact[name]) / last[name].stderr
    print(f"{name}: per-sample std measured {sample_std:.4f}, predicted {predicted_std[name]:.4f}; "
          f"estimate is {z:+.2f} standard errors from the exact trace")
    assert abs(z) < 3, (name, z)                                          # agrees within its error bars
    assert 0.75 < sample_std / predicted_std[name] < 1.33, (name, sample_std, predicted_std[name])
    first = runs[8][name].stderr * math.sqrt(8 / counts[-1])              # 1/sqrt(n) from n = 8 on
    assert 0.5 * first < last[name].stderr < 2 * first, (name, first, last[name].stderr)

fig, axes = plt.subplots(1, 2, figsize=(12, 4))
for ax, name in zip(axes, params):
    mean = torch.tensor([runs[n][name].trace for n in counts])
    se = torch.tensor([runs[n][name].stderr for n in counts])
    ax.fill_between(counts, mean - 2 * se, mean + 2 * se, alpha=0.25, label="± 2 standard errors")
    ax.plot(counts, mean, "o-", label="Hutchinson estimate")
    ax.axhline(exact[name], color="k", linestyle="--", label="exact trace")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("Rademacher samples n")
    ax.set_ylabel(f"tr(H) of {name}")
    ax.set_title(f"{name}: the error shrinks like 1/√n")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
save_figure(fig, "08_hutchinson_convergence")

# %% [markdown]
# ## On a real model
#
# Now the same estimate on stories260K (a pretrained 260K-parameter LLaMA, `karpathy/tinyllamas`
# on the hub) with a few batches of Tiny Shakespeare (`karpathy/tiny_shakespeare`) as
# calibration data: the text we are about to fine-tune on. Without the offline data folder it
# falls back to the planted-rank MLP of `trainers/planted.py`.
#
# `hessian_traces(model, batches, names)` probes the *base weights* of the named modules: it
# switches `requires_grad` on for them (and off for everything else) while it probes, cycles
# through the calibration batches, and stops when every layer's standard error is below
# `tol` (5 %) of its estimate or after `max_samples`. Hessian-vector products need a double
# backward through attention; PyTorch's fused attention kernels lack it, so `hessian_traces`
# selects the plain math kernel itself (`sdpa_kernel(SDPBackend.MATH)`). Its default loss calls
# the model the way the trainer does: `model(input_ids, targets=labels, attention_mask=...)`.

# %%
have_real = have_stories()
if have_real:
    from trainers.experiments import load_model, load_task_for, make_evaluator
    model, tokenizer = load_model("stories260K", "tiny_shakespeare", max_length=64)
    data = load_task_for("tiny_shakespeare", tokenizer, max_length=64, limit=fast(1000, 160))
    evaluate, metric = make_evaluator(data, max_examples=fast(256, 48)), "perplexity"
    batch_size, lr = 8, 5e-3
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

    def batches(epoch):
        return data.batches("train", batch_size, shuffle=True, seed=epoch, drop_last=True)

    def make_model():
        return load_model("stories260K", "tiny_shakespeare", max_length=64, tokenizer=tokenizer)[0]
else:
    from trainers.planted import PlantedConfig, PlantedTask, build_planted
    planted_cfg = PlantedConfig(dim=64)
    model, teacher, _ = build_planted(planted_cfg)
    task = PlantedTask(teacher, planted_cfg)
    evaluate, metric, batch_size, lr, targets = task.evaluate, "mse", 128, 1e-2, ["fc1", "fc2"]

    def batches(epoch):
        return task.batches("train", batch_size, seed=epoch)

    def make_model():
        return build_planted(planted_cfg)[0]

names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n.split(".")[-1] in targets]
calibration = [b for b, _ in zip(batches(1000), range(4))]            # 4 batches, never trained on

traces = hessian_traces(model, calibration, names, min_samples=8, max_samples=fast(64, 8))
print(f"{len(names)} modules, {traces[names[0]].n_samples} samples each")
print(f"{'module':40s} {'tr(H)':>12} {'± s.e.':>10}")
for name in names:
    t = traces[name]
    print(f"{name:40s} {t.trace:12.4f} {t.stderr:10.4f}")
clear = sum(abs(traces[n].trace) > 2 * traces[n].stderr for n in names)
print(f"{clear} of {len(names)} traces are more than 2 standard errors away from zero")
if have_real:                                  # the pretrained model on new text: not at a minimum
    assert any(traces[n].trace < -2 * traces[n].stderr for n in names), "expected a clearly negative trace"

# %% [markdown]
# Two things to notice. On stories260K some traces are **negative** (at least one by more than
# two standard errors): the pretrained model is not at a minimum
# of the loss on this new text, and there the cross-entropy's Hessian is indefinite; a strong
# negative curvature is as much a sign that a layer matters as a positive one, so the ranks
# use |tr(H)|. And the estimates are **noisy**: a network's Hessian has large off-diagonal
# entries, so a few samples give a rough ranking (fast mode takes 8 samples; the full run up to 64).
# Layers whose trace is within two standard errors of zero are ranked mostly by noise.

# %% [markdown]
# ## From traces to ranks
#
# `sensitivity_ranks(traces, shapes)` gives each layer a rank proportional to |tr(H)|, between
# r_min = 2 and r_max = 32, and spends the parameter budget of uniform r = 8, never more and
# at most a per cent less after rounding to integer ranks (a layer
# (out, in) pays r (in + out) parameters per rank, so a wide MLP layer's rank costs more than an
# attention projection's). The integer ranks come from "water-filling" (`budget.ranks_from_scores`):
# find λ so that clip(λ s_i, r_min, r_max) spends the budget, round down, then hand out single
# rank steps to the largest remaining deficits. The result plugs into `LoraConfig.rank_pattern`.

# %%
shapes = module_shapes(model, names)
ranks = sensitivity_ranks(traces, shapes, r_min=2, r_max=32, uniform_rank=8)
budget = sum(adapter_params(i, o, 8) for i, o in shapes.values())
spent = sum(adapter_params(*shapes[n], r) for n, r in ranks.items())
print(f"parameter budget of uniform r=8: {budget:,}; spent by the sensitivity ranks: {spent:,}")
assert 0.99 * budget <= spent <= budget
for name in names:
    print(f"{name:40s} |tr(H)| {abs(traces[name].trace):10.4f}  ->  rank {ranks[name]:2d}")

heatmap = plot_rank_heatmap([{"step": 0, "ranks": ranks}], figure_dir() / "08_sensitivity_ranks.png",
                            title="ranks from Hutchinson traces (uniform r=8 budget)")
print(f"figure: {heatmap}")

# %% [markdown]
# The same scores can decide precision too: `allocation.precision.choose_precision` keeps the
# most sensitive layers (per extra byte) in 8 bits and the rest in NF4 under a byte budget
# for the frozen base (the matrix's "mixed" quantization, Joint-2 and Joint-3). Here: half of
# what going from all-4-bit to all-8-bit would add.

# %%
low = sum(base_bytes(*shapes[n], 4) for n in names)
high = sum(base_bytes(*shapes[n], 8) for n in names)
bits = choose_precision({n: abs(traces[n].trace) for n in names}, shapes, int(low + 0.5 * (high - low)))
print(f"{sum(b == 8 for b in bits.values())} of {len(bits)} layers keep 8 bits:")
for name, b in bits.items():
    print(f"  {name:40s} {b} bits")

# %% [markdown]
# ## Does it help?
#
# A short fine-tuning run with uniform r = 8 against the sensitivity ranks, same budget, same
# data, same steps. Be careful with what a trace can and cannot know: it measures how sharply
# the loss reacts to a layer at the *starting* point, not how much that layer has to change
# for the new task (on the planted problem the two differ by construction; see the notes in
# `trainers/planted.py`). It is a cheap, one-shot prior, and the numbers say how good a prior
# it is here.

# %%
results = {}
for label, pattern in (("uniform r=8", {}), ("sensitivity ranks", ranks)):
    torch.manual_seed(0)
    m = add_lora_to_model(make_model(), r=8, lora_alpha=16, target_modules=targets, rank_pattern=pattern)
    cfg = TrainConfig(steps=fast(300, 30), batch_size=batch_size, lr=lr, warmup_steps=3, eval_every=0,
                      progress=False, device="cpu")
    out = train(m, batches, cfg, evaluate=evaluate)
    results[label] = out.metrics[metric]
    print(f"{label:18s} trainable {count_parameters(m)[0]:>7,}   held-out {metric} {results[label]:.4f}")

# %% [markdown]
# ## What to take away
#
# - tr(H) = E[zᵀ H z]: Hutchinson needs only Hessian-vector products, one double backward
#   per sample for all layers at once; Rademacher probes count the diagonal exactly.
# - On a tiny net it matches the exact trace within its error bars (under 3 standard errors),
#   and the error falls like 1/√n with the per-sample spread the formula predicts (within 25 %).
# - `sensitivity_ranks` turns traces into ranks at the uniform budget; the same scores can
#   choose 8 vs 4 bits per layer.
# - A trace is a one-shot prior measured before training. Tutorial 9 lets ranks move
#   *during* training instead.
