# %% [markdown]
# # 7. QLoRA: adapters on a 4-bit model
#
# LoRA (tutorial 1) makes the *trainable* part of fine-tuning small, but the frozen base
# still sits in memory at 16 or 32 bits per weight. QLoRA (Dettmers, Pagnoni, Holtzman,
# Zettlemoyer 2023, "QLoRA: Efficient Finetuning of Quantized LLMs", arXiv:2305.14314) stores
# the frozen base in NF4 (tutorial 6, ~4.127 bits per weight) and trains LoRA adapters on
# top, in full precision:
#
#     y = dequant(W_nf4) x + s · B A x          W_nf4 frozen (4-bit), A, B trained (float32)
#
# Gradients flow *through* the quantized layer to the adapters and the layers below:
# ∂L/∂x = ∂L/∂y · Ŵ uses the dequantized weight, which is rebuilt in the backward pass
# rather than kept in memory. The base never gets a gradient, so it never needs more than
# its 4-bit storage.
#
# In nanopeft QLoRA is not a separate class, it is a composition:
#
#     add_lora_to_model(quantize_model(model, bits=4), r=8, target_modules=[...])
#
# This tutorial builds it on a real pretrained model (stories260K, a 260K-parameter
# LLaMA trained on TinyStories by Karpathy), fine-tunes it on Tiny Shakespeare, and compares
# memory and held-out quality against LoRA on the float base and full fine-tuning.

# %%
import copy

import torch

from allocation.budget import base_bits_per_param, training_bytes
from lora import add_lora_to_model, count_parameters, lora_state_dict
from quantization import Linear4bit, memory_report, quantize_model
from trainers.notebook import FAST, fast, have_stories, pyplot, save_figure
from trainers.train import TrainConfig, peak_memory, train

torch.manual_seed(0)
print("fast mode" if FAST else "full mode")

# %% [markdown]
# ## A pretrained model and a new kind of text
#
# stories260K knows children's stories; Tiny Shakespeare is very different text, so
# fine-tuning has something to do. Both live in the offline data folder
# (`trainers.paths.data_dir()`: `NANOPEFT_DATA`, or `../shared/data` beside the checkout).
# Online, get them from the hub: the checkpoint and its tokenizer are
# `stories260K/stories260K.bin` and `stories260K/tok512.bin` in `karpathy/tinyllamas`
# (`huggingface-cli download karpathy/tinyllamas stories260K/stories260K.bin stories260K/tok512.bin
# --local-dir <folder>`, then point `NANOPEFT_DATA` at `<folder>`), and Tiny Shakespeare is the
# dataset `karpathy/tiny_shakespeare` (which `trainers.data` loads by itself when online).
#
# Without them the tutorial falls back to the offline planted problem of `trainers/planted.py`
# (a small residual MLP whose "fine-tuning" target is a teacher with low-rank weight changes),
# so every step below still runs; the numbers then measure a regression loss.

# %%
have_real = have_stories()

if have_real:
    from trainers.experiments import load_model, load_task_for, make_evaluator
    pretrained, tokenizer = load_model("stories260K", "tiny_shakespeare", max_length=64)
    data = load_task_for("tiny_shakespeare", tokenizer, max_length=64, limit=fast(2000, 160))
    evaluate = make_evaluator(data, max_examples=fast(256, 48))
    metric = "perplexity"
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]  # every linear layer
    batch_size, lr_adapter, lr_full = 8, 5e-3, 1e-3

    def batches(epoch):
        return data.batches("train", batch_size, shuffle=True, seed=epoch, drop_last=True)

    print(f"stories260K on Tiny Shakespeare: {data.num_examples('train')} training blocks of 64 tokens, "
          f"{data.num_examples('eval')} held-out ({data.note})")
else:
    from trainers.planted import PlantedConfig, PlantedTask, build_planted
    planted_cfg = PlantedConfig(dim=64, nf4_grid=False)     # base weights not on the NF4 grid: 4 bits cost here
    pretrained, teacher, _ = build_planted(planted_cfg)
    task = PlantedTask(teacher, planted_cfg)
    evaluate, metric, targets = task.evaluate, "mse", ["fc1", "fc2"]
    batch_size, lr_adapter, lr_full = 128, 1e-2, 1e-3

    def batches(epoch):
        return task.batches("train", batch_size, seed=epoch)

    print("fallback: the planted-rank regression problem (trainers/planted.py)")

pretrained.eval()
steps = fast(300, 30)

# %% [markdown]
# ## Quantize the base
#
# `quantize_model(model, bits=4)` replaces every `nn.Linear` by a `Linear4bit` (NF4, blocks
# of 64, double quantization). Layers whose weight is shared with another module are left
# alone: stories260K ties its output layer to the token embedding, and the embedding is a
# lookup table, not a Linear, so both stay float32. `memory_report` lists every module
# with its true parameter count and the bytes it actually stores.

# %%
qmodel = quantize_model(copy.deepcopy(pretrained), bits=4)
report = memory_report(qmodel)
print("\n".join(str(report).splitlines()[:6] + ["..."] + str(report).splitlines()[-3:]))
nf4_rows = [r for r in report.layers if r.kind == "nf4"]
print(f"\nthe {len(nf4_rows)} NF4 layers: {sum(r.params for r in nf4_rows):,} weights in "
      f"{sum(r.bytes for r in nf4_rows):,} bytes = "
      f"{8 * sum(r.bytes for r in nf4_rows) / sum(r.params for r in nf4_rows):.3f} bits per weight "
      f"(small layers pay a little more than 4.127 for their per-tensor constants)")


# %% [markdown]
# ## Adapters on top, and what trains
#
# `add_lora_to_model` wraps each quantized layer in a `LoRALinear` exactly as it would wrap
# an `nn.Linear`: the adapter only calls `base_layer(x)`. A `Linear4bit` holds its weight
# as *buffers* (packed codes and constants), not as a Parameter, so there is nothing in it
# the optimizer could update; only `lora_A` and `lora_B` train.

# %%
torch.manual_seed(0)
add_lora_to_model(qmodel, r=8, lora_alpha=16, target_modules=targets)
trainable, total = count_parameters(qmodel)
print(f"QLoRA model: {trainable:,} trainable of {total:,} parameters ({100 * trainable / total:.2f} %; "
      f"a large share because the model is tiny: r = 8 against a width of 64)")
first = next(m for m in qmodel.modules() if isinstance(m, Linear4bit))
print("a Linear4bit's buffers:", [name for name, _ in first.named_buffers()],
      "| its parameters:", [name for name, _ in first.named_parameters()])
print("trainable tensors, first three:", [n for n, p in qmodel.named_parameters() if p.requires_grad][:3])

# B = 0 at the start, so the adapted model still computes exactly the NF4 base: a good moment
# to measure what 4-bit storage costs in quality before any training.
quality = {"base (float32)": evaluate(pretrained)[metric], "base (NF4)": evaluate(qmodel)[metric]}
for name, value in quality.items():
    print(f"{name:16s} held-out {metric} = {value:.4f}")

# One backward pass: the adapters get gradients, the frozen base does not (it has none to get).
probe = next(iter(batches(0)))
_, loss = qmodel(probe["input_ids"], targets=probe["labels"])
loss.backward()
with_grad = [n for n, p in qmodel.named_parameters() if p.grad is not None]
print(f"after one backward: {len(with_grad)} tensors have a gradient, all adapter factors: "
      f"{all('lora_' in n for n in with_grad)}")
qmodel.zero_grad(set_to_none=True)

# %% [markdown]
# ## Three ways to fine-tune, same data, same steps
#
# - **Full fine-tuning**: every weight trains (float32, AdamW), at a smaller learning rate.
# - **LoRA**: r = 8 on every linear layer of the float32 base.
# - **QLoRA**: the same adapters on the NF4 base built above.
#
# Each run uses `trainers.train.train` (the library's training loop) and the same batches.
# After training we evaluate on held-out text and record the memory it took:
#
# - `state_bytes` (recorded by `train`; `trainers.memory.training_state_bytes`): every stored
#   weight (a quantized layer's packed codes and constants) plus, per *trainable* parameter,
#   its gradient and AdamW's two moments. This is what grows with the model; activations come on top and depend on batch and length.
# - adapter bytes: what you would save and ship (`lora_state_dict`); for full fine-tuning,
#   the whole model.
# - peak RSS: the process's resident-set high-water mark. On Linux `train` resets it when it
#   starts; elsewhere it only ever grows within one process. For a model this small it is
#   dominated by the PyTorch runtime itself, so it cannot tell the three runs apart here;
#   `python -m trainers ablate memory` runs each in a fresh process to measure it per method.

# %%
def run(label, model, lr):
    cfg = TrainConfig(steps=steps, batch_size=batch_size, lr=lr, warmup_steps=max(1, steps // 10),
                      eval_every=0, progress=False, device="cpu")
    result = train(model, batches, cfg, evaluate=evaluate)
    shipped = (sum(t.numel() * t.element_size() for t in lora_state_dict(model).values())
               if any("lora_" in n for n, _ in model.named_parameters())
               else sum(p.numel() * p.element_size() for p in model.parameters()))
    row = {"label": label, metric: result.metrics[metric], "state_bytes": result.metrics["state_bytes"],
           "trainable": result.metrics["trainable_params"], "shipped_bytes": shipped,
           "time_s": result.metrics["train_time_s"], "curve": [r["loss"] for r in result.loss_log]}
    print(f"{label:18s} {metric} {row[metric]:9.4f}   state {row['state_bytes']:>10,} B   "
          f"trainable {row['trainable']:>8,}   saved {shipped:>9,} B   {row['time_s']:.1f} s")
    return row

full = copy.deepcopy(pretrained).train()
for p in full.parameters():
    p.requires_grad_(True)
torch.manual_seed(0)
lora_model = add_lora_to_model(copy.deepcopy(pretrained), r=8, lora_alpha=16, target_modules=targets)

rows = [run("full fine-tuning", full, lr_full),
        run("LoRA r=8", lora_model, lr_adapter),
        run("QLoRA r=8 (NF4)", qmodel, lr_adapter)]
rss, kind = peak_memory(torch.device("cpu"))
print(f"\npeak RSS (since the last run started on Linux; of the whole process elsewhere): "
      f"{rss / 2 ** 20:.0f} MiB ({kind})")
print(f"before fine-tuning: base {quality['base (float32)']:.4f}, NF4 base {quality['base (NF4)']:.4f}")

# %% [markdown]
# ## Reading the numbers
#
# Compare the **state bytes**: full fine-tuning keeps four float32 copies of every weight
# (weight, gradient, two moments); LoRA keeps one frozen float32 copy plus four copies of the
# small adapters; QLoRA replaces the frozen float32 copy by ~4.1 bits per weight. On
# stories260K a large part of what remains is the float32 token embedding (tied to the output
# layer), which no method here quantizes.
#
# Compare the **quality**: on stories260K QLoRA lands close to LoRA (within 10 %), because the
# adapters can also learn to compensate part of the quantization error (they see the NF4
# weights during training), and 4 bits cost under 10 % before training. On the planted
# fallback, whose weights are not on the NF4 grid, 4 bits change every layer by about as much
# as the planted updates (trainers/planted.py explains it), and QLoRA ends clearly behind LoRA.
# Full fine-tuning has the most freedom; with a short run and a small learning rate it is not
# guaranteed to be best. Every fine-tuned model ends below the un-tuned base (on stories260K
# at less than half its perplexity).
#
# The checks below hold each of these sentences to the numbers above.

# %%
by_label = {row["label"]: row for row in rows}
full_row, lora_row, qlora_row = (by_label[k] for k in ("full fine-tuning", "LoRA r=8", "QLoRA r=8 (NF4)"))
assert full_row["state_bytes"] > lora_row["state_bytes"] > qlora_row["state_bytes"]   # memory, in that order
assert all(row[metric] < quality["base (float32)"] for row in rows)                     # below the base
assert quality["base (float32)"] <= quality["base (NF4)"]                                # 4 bits cost something
if have_real:
    assert qlora_row[metric] < 1.1 * lora_row[metric], (qlora_row[metric], lora_row[metric])  # close to LoRA
    assert quality["base (NF4)"] < 1.1 * quality["base (float32)"], quality                  # and a little
    assert all(row[metric] < 0.5 * quality["base (float32)"] for row in rows)                # far below
else:
    assert qlora_row[metric] > 1.2 * lora_row[metric], (qlora_row[metric], lora_row[metric])  # clearly behind
#
# The arithmetic is the same at scale. For a 7-billion-parameter LLaMA (adapters of ~0.3 %
# of the weights, as LoRA r=16 on every layer gives), the budget module's byte counts give:

# %%
n7b, adapter_7b = 6.7e9, 0.003 * 6.7e9
full_7b = training_bytes(int(n7b), "bfloat16", "float32")    # bf16 weights + grads, fp32 moments (no fp32 master copy)
lora_7b = n7b * 2 + training_bytes(int(adapter_7b), "float32")           # bf16 frozen base + fp32 adapters
qlora_7b = n7b * base_bits_per_param(4) / 8 + training_bytes(int(adapter_7b), "float32")
for label, value in (("full fine-tuning", full_7b), ("LoRA (bf16 base)", lora_7b), ("QLoRA (NF4 base)", qlora_7b)):
    print(f"7B model, {label:18s}: {value / 2 ** 30:6.1f} GiB of weights and optimizer state (no activations)")

# %% [markdown]
# ## Memory against quality
#
# Left: held-out quality against the training state in bytes (lower and further left is
# better), with the un-tuned float32 and NF4 bases as reference lines. Right: the training
# loss of each run.

# %%
plt = pyplot()
fig, (ax0, ax1) = plt.subplots(1, 2, figsize=(12, 4.2))
for i, (row, color) in enumerate(zip(rows, ("tab:red", "tab:blue", "tab:green"))):
    ax0.scatter(row["state_bytes"] / 1024, row[metric], s=60, color=color)
    ax0.annotate(f"{row['label']}\n{row['trainable']:,} trainable", (row["state_bytes"] / 1024, row[metric]),
                 fontsize=8, xytext=(5, 8 if i % 2 == 0 else -26), textcoords="offset points")  # alternate: no overlap
    ax1.plot(row["curve"], color=color, label=row["label"])
ax0.axhline(quality["base (float32)"], color="gray", linestyle="--", label="base, float32 (no training)")
ax0.axhline(quality["base (NF4)"], color="gray", linestyle=":", label="base, NF4 (no training)")
ax0.set_xlim(0, 1.4 * max(row["state_bytes"] for row in rows) / 1024)
ax0.set_yscale("log")                                   # the trained runs sit far below the bases
ax0.set_ylim(min(row[metric] for row in rows) / 1.3, 1.2 * max(quality.values()))   # room for the labels
plain = plt.FuncFormatter(lambda v, _: f"{v:g}")       # 30, 40, 60, 100 rather than 3 x 10^1
ax0.yaxis.set_major_formatter(plain)
ax0.yaxis.set_minor_formatter(plain)
ax0.set_xlabel("training state: weights + grads + AdamW moments (KiB)")
ax0.set_ylabel(f"held-out {metric}")
ax0.set_title("memory vs quality")
ax0.legend(fontsize=8)
ax0.grid(alpha=0.3)
ax1.set_xlabel("step")
ax1.set_ylabel("training loss")
ax1.set_title("training curves")
ax1.legend(fontsize=8)
ax1.grid(alpha=0.3)
save_figure(fig, "07_qlora_memory_quality")

# %% [markdown]
# ## What to take away
#
# - QLoRA = `quantize_model(model, bits=4)` + `add_lora_to_model(...)`: the adapter does not
#   care whether its base is float or NF4.
# - The NF4 base holds no trainable tensor; gradients pass through it (dequantized on the
#   fly) to the float32 adapters.
# - The frozen base drops from 32 (or 16) to ~4.1 bits per weight; gradients and optimizer
#   moments exist only for the adapters.
# - On stories260K quality stays close to LoRA on the float base (within 10 %); quantization
#   costs a little before training (under 10 %), and the adapters can win part of it back.
#   When the update a task needs is small next to the 4-bit rounding error (the planted
#   fallback), the quantized base costs more.
#
# Next: can the rank per layer be chosen from the loss curvature? (tutorial 8)
