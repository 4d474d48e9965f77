# %% [markdown]
# # 11. Many adapters, one base
#
# One frozen base serving many fine-tunes is why people use adapters at all: a LoRA
# adapter is a few thousand numbers, the base millions, so one copy of the base and a
# shelf of adapters serves many tasks. This tutorial trains two adapters for two
# different tasks on the same base, then switches between them, disables them,
# combines them (three ways, as PEFT defines them) and serves a batch that mixes
# requests for both.
#
# The tasks are planted (trainers/planted.py): a frozen residual MLP (the base) and two
# teachers made from it by adding low-rank updates in DIFFERENT layers, task A in
# `blocks.0.fc1` and `blocks.1.fc2`, task B in `blocks.0.fc2` and `blocks.1.fc1`. An
# adapter on every layer must find where its task's change lives.
#
# The API (lora/named.py): `add_adapter(model, name, config)`, `set_adapter`,
# `delete_adapter`, `disable_adapters` (a context manager), `add_weighted_adapter`,
# `mixed_batch` (a context manager), and `save_adapter(model, path, adapter=name)`.

# %%
import dataclasses
import time

import torch

from lora import (LoraConfig, adapter_layers, add_adapter, add_weighted_adapter, disable_adapters,
                  list_adapters, mixed_batch, set_adapter)
from trainers.notebook import FAST, fast, pyplot, save_figure
from trainers.planted import PlantedConfig, PlantedTask, build_planted

torch.manual_seed(0)
print("fast mode" if FAST else "full mode")

# %%
cfg = PlantedConfig(dim=32, planted=((4, 0), (0, 4)), eval_examples=1024, nf4_grid=False)
base, teacher_a, _ = build_planted(cfg)
# Same seed and block count, so the same base; other plant positions, so another teacher.
base_b, teacher_b, _ = build_planted(dataclasses.replace(cfg, planted=((0, 4), (4, 0))))
assert all(torch.equal(p, q) for p, q in zip(base.parameters(), base_b.parameters()))
tasks = {"A": PlantedTask(teacher_a, cfg), "B": PlantedTask(teacher_b, cfg)}


def mse(model, task):
    return tasks[task].evaluate(model)["mse"]


print({t: f"{mse(base, t):.4f}" for t in tasks}, "<- the base on each task")

# %% [markdown]
# ## Two adapters on one base
#
# The first `add_adapter` makes plain LoRA layers, exactly what `add_lora_to_model`
# makes. The second turns every adapted layer into a `MultiAdapterLinear`: one base
# layer, registered once, and one ordinary `LoRALinear` per adapter around it (no copy
# of the base). `set_adapter` chooses which adapter computes and trains.

# %%
model = base
steps = fast(300, 60)
for name, task in (("task_a", "A"), ("task_b", "B")):
    add_adapter(model, name, LoraConfig(r=4, lora_alpha=4, target_modules=["fc1", "fc2"]))
    set_adapter(model, name)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=1e-2)
    gen = torch.Generator().manual_seed(1)
    for step in range(steps):
        batch = tasks[task].sample(128, gen)
        _, loss = model(batch["input_ids"], targets=batch["labels"])
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    print(f"{name}: trained {sum(p.numel() for p in params):,} numbers; final batch loss {loss.item():.4f}")
print(model.blocks[0].fc1)
print("adapters:", list_adapters(model))

# %% [markdown]
# ## Switch and disable
#
# Each adapter fits its own task better than the other adapter does, and better than
# the base. Inside `disable_adapters(model)` the model computes exactly the base model.

# %%
losses = {}
for name in ("task_a", "task_b"):
    set_adapter(model, name)
    losses[name] = {t: mse(model, t) for t in tasks}
with disable_adapters(model):
    losses["base"] = {t: mse(model, t) for t in tasks}
for name, row in losses.items():
    print(f"{name:8s}", {t: f"{v:.4f}" for t, v in row.items()})
assert losses["task_a"]["A"] < losses["task_b"]["A"] and losses["task_a"]["A"] < losses["base"]["A"]
assert losses["task_b"]["B"] < losses["task_a"]["B"] and losses["task_b"]["B"] < losses["base"]["B"]

# %% [markdown]
# ## Combining: linear, cat, svd
#
# `add_weighted_adapter(model, ["task_a", "task_b"], [w_a, w_b], name, combination=...)`
# makes a new adapter from the two (lora/combine.py has the formulas):
#
# - **cat** stacks the factors (rank 4 + 4 = 8): its update is exactly w_a dW_a + w_b dW_b;
# - **svd** keeps the best rank-k approximation of that weighted sum;
# - **linear** adds the factors themselves, A = sum c_i A_i, B = sum c_i B_i (rank 4),
#   and B A then also holds cross terms B_a A_b + B_b A_a that neither adapter learned.
#
# With weights (1/2, 1/2) the blend holds half of each task's update. The two tasks
# change different layers, so for task A the blend undoes half of A's change and adds
# half of B's, which is noise for A: better than the base on both tasks, worse than
# each task's own adapter. Linear's cross terms add a change neither adapter learned.

# %%
W = [0.5, 0.5]
for combination, k in (("cat", None), ("svd", 4), ("linear", None)):
    add_weighted_adapter(model, ["task_a", "task_b"], W, combination, combination=combination, svd_rank=k)
    set_adapter(model, combination)
    losses[combination] = {t: mse(model, t) for t in tasks}


def update_error(name):
    """|| dW_name - (w_a dW_a + w_b dW_b) ||_F / || w_a dW_a + w_b dW_b ||_F over all layers."""
    err = ref = 0.0
    for layer_name, _ in adapter_layers(model, "task_a"):
        layer = model.get_submodule(layer_name)
        want = sum(w * layer.adapters[a].get_delta_weight() for a, w in zip(["task_a", "task_b"], W))
        err += (layer.adapters[name].get_delta_weight() - want).pow(2).sum().item()
        ref += want.pow(2).sum().item()
    return (err / ref) ** 0.5


errors = {c: update_error(c) for c in ("cat", "svd", "linear")}
for c in ("cat", "svd", "linear"):
    print(f"{c:7s} relative error of the update {errors[c]:.2e};",
          {t: f"{v:.4f}" for t, v in losses[c].items()})
assert errors["cat"] < 1e-5                       # exactly the weighted sum
assert errors["svd"] < errors["linear"]           # best rank-4: closer than linear's rank 4
for t, own in (("A", "task_a"), ("B", "task_b")):
    assert losses["cat"][t] < losses["base"][t]   # the blend keeps part of each task ...
    assert losses["cat"][t] > losses[own][t]      # ... but less than the task's own adapter
    assert losses["linear"][t] > losses["cat"][t]  # the cross terms cost linear on both tasks

# %% [markdown]
# ## A mixed batch
#
# Serving, requests for different adapters arrive together. Inside
# `mixed_batch(model, names)` example b goes through adapter names[b] ("__base__": none).
# The LoRA factors of the adapters present are stacked (padded to the largest rank),
# gathered per example and applied with two batched matmuls per layer, instead of one
# forward per adapter. The result equals running each example through its own adapter.

# %%
x = torch.randn(64, cfg.dim)
names = ["task_a", "task_b", "__base__", "svd"] * 16
with torch.no_grad(), mixed_batch(model, names):
    mixed = model(x)[0]
looped = torch.empty_like(mixed)
with torch.no_grad():
    for name in dict.fromkeys(names):
        rows = [i for i, n in enumerate(names) if n == name]
        if name == "__base__":
            with disable_adapters(model):
                looped[rows] = model(x[rows])[0]
        else:
            set_adapter(model, name)
            looped[rows] = model(x[rows])[0]
torch.testing.assert_close(mixed, looped, rtol=1e-5, atol=1e-5)
print("mixed batch == one adapter at a time: max difference", f"{(mixed - looped).abs().max().item():.1e}")


def timed(fn, repeats=fast(50, 5)):
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - start) / repeats


def serve_mixed():
    with torch.no_grad(), mixed_batch(model, names):
        return model(x)


def serve_loop():
    with torch.no_grad():
        for name in ("task_a", "task_b", "svd"):
            set_adapter(model, name)
            model(x[[i for i, n in enumerate(names) if n == name]])
        with disable_adapters(model):
            model(x[[i for i, n in enumerate(names) if n == "__base__"]])


# Timings on a model this small say little (the bench's multi_adapter section measures a GPT-2
# sized model); printed, not compared.
print(f"mixed batch {1e3 * timed(serve_mixed):.2f} ms, loop over adapters {1e3 * timed(serve_loop):.2f} ms")

# %%
plt = pyplot()
fig, ax = plt.subplots(figsize=(7, 3.2))
rows = ["base", "task_a", "task_b", "cat", "svd", "linear"]
for j, t in enumerate(tasks):
    ax.bar([i + 0.4 * j for i in range(len(rows))], [losses[r][t] for r in rows], width=0.4, label=f"task {t}")
ax.set_xticks([i + 0.2 for i in range(len(rows))], rows)
ax.set_ylabel("held-out MSE")
ax.set_title("each adapter on each task; blends of the two (weights 1/2, 1/2)")
ax.legend()
save_figure(fig, "11_many_adapters")
