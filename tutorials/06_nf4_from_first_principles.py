# %% [markdown]
# # 6. NF4 from first principles
#
# QLoRA (Dettmers, Pagnoni, Holtzman, Zettlemoyer 2023, "QLoRA: Efficient Finetuning of
# Quantized LLMs", arXiv:2305.14314) fine-tunes a model whose frozen weights are stored in
# **4 bits** each. With only 16 values to choose from, *which* 16 values matters a lot.
# QLoRA's answer is NF4, "4-bit NormalFloat":
#
# 1. Pretrained weights are roughly normally distributed, so put the 16 levels at
#    **quantiles of the normal distribution**: then every level is used about equally
#    often, and no code is wasted on values that almost never occur.
# 2. Cut the weight into **blocks** of 64 and divide each block by its largest absolute
#    value (its *absmax*), so every block lands in [-1, 1] where the levels live.
# 3. The absmax constants cost 32 bits per 64 weights = 0.5 bit per weight. **Double
#    quantization** stores them in 8 bits too, bringing the cost down to about 4.127 bits.
#
# This tutorial builds each step with the `quantization` package, measures the error it
# makes (against evenly spaced 4-bit levels and across block sizes), checks the 4.127-bit
# arithmetic against the bytes actually stored, and looks inside the dequantization kernel.
#
# Run it with `python tutorials/06_nf4_from_first_principles.py` (or open it as a notebook);
# `NANOPEFT_FAST=1` makes the tensors smaller.

# %%
import time

import torch

from quantization import (Linear4bit, dequantize_nf4, nf4_bits_formula, nf4_levels, quantize_nf4,
                          unpack_nibbles)
from quantization.nf4 import blockwise_absmax
from trainers.checkpoints import load_llama2c
from trainers.notebook import FAST, fast, local_data, pyplot, save_figure

torch.manual_seed(0)
plt = pyplot()
print("fast mode" if FAST else "full mode")

# %% [markdown]
# ## The 16 levels are normal quantiles
#
# Split the probability mass of N(0, 1) into equal slices and take one representative
# point per slice: that is what a quantile code book is. NF4 does it asymmetrically so
# that **0 is exactly representable** (padding, pruned weights and zero-centred blocks
# need an exact zero):
#
#     positive levels: Φ⁻¹(p) for 8 probabilities p evenly spaced from δ down to 1/2 (1/2 itself dropped)
#     negative levels: -Φ⁻¹(p) for 7 probabilities evenly spaced from δ down to 1/2 (1/2 dropped)
#     plus 0, then divide everything by the largest level, so the range is [-1, 1]
#
# Φ⁻¹ is the normal quantile function (`torch.special.ndtri`), and δ = 0.9677 ≈ 1 - ½(1/30 + 1/32)
# keeps the outermost quantile finite (Φ⁻¹(1) = ∞). That gives 8 + 7 + 1 = 16 levels.
# `nf4_levels()` derives them that way (and reproduces the published table bit for bit).

# %%
levels = nf4_levels()                                      # (16,) sorted, in [-1, 1]
print("NF4 levels:")
for code, value in enumerate(levels.tolist()):
    print(f"  code {code:2d} (0b{code:04b}): {value:+.6f}")
print("exact zero at code", int((levels == 0).nonzero()), "| positive:", int((levels > 0).sum()),
      "negative:", int((levels < 0).sum()))

# %% [markdown]
# Where do the levels sit relative to the data they encode? A block of 64 standard normal
# weights divided by its absmax is *roughly* N(0, σ²) with σ = 1 / E[max |w|] (about
# 1/2.6 for 64 samples). The figure draws the levels under that density, next to the 16
# evenly spaced levels of a plain ("uniform") 4-bit code. The right panel shows how often
# each code is used on real blocks: NF4 spreads the usage far more evenly, which is the
# whole point. A code used equally often carries the full 4 bits of information (entropy);
# we print that entropy for both.

# %%
n = fast(1 << 20, 1 << 16)
w = torch.randn(n)                                         # (n,) Gaussian "weights"
scaled, absmax = blockwise_absmax(w, 64)                   # (n/64, 64) in [-1, 1], (n/64,)
uniform_levels = torch.linspace(-1, 1, 16)                 # evenly spaced 4-bit levels

def code_usage(values, book):
    """How often each of the 16 levels is the nearest one (fractions)."""
    codes = (values.reshape(-1, 1) - book).abs().argmin(dim=1)
    return torch.bincount(codes, minlength=16).float() / values.numel()

usage_nf4 = code_usage(scaled[:4096], levels)
usage_uni = code_usage(scaled[:4096], uniform_levels)
entropy = lambda p: float(-(p[p > 0] * p[p > 0].log2()).sum())
print(f"mean block absmax of 64 N(0,1) samples: {absmax.mean().item():.3f}")
print(f"entropy of the code usage: NF4 {entropy(usage_nf4):.3f} bits, uniform {entropy(usage_uni):.3f} bits "
      f"(4 bits is the most a 4-bit code can carry)")
assert entropy(usage_nf4) > entropy(usage_uni) + 0.1        # NF4 uses its codes more evenly

sigma = 1 / absmax.mean().item()
x = torch.linspace(-1.05, 1.05, 400)
density = torch.exp(-0.5 * (x / sigma) ** 2) / (sigma * (2 * torch.pi) ** 0.5)
fig, (ax0, ax1) = plt.subplots(1, 2, figsize=(12, 4))
ax0.plot(x, density, color="k", label=f"density of w / absmax (≈ N(0, {sigma:.2f}²))")
ax0.vlines(levels, 0, density.max() * 1.05, color="tab:blue", label="NF4 levels")
ax0.plot(uniform_levels, torch.full((16,), -0.05), "|", color="tab:red", markersize=12,
         label="uniform 4-bit levels")
ax0.set_xlabel("normalised weight")
ax0.set_title("NF4 levels follow the normal quantiles")
ax0.set_ylim(-0.12, 1.5)
ax0.legend(fontsize=8, loc="upper center")
ax1.bar(torch.arange(16) - 0.2, usage_nf4, width=0.4, label="NF4")
ax1.bar(torch.arange(16) + 0.2, usage_uni, width=0.4, label="uniform", color="tab:red")
ax1.axhline(1 / 16, color="k", linestyle="--", linewidth=1, label="1/16 (every code equally used)")
ax1.set_xlabel("code")
ax1.set_ylabel("fraction of weights")
ax1.set_title("how often each code is used (blocks of 64)")
ax1.legend(fontsize=8)
save_figure(fig, "06_nf4_levels")

# %% [markdown]
# ## Blockwise absmax, one block by hand
#
# `quantize_nf4(w, blocksize=64)` flattens w row-major, cuts it into blocks of 64, and per
# block b stores
#
#     c_b = max_i |w_i|                    the absmax (one float per block)
#     q_i = argmin_j |w_i / c_b - L_j|     the nearest level: a 4-bit code
#     ŵ_i = L[q_i] · c_b                   what dequantization gives back
#
# Two codes share a byte (the first element of a pair in the high nibble, as bitsandbytes
# does). Here is the first block of a small weight, quantized without double quantization
# so that `q.absmax` holds the plain constants.

# %%
weight = torch.randn(8, 32) * 0.02                        # (out, in), a typical weight scale
q = quantize_nf4(weight, blocksize=64, double_quant=False)
codes = unpack_nibbles(q.packed, q.numel)                 # (256,) uint8 codes 0..15
first = weight.reshape(-1)[:64]
c0 = q.absmax[0].item()
print(f"{q.numel} weights -> {q.packed.numel()} bytes of codes + {q.absmax.numel()} absmax constants")
print(f"block 0: absmax c = {c0:.5f}")
print(" i   w_i        w_i/c    code  level      ŵ_i")
for i in range(6):
    k = int(codes[i])
    print(f"{i:2d}  {first[i].item():+.5f}  {first[i].item() / c0:+.4f}   {k:2d}   {levels[k].item():+.4f}  "
          f"{levels[k].item() * c0:+.5f}")
restored = dequantize_nf4(q)                              # (8, 32)
manual = levels[codes.long()].reshape(-1, 64) * q.absmax[:, None]
print("dequantize_nf4 equals L[q] * c computed by hand:", torch.allclose(restored.reshape(-1, 64), manual))
print(f"the largest |w| of each block is reproduced exactly (level ±1): "
      f"{torch.equal(restored.reshape(-1, 64).abs().amax(1), q.absmax)}")
assert torch.allclose(restored.reshape(-1, 64), manual)
assert torch.equal(restored.reshape(-1, 64).abs().amax(1), q.absmax)

# %% [markdown]
# ## The error it makes
#
# Compare NF4 with the obvious alternative: 16 evenly spaced levels over the same [-1, 1]
# block range (the same blocks and absmax; only the code book differs). We measure the
# root-mean-square error relative to the weights' own RMS, on Gaussian weights and, when
# the offline data is present, on the real pretrained weights of stories260K.
#
# Then vary the block size: a larger block shares one absmax among more weights, so the
# block's largest value (which sets the scale) is larger relative to the typical weight and
# the levels are spread thinner: the error grows with the block size, while the cost of
# the constants, 32 / B bits per weight, shrinks. B = 64 is QLoRA's compromise.

# %%
def relative_rmse(w, restored):
    return ((restored - w).pow(2).mean().sqrt() / w.pow(2).mean().sqrt()).item()

def uniform_4bit(w, blocksize=64):
    """The same blocks and absmax as NF4, but 16 evenly spaced levels (an illustration)."""
    scaled, absmax = blockwise_absmax(w, blocksize)
    idx = ((scaled + 1) * 7.5).round()                     # nearest of linspace(-1, 1, 16)
    return ((idx / 7.5 - 1) * absmax[:, None]).reshape(-1)[: w.numel()].view_as(w)

samples = {"Gaussian N(0, 1)": w}
root = local_data("stories260K", "karpathy/tinyllamas (file stories260K/stories260K.bin)")
checkpoint = root / "stories260K" / "stories260K.bin" if root is not None else None
if checkpoint is not None and checkpoint.exists():
    real = load_llama2c(checkpoint)
    samples["stories260K linear weights"] = torch.cat(
        [m.weight.detach().reshape(-1) for name, m in real.named_modules()
         if isinstance(m, torch.nn.Linear) and "lm_head" not in name])
else:
    print("no stories260K checkpoint here: Gaussian weights only")

for label, sample in samples.items():
    e_nf4 = relative_rmse(sample, dequantize_nf4(quantize_nf4(sample, 64, double_quant=False)))
    e_uni = relative_rmse(sample, uniform_4bit(sample, 64))
    print(f"{label:28s} ({sample.numel():>8,} weights): relative RMSE NF4 {e_nf4:.4f}, "
          f"uniform 4-bit {e_uni:.4f}  ({e_uni / e_nf4:.2f}x larger)")
    assert 1.03 < e_uni / e_nf4 < 1.15, (label, e_nf4, e_uni)    # "about 8 % lower" (text below)

blocksizes = [32, 64, 128, 256, 512, 1024, 4096]
err_by_block = [relative_rmse(w, dequantize_nf4(quantize_nf4(w, b, double_quant=False))) for b in blocksizes]
print("\nblock size   relative RMSE   bits/weight (codes + fp32 absmax)")
for b, e in zip(blocksizes, err_by_block):
    print(f"{b:10d}   {e:13.4f}   {nf4_bits_formula(b, double_quant=False):.3f}")
assert all(a < b for a, b in zip(err_by_block, err_by_block[1:])), err_by_block   # grows with the block

# %% [markdown]
# The histogram shows *where* the errors are: NF4's errors are small near zero (where the
# levels are dense and most weights are) and larger in the tails, while the uniform code
# makes the same size of error everywhere and so wastes precision on the rare large weights.

# %%
sub = w[: 1 << 16]
err_nf4 = (dequantize_nf4(quantize_nf4(sub, 64, double_quant=False)) - sub)
err_uni = (uniform_4bit(sub, 64) - sub)
fig, (ax0, ax1) = plt.subplots(1, 2, figsize=(12, 4))
bins = torch.linspace(-0.35, 0.35, 120)
ax0.hist(err_uni.numpy(), bins=bins.numpy(), alpha=0.6, color="tab:red", label="uniform 4-bit")
ax0.hist(err_nf4.numpy(), bins=bins.numpy(), alpha=0.6, color="tab:blue", label="NF4")
ax0.set_xlabel("quantization error ŵ - w   (w ~ N(0, 1), blocks of 64)")
ax0.set_ylabel("count")
ax0.set_title("error histogram")
ax0.legend()
ax1.plot(blocksizes, err_by_block, "o-")
ax1.set_xscale("log", base=2)
ax1.set_xlabel("block size B")
ax1.set_ylabel("relative RMSE")
ax1.set_title("NF4 error grows with the block size")
ax1.grid(alpha=0.3)
save_figure(fig, "06_nf4_error")

# %% [markdown]
# ## Double quantization and the 4.127-bit arithmetic
#
# Per weight, NF4 stores a 4-bit code plus its share of the block's constant. With a float32
# absmax per block of 64 that share is 32 / 64 = 0.5 bit: 4.5 bits per weight.
#
# Double quantization (QLoRA §3) quantizes the absmax constants themselves: subtract their
# mean, cut them into blocks of 256, and store each in 8 bits (the signed "dynamic" 8-bit code
# of Dettmers 2015) with one float32 scale per 256 constants:
#
#     bits / weight = 4 + 8/64 + 32/(64 · 256) = 4 + 0.125 + 0.00195 ≈ 4.127
#
# We check the formula against the bytes a `Linear4bit` actually holds (codes, 8-bit
# constants, their scales, and the one float32 mean per tensor, which the formula leaves out).

# %%
formula_dq = 4 + 8 / 64 + 32 / (64 * 256)
print(f"4 + 8/64 + 32/(64*256) = {formula_dq:.5f}   (nf4_bits_formula: {nf4_bits_formula(64):.5f})")
print(f"without double quantization: 4 + 32/64 = {nf4_bits_formula(64, double_quant=False):.3f}")

d = fast(4096, 1024)
big = torch.nn.Linear(d, d, bias=False)
for dq in (False, True):
    layer = Linear4bit.from_linear(big, double_quant=dq)
    stored = {name: buf.numel() * buf.element_size() for name, buf in layer.named_buffers()}
    total = sum(stored.values())
    measured = 8 * total / (d * d)
    predicted = nf4_bits_formula(64, double_quant=dq)
    print(f"\ndouble_quant={dq}: a ({d}, {d}) weight stores {total:,} bytes "
          f"(float32: {4 * d * d:,}, {4 * d * d / total:.2f}x more)")
    for name, nbytes in stored.items():
        print(f"   {name:14s} {nbytes:>10,} bytes")
    print(f"   measured {measured:.5f} bits/weight, formula {predicted:.5f}, "
          f"difference {8 * total - predicted * d * d:.0f} bits (the per-tensor float32 mean: "
          f"{32 if dq else 0} bits)")
    assert round(8 * total - predicted * d * d) == (32 if dq else 0)

# What does double quantization cost in accuracy? The constants are now slightly off.
w_real = big.weight.detach()
e_plain = relative_rmse(w_real, Linear4bit.from_linear(big, double_quant=False).dequantize())
e_dq = relative_rmse(w_real, Linear4bit.from_linear(big, double_quant=True).dequantize())
print(f"\nrelative RMSE: plain absmax {e_plain:.6f}, double-quantized absmax {e_dq:.6f} "
      f"(a change of {e_dq - e_plain:+.1e}), for {nf4_bits_formula(64, False) - formula_dq:.3f} "
      f"fewer bits per weight")
assert abs(e_dq - e_plain) < 0.01 * e_plain                 # a tiny extra error

# %% [markdown]
# ## The dequantization kernel
#
# Every forward (and backward) pass of a `Linear4bit` rebuilds Ŵ from the codes. The naive
# way is three passes: unpack the nibbles into one code per element, look each code up in
# the 16 levels, multiply by the block's absmax. `dequantize_nf4` does better with one
# observation: a byte holds **two** codes, and there are only 256 bytes. So a 256-entry
# table maps each byte directly to the *pair* of float32 levels it encodes (high nibble
# first), and the table is stored as 256 eight-byte words. One gather (`index_select`) of
# n/2 bytes then writes n levels, already in element order, straight into the output; a
# single in-place multiply by the absmax (output viewed as (blocks, 64)) finishes the job.
#
# The table for a few bytes, built from the levels (what the kernel looks up):

# %%
for byte in (0x00, 0x7F, 0xF7, 0xA3):
    hi, lo = byte >> 4, byte & 15
    print(f"byte 0x{byte:02X} -> (L[{hi:2d}], L[{lo:2d}]) = ({levels[hi].item():+.4f}, {levels[lo].item():+.4f})")

# %% [markdown]
# Now time it. Copying a float32 tensor of the same size is the floor: any dequantization
# must at least write the output. We also time the naive three-pass version built from
# `unpack_nibbles`. Timings depend on the machine (and on what else runs on it), so read
# the ratios as an illustration, not a benchmark (`python -m trainers.bench` is the benchmark).

# %%
rows, cols = fast((4096, 4096), (1024, 1024))
q = quantize_nf4(torch.randn(rows, cols), 64, double_quant=True)
dense = torch.empty(rows, cols)

def naive(q):
    codes = unpack_nibbles(q.packed, q.numel).long()                        # pass 1: unpack
    values = levels[codes]                                                  # pass 2: look up
    return (values.view(-1, q.blocksize) * q.block_absmax()[:, None]).view(q.shape)   # pass 3: scale

def best_time(fn, repeat=fast(7, 3)):
    fn()                                                                    # warm-up
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)

print("kernel equals the naive version:", torch.equal(dequantize_nf4(q), naive(q)))
assert torch.equal(dequantize_nf4(q), naive(q))
t_copy = best_time(lambda: dense.clone())
t_kernel = best_time(lambda: dequantize_nf4(q))
t_naive = best_time(lambda: naive(q))
print(f"({rows} x {cols}) weight: copy {1e3 * t_copy:.2f} ms, dequantize_nf4 {1e3 * t_kernel:.2f} ms "
      f"({t_kernel / t_copy:.1f}x a copy), naive three passes {1e3 * t_naive:.2f} ms "
      f"({t_naive / t_copy:.1f}x a copy)")

fig, ax = plt.subplots(figsize=(6, 3.2))
ax.barh(["float32 copy", "dequantize_nf4\n(byte -> pair table)", "naive\n(unpack, lookup, scale)"],
        [1e3 * t_copy, 1e3 * t_kernel, 1e3 * t_naive], color=["gray", "tab:blue", "tab:red"])
ax.set_xlabel(f"ms for a ({rows} x {cols}) weight (best of several runs)")
ax.set_title("dequantization cost, as an illustration")
save_figure(fig, "06_nf4_kernel")

# %% [markdown]
# ## What to take away
#
# - NF4's 16 levels are normal quantiles with an exact zero; on normally distributed
#   weights every code is used about equally often, so the 4 bits are well spent.
# - Blockwise absmax puts each block of 64 weights into [-1, 1]; the block's largest
#   weight is kept exactly. Larger blocks are cheaper but less precise.
# - At equal bits NF4 has a lower error than evenly spaced 4-bit levels (about 8 % here),
#   on Gaussian and on real pretrained weights, and uses its codes more evenly.
# - Double quantization stores the constants in 8 bits: 4 + 8/64 + 32/(64·256) ≈ 4.127 bits
#   per weight (plus one float per tensor), for a tiny extra error.
# - Dequantization is a single table gather (byte -> pair of levels) and a multiply.
#
# Next: train LoRA adapters on top of an NF4 model, QLoRA (tutorial 7).
