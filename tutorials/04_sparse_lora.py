# %% [markdown]
# # 4. Sparse LoRA: pruning the adapter, and what actually gets cheaper
#
# A LoRA adapter is already small, but we can make it smaller by pruning the factors
# A (r, in) and B (out, r). `lora.SparseLoRALinear` keeps a boolean mask next to each
# factor and computes
#
#     y = W0 x + s (B ⊙ M_B)(A ⊙ M_A) x
#
# Three ways to choose what to remove, compared here:
#
# 1. **L1 penalty**: add λ Σ |A| + |B| to the loss. It pushes unimportant entries
#    towards zero during training, so cutting them afterwards costs little.
# 2. **Unstructured magnitude pruning**: zero the smallest |entries|, gradually, on the
#    cubic schedule of Zhu & Gupta 2017 ("To prune, or not to prune", arXiv:1710.01878):
#        s_t = s_f + (s_i - s_f) (1 - (t - t0) / (t1 - t0))³,
#    which prunes fast early (when the network can recover) and gently at the end.
# 3. **Structured (rank) pruning**: remove whole rank-one components s B[:, i] A[i, :],
#    the ones of smallest norm ||B[:, i]|| ||A[i, :]||. The factors really shrink: the
#    result is an ordinary LoRA of lower rank.
#
# Then the question a student should always ask of "sparsity": **what got cheaper?**

# %%
import copy
import statistics
import time

import torch
import torch.nn as nn

from lora import SparseLoRALinear, adapter_layers, add_lora_to_model, count_parameters, cubic_sparsity
from allocation import SparsityAllocator
from trainers.notebook import FAST, fast, pyplot, save_figure, stories_or_planted
from trainers.train import TrainConfig, train

torch.manual_seed(0)
print("fast mode" if FAST else "full mode")

# %% [markdown]
# ## The cubic schedule
#
# Pruning starts after 10 % of the steps and reaches its target at 70 %, as
# `allocation.SparsityAllocator` (the trainer's Sparse LoRA schedule) does.

# %%
steps = fast(300, 25)
start, end = steps // 10, (7 * steps) // 10
for t in range(0, steps + 1, max(1, steps // 10)):
    print(f"step {t:4d}: target sparsity {cubic_sparsity(t, start, end, 0.75):.3f}")

# %% [markdown]
# ## Model and data
#
# stories260K (the pretrained llama2.c model) on Tiny Shakespeare, as in tutorials 2
# and 3; when they are missing (get them from the hub: `karpathy/tinyllamas`, see
# shared/data/PROVENANCE.md) the synthetic planted-rank MLP of `trainers.planted`
# stands in. Sparse LoRA with r = 16 on the query and value projections.

# %%
block, rank = fast(64, 32), 16
bench = stories_or_planted(steps, block, lr=3e-3)
base_model, batches, evaluate, batch_size, lr, targets, key = (
    bench.model, bench.batches, bench.evaluate, bench.batch_size, bench.lr, bench.targets, bench.key)
train_cfg = TrainConfig(steps=steps, batch_size=batch_size, lr=lr, warmup_steps=max(1, steps // 20),
                        eval_every=0, progress=False)
fresh = lambda: add_lora_to_model(copy.deepcopy(base_model), method="sparse", r=rank,  # noqa: E731
                                  lora_alpha=2 * rank, target_modules=targets)
print("trainable, total =", count_parameters(fresh()))

# %% [markdown]
# ## Training runs
#
# - **dense**: plain training (the masks stay all-ones); afterwards we prune it in one
#   shot, by magnitude (unstructured) and by rank components (structured);
# - **L1**: the same with λ Σ|A| + |B| in the loss, then one-shot magnitude pruning;
# - **gradual magnitude**: one run per target sparsity, pruned during training on the
#   cubic schedule (`SparsityAllocator(model, steps, final_sparsity, l1=0)`), so the
#   remaining entries can adapt to what was removed.
#
# Sparsity is the fraction of the adapter's entries (A and B together) that are zero;
# for rank pruning, keeping k of r components zeroes a fraction 1 - k / r.

# %%
sparsities = fast([0.25, 0.5, 0.75, 0.9], [0.5, 0.9])
l1 = 1e-3
trained = {}
for name, allocator_args in (("dense", None), ("L1", (0.0, l1))):
    model = fresh()
    allocator = SparsityAllocator(model, steps, *allocator_args) if allocator_args else None
    result = train(model, batches, train_cfg, evaluate=evaluate, allocator=allocator)
    trained[name] = model
    print(f"{name:6s}: final training loss {result.final_loss:.4f}, held-out {key} {result.metrics[key]:.4f}")

results = {"one-shot magnitude (dense)": [], "one-shot magnitude after L1": [],
           "gradual magnitude (cubic)": [], "structured (rank components)": []}
for s in sparsities:
    for label, source in (("one-shot magnitude (dense)", "dense"), ("one-shot magnitude after L1", "L1")):
        model = copy.deepcopy(trained[source])
        for _, layer in adapter_layers(model):
            layer.prune_to(s)
        results[label].append((s, evaluate(model)[key]))
    model = fresh()
    result = train(model, batches, train_cfg, evaluate=evaluate,
                   allocator=SparsityAllocator(model, steps, s, 0.0))
    density = statistics.mean(layer.nonzeros()["density"] for _, layer in adapter_layers(model))
    results["gradual magnitude (cubic)"].append((1 - density, result.metrics[key]))
    keep = max(1, round(rank * (1 - s)))
    model = copy.deepcopy(trained["dense"])
    for _, layer in adapter_layers(model):
        layer.prune_ranks(keep)
    results["structured (rank components)"].append((1 - keep / rank, evaluate(model)[key]))

dense_value = evaluate(trained["dense"])[key]
print(f"\nheld-out {key} (dense adapter, no pruning: {dense_value:.4f})")
print(f"{'method':32s} " + " ".join(f"{'s=' + str(s):>9s}" for s in sparsities))
for label, points in results.items():
    print(f"{label:32s} " + " ".join(f"{v:9.4f}" for _, v in points))

# The takeaways below, checked at the highest sparsity (where the choice matters most): pruning
# gradually beats one cut of the dense adapter, and so does an L1 penalty before the cut.
final = {label: points[-1][1] for label, points in results.items()}
assert final["gradual magnitude (cubic)"] < final["one-shot magnitude (dense)"], final
assert final["one-shot magnitude after L1"] < final["one-shot magnitude (dense)"], final

# %%
plt = pyplot()
fig, ax = plt.subplots(figsize=(7, 4.2))
for i, (label, points) in enumerate(results.items()):
    ax.plot([p[0] for p in points], [p[1] for p in points], "o-", color=f"C{i}", label=label)
ax.axhline(dense_value, color="k", linestyle="--", linewidth=1, label="dense adapter")
ax.set_xlabel("sparsity of the adapter (fraction of A, B entries removed)")
ax.set_ylabel(f"held-out {key}")
ax.set_title(f"Sparse LoRA r={rank}: loss vs sparsity ({steps} steps)", fontsize=9)
ax.grid(alpha=0.3)
ax.legend(fontsize=8)
save_figure(fig, "04_loss_vs_sparsity")

# %% [markdown]
# ## What actually gets cheaper?
#
# Count what each kind of pruning changes for one adapter of rank r on a (out x in)
# layer, at sparsity s:
#
# | | unstructured (masked entries) | structured (rank k = (1-s) r) |
# |---|---|---|
# | nonzero parameters | (1 - s) r (in + out) | k (in + out) |
# | storage | values + indices or a bitmask: with a 1-bit mask, 4 (1-s) n + n/8 bytes; with a 32-bit column index per value (CSR), no saving until s > 1/2 | 4 k (in + out) bytes, nothing else |
# | forward FLOPs with dense kernels | unchanged: zeros are multiplied like any number (plus the cost of applying the mask) | k (in + out) per token instead of r (in + out) |
# | optimizer state (Adam) | unchanged: masked entries still have moments | shrinks with k |
#
# Unstructured zeros only save compute with sparse kernels, and at the sizes of a LoRA
# factor (a few thousand entries) sparse kernels are usually *slower* than dense ones.
# Structured pruning is just a smaller LoRA: every cost shrinks with no special kernel.
# And after `merge()`, none of it matters at inference: the adapter is folded into W0.
#
# An illustration (timings depend on the machine and its load; no conclusions from a
# single run): the forward time of one layer with a dense adapter, the same adapter
# with 75 % of its entries masked, and the adapter pruned to a quarter of its rank.
# The base layer's own matmul is in all three; to make the adapter's share visible, the
# layer is wide and its rank large.

# %%
torch.manual_seed(0)
width, big_rank = fast(1024, 512), 128
dense_layer = SparseLoRALinear(nn.Linear(width, width), rank=big_rank, alpha=big_rank)
with torch.no_grad():
    dense_layer.lora_B.normal_(std=0.01)          # a trained-looking B (it starts at 0)
masked_layer = copy.deepcopy(dense_layer)
masked_layer.prune_to(0.75)
ranked_layer = copy.deepcopy(dense_layer)
ranked_layer.prune_ranks(big_rank // 4)
x = torch.randn(64, width)                         # 64 tokens (fewer than `width` rows: the two-matmul path)
layers = {f"dense r={big_rank}": dense_layer, f"75 % masked r={big_rank}": masked_layer,
          f"structured r={big_rank // 4}": ranked_layer}
repeats = {label: [] for label in layers}
with torch.no_grad():
    for layer in layers.values():
        for _ in range(3):
            layer(x)                               # warm-up
    for _ in range(fast(7, 5)):                    # round robin, so a busy moment hits all three alike
        for label, layer in layers.items():
            t0 = time.perf_counter()
            for _ in range(20):
                layer(x)
            repeats[label].append((time.perf_counter() - t0) / 20)
timings = {label: statistics.median(values) for label, values in repeats.items()}
for label, layer in layers.items():
    nz = layer.nonzeros()
    macs = width * width + layer.rank * 2 * width  # per token: base + adapter, with dense kernels
    print(f"{label:22s} nonzeros {nz['total']:7,} / {nz['dense']:7,}   MACs per token {macs:9,}   "
          f"median forward {1e6 * timings[label]:8.1f} µs")
labels = list(timings)
print(f"time ratio masked / dense     = {timings[labels[1]] / timings[labels[0]]:.2f}  (MAC ratio 1.00)")
mac_ratio = (width * width + big_rank // 4 * 2 * width) / (width * width + big_rank * 2 * width)
print(f"time ratio structured / dense = {timings[labels[2]] / timings[labels[0]]:.2f}  (MAC ratio {mac_ratio:.2f})")

# %% [markdown]
# ## What to take away
#
# - Gradual pruning (cubic schedule) lets training compensate and beats cutting a dense
#   adapter in one shot (at the highest sparsity, checked above; usually at lower ones too).
#   An L1 penalty before a one-shot cut helps at high sparsity, by making the cut entries
#   small before they go; at low sparsity it can cost more than it saves (the penalty
#   shrinks the entries that stay as well: compare the lowest-sparsity column).
# - Structured pruning removes whole rank components. Per removed entry it can cost
#   more quality than unstructured pruning (it is a coarser choice), but it is the only
#   kind that makes the computation, the optimizer state and the file smaller without
#   sparse kernels: it is a LoRA of lower rank.
# - "Fewer nonzeros" is a storage statement, not a speed statement.
#
# Next: updates that are *not* low rank (tutorial 5).
