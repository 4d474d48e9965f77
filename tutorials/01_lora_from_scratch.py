# %% [markdown]
# # 1. LoRA from scratch
#
# Fine-tuning changes a pretrained weight matrix W0 (out x in) into W0 + ΔW. Full
# fine-tuning learns every entry of ΔW: out * in numbers per layer, plus two Adam
# moments each. LoRA (Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language
# Models", arXiv:2106.09685) bets that the update a task needs is *low rank*, and
# learns it directly in factored form:
#
#     y = W0 x + s · B A x,      A: (r, in),  B: (out, r),  s = alpha / r
#
# W0 stays frozen. Only A and B train: r · (in + out) numbers instead of in · out.
# For a 4096 x 4096 projection and r = 8 that is 65,536 instead of 16.8 million (0.4 %).
#
# Why should that work? A pretrained model already solves most of the problem; the
# fine-tuning update only has to steer it, and (the paper measures this) the steering
# has most of its energy in a few directions. Tutorial 2 measures it on a real model.
#
# This tutorial walks through `lora.LoRALinear` piece by piece: its shapes, the
# scaling alpha / r, the initialisation that leaves the model unchanged, merging the
# update into W0 (and back), and counting parameters on a whole model.
#
# Run it top to bottom with `python tutorials/01_lora_from_scratch.py`, or open it as a
# notebook (jupytext / VS Code cells). `NANOPEFT_FAST=1` makes every experiment smaller.

# %%
import torch
import torch.nn as nn

from lora import LoRALinear, adapter_layers, add_lora_to_model, count_parameters, merge_lora_weights
from trainers.models import LlamaConfig, build_model
from trainers.notebook import FAST, fast, pyplot, save_figure

torch.manual_seed(0)
print("fast mode" if FAST else "full mode")

# %% [markdown]
# ## The layer
#
# `LoRALinear` wraps an existing `nn.Linear` (it could also be an 8- or 4-bit
# quantized layer: tutorial 7). The wrapped layer is kept as `base_layer` and frozen;
# the adapter adds two parameters, `lora_A` (r, in) and `lora_B` (out, r), the names
# and shapes Hugging Face PEFT uses, so adapters saved here load there.

# %%
d_in, d_out, r = 64, 48, 4
base = nn.Linear(d_in, d_out)
layer = LoRALinear(base, rank=r, alpha=8)
print(layer)
for name, p in layer.named_parameters():
    print(f"  {name:18s} shape {tuple(p.shape)!s:10s} trainable={p.requires_grad}")
print("scaling s = alpha / r =", layer.scaling)

# %% [markdown]
# ## Initialisation: B = 0, so the model starts exactly where it was
#
# A starts random (kaiming-uniform, like an `nn.Linear`), B starts at zero. Then
# B A = 0 and the adapted layer computes *exactly* what the pretrained layer did:
# fine-tuning begins at the pretrained model, not at a perturbed copy of it. (Both
# zero would not work: the gradient of B is s · g (A x)^T, and of A is s · B^T g x^T,
# so with both at zero neither would ever move. One zero factor is enough to start at
# ΔW = 0 and still get a gradient for B.)

# %%
x = torch.randn(16, d_in)                                   # (N, in)
with torch.no_grad():
    difference = (layer(x) - base(x)).abs().max().item()
print(f"max |adapted(x) - base(x)| at init = {difference}")
assert difference == 0.0                                    # exactly the pretrained layer
print(f"|B| = {layer.lora_B.abs().sum().item()},  |A| = {layer.lora_A.abs().sum().item():.2f}")

# %% [markdown]
# ## The scaling s = alpha / r
#
# With A's rows of fixed size, the product B A x sums r terms; a larger r would
# mean a larger update for the same learning rate. Dividing by r keeps the size of
# the update roughly independent of r, so when you change r you do not have to retune
# the learning rate; `alpha` is the one knob for "how strong". (rsLoRA, Kalajdzievski
# 2023, argues alpha / sqrt(r) is the right normalisation for large r: `use_rslora=True`.)

# %%
for rank in (1, 4, 16, 64):
    print(f"r = {rank:3d}: alpha/r = {LoRALinear(base, rank=rank, alpha=16).scaling:7.4f}   "
          f"rsLoRA alpha/sqrt(r) = {LoRALinear(base, rank=rank, alpha=16, use_rslora=True).scaling:7.4f}")

# %% [markdown]
# ## A small experiment: learn a rank-4 change
#
# Make a "fine-tuned" teacher W* = W0 + ΔW* with ΔW* of rank 4, and let the adapter
# learn it from examples (x, W* x). LoRA with r = 4 can represent ΔW* exactly, r = 1
# cannot: its best possible error is what the other three directions carry.
# The loop is the plainest one possible: Adam on the adapter's parameters only.

# %%
torch.manual_seed(0)
delta_true = torch.randn(d_out, 4) @ torch.randn(4, d_in) / d_in   # (out, in), rank 4, singular values ~1
teacher = nn.Linear(d_in, d_out)
with torch.no_grad():
    teacher.weight.copy_(base.weight + delta_true)
    teacher.bias.copy_(base.bias)

steps = fast(600, 150)
curves = {}
for rank in (1, 4):
    torch.manual_seed(1)
    student = LoRALinear(nn.Linear(d_in, d_out), rank=rank, alpha=2 * rank)
    with torch.no_grad():   # the same pretrained W0 as the teacher's starting point
        student.base_layer.weight.copy_(base.weight)
        student.base_layer.bias.copy_(base.bias)
    opt = torch.optim.Adam(student.adapter_parameters(), lr=1e-2)
    curves[rank] = []
    for step in range(steps):
        xb = torch.randn(64, d_in)
        loss = (student(xb) - teacher(xb).detach()).pow(2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        curves[rank].append(loss.item())
    print(f"r = {rank}: loss {curves[rank][0]:.4f} -> {curves[rank][-1]:.2e}   "
          f"trainable = {sum(p.numel() for p in student.adapter_parameters())} numbers "
          f"(full ΔW would be {d_in * d_out})")

# What r = 1 could at best do: keep the top singular direction of ΔW*.
S = torch.linalg.svdvals(delta_true)
print("singular values of the true ΔW*:", [round(v, 3) for v in S[:6].tolist()])
print(f"share of ||ΔW*||² that rank 1 can capture: {(S[0] ** 2 / (S ** 2).sum()).item():.1%}")
# With x ~ N(0, I), the mean squared error of a weight error E is ||E||_F² / out, so the
# best r = 1 can reach is what the directions it cannot hold carry: (σ_2² + σ_3² + ...) / out.
best_r1 = ((S[1:] ** 2).sum() / d_out).item()
print(f"best possible loss for r = 1: {best_r1:.4f}  (reached: {curves[1][-1]:.4f})")
# r = 4 holds the whole update, r = 1 cannot get below its bound. (The last loss is one batch of
# 64 samples, an estimate of the mean squared error with ~10 % noise, hence the 0.8.)
assert curves[1][-1] > 0.8 * best_r1
assert curves[4][-1] < 0.1 * curves[1][-1], (curves[1][-1], curves[4][-1])

# %% [markdown]
# ## Merge and unmerge
#
# After training, W0 + s B A is just another weight matrix. `merge()` adds the update
# into the base weight in place, and forward then runs the base alone: no extra cost at
# inference. `unmerge()` puts the saved original W0 back (bit for bit), e.g. to keep
# training or to switch to another adapter. Merging is always an explicit call; nothing
# merges as a side effect of `.eval()`.
#
# Merged and unmerged must compute the same function. They are not bit-identical,
# because (W0 + s B A) x and W0 x + s B (A x) round differently in float32, but the
# difference should be at the level of float32 rounding (~1e-7 relative).

# %%
x = torch.randn(32, d_in)
with torch.no_grad():
    y_unmerged = student(x)
    student.merge()
    print("merged:", student.merged)
    y_merged = student(x)
    diff = (y_merged - y_unmerged).abs().max().item()
    print(f"max |merged - unmerged| = {diff:.3e}   (outputs are of size ~{y_unmerged.abs().mean().item():.2f})")
    assert diff < 1e-5 * y_unmerged.abs().max().item()     # float32 rounding, nothing more
    student.unmerge()
    print("unmerged; W0 restored exactly:", torch.equal(student.base_layer.weight, base.weight))
    assert torch.equal(student.base_layer.weight, base.weight)

# %% [markdown]
# ## A whole model, and counting parameters
#
# On a model, `add_lora_to_model` finds the layers named in `target_modules` (PEFT's
# matching rules: an exact name or a dotted suffix), wraps each in a `LoRALinear`,
# and freezes everything else. `count_parameters(model)` returns (trainable, total).
# Here: a tiny LLaMA-architecture model from `trainers.models`, adapting the query and
# value projections of every block (the LoRA paper's choice).

# %%
torch.manual_seed(0)
model = build_model("llama", LlamaConfig.tiny())
total_before = count_parameters(model)[1]
add_lora_to_model(model, r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"])
trainable, total = count_parameters(model)
print(f"base model: {total_before:,} parameters")
print(f"with LoRA r=8 on q_proj, v_proj: {trainable:,} trainable of {total:,} ({100 * trainable / total:.2f} %)")
print(model.model.layers[0].self_attn.q_proj)

tokens = torch.randint(0, 97, (2, 16))
with torch.no_grad():
    for _, adapter in adapter_layers(model):   # give B a value, as training would, so the check is not trivial
        adapter.lora_B.normal_(std=0.02)
    logits_adapter, _ = model(tokens)
    merged_model = merge_lora_weights(model)   # each adapter -> a plain nn.Linear holding W0 + s B A
    logits_merged, _ = merged_model(tokens)
# (Exactly 0 is possible here: for inputs with many rows LoRALinear already computes with the
# summed weight W0 + s B A in one matmul, which is what the merged Linear does.)
print(f"merge_lora_weights: max |logits difference| = {(logits_merged - logits_adapter).abs().max().item():.3e}")
assert torch.allclose(logits_merged, logits_adapter, atol=1e-5)
print("after merging, q_proj is", type(merged_model.model.layers[0].self_attn.q_proj).__name__)

# %% [markdown]
# ## How the count grows with r
#
# One (d x d) matrix: full fine-tuning trains d² numbers; LoRA trains r (d + d), a
# straight line in r that meets d² only at r = d / 2. The figure shows three sizes
# (GPT-2 small's 768, LLaMA-7B's 4096, and this tutorial's 64) on log axes. Note that
# trainable parameters are not the whole memory story: activations and the frozen
# base still cost memory (tutorial 7 measures it).

# %%
ranks = [1, 2, 4, 8, 16, 32, 64, 128, 256]
for d in (768, 4096):
    print(f"d = {d}: full = {d * d:,};  " + ",  ".join(f"r={k}: {k * 2 * d:,}" for k in (1, 8, 64)))
assert 8 * (4096 + 4096) == 65_536 and round(100 * 65_536 / 4096 ** 2, 1) == 0.4   # the introduction's numbers

plt = pyplot()
fig, (ax0, ax1) = plt.subplots(1, 2, figsize=(11, 4))
for d, color in ((64, "tab:green"), (768, "tab:blue"), (4096, "tab:red")):
    ax0.plot(ranks, [k * 2 * d for k in ranks], "o-", color=color, label=f"LoRA, d = {d}")
    ax0.axhline(d * d, color=color, linestyle="--", label=f"full matrix, d = {d}")
ax0.set_xscale("log", base=2)
ax0.set_yscale("log")
ax0.set_xlabel("rank r")
ax0.set_ylabel("trainable parameters of one (d x d) layer")
ax0.set_title("LoRA trains r (d_in + d_out) numbers")
ax0.legend(fontsize=7, ncol=2)
ax0.grid(alpha=0.3)
for rank, values in curves.items():
    ax1.plot(values, label=f"LoRA r = {rank}")
ax1.set_yscale("log")
ax1.set_xlabel("step")
ax1.set_ylabel("mean squared error")
ax1.set_title("learning a rank-4 update")
ax1.legend()
ax1.grid(alpha=0.3)
save_figure(fig, "01_lora_parameters")

# %% [markdown]
# ## What to take away
#
# - A LoRA layer is y = W0 x + (alpha / r) B A x with W0 frozen; A (r, in), B (out, r).
# - B starts at zero, so training starts from the pretrained model exactly.
# - alpha / r keeps the update's size comparable across ranks.
# - Merged and unmerged compute the same function (up to float rounding); merging
#   makes inference free, unmerging restores W0 bit for bit.
# - The trainable count is r (in + out) per layer: tiny next to in · out.
#
# Next: how much rank does a real fine-tuning update need? (tutorial 2)
