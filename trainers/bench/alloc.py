"""Allocation overhead: what the rank-allocation machinery costs next to training itself.

Model: GPT-2 width 768, 2 layers (quick: also 2 layers, vocab 4096), LoRA r = 8 on
c_attn, batch 4 x 64, AdamW.
  * one Hutchinson probe (allocation.hessian_traces with 2 samples, per sample: a
    forward, a backward with create_graph and a Hessian-vector product on the c_attn
    base weights) vs one forward + backward to the same weights. Both run with the
    math attention kernel: the fused CPU attention kernels have no double backward;
  * the curvature tracker's per-step update (CurvatureTracker.update, "grad_sq" and
    "secant") vs one LoRA training step;
  * one rank-controller decision (RankController.apply_ranks: one layer grows by 2,
    the other shrinks by 2, AdamW state carried) vs one LoRA training step. Each
    timed call applies a decision and the next one undoes it, so the ranks stay 8.
"""
from __future__ import annotations

from torch.nn.attention import SDPBackend, sdpa_kernel

from allocation.controller import ControllerConfig, RankController
from allocation.curvature import CurvatureTracker
from allocation.hutchinson import hessian_traces
from lora import adapter_layers
from trainers.bench import workloads as W
from trainers.bench.layers import fill_zero_factors
from trainers.bench.timing import Settings, Timing, compare_row, time_interleaved

SECTION = "alloc"
ROWS = ("Hutchinson probe / forward+backward", "EMA tracker (grad_sq) / training step",
        "EMA tracker (secant) / training step", "rank controller decision / training step")


def run(settings: Settings) -> list:
    device = settings.device
    config, _ = W.gpt2_bench_config(settings.quick)
    config = W.with_overrides(config, n_layer=2)
    batch, seq = 4, 64
    note = f"GPT-2 width 768, 2 layers, vocab {config.vocab_size}, LoRA r=8 on c_attn, batch {batch}x{seq}"
    idx = W.token_batch(config.vocab_size, batch, seq, device)

    # Hutchinson: probe the base weights of c_attn, against a plain backward to the same weights.
    probe_model = W.ours("base", config, device)
    names = [n for n, m in probe_model.named_modules() if n.endswith("c_attn")]
    weights = [probe_model.get_submodule(n).weight for n in names]

    def probe():   # two samples is the least hessian_traces takes (it picks the math kernel itself)
        hessian_traces(probe_model, [(idx, idx)], names, min_samples=2, max_samples=2)

    def backward():   # the same attention kernel as the probe, for a like-for-like ratio
        for w in weights:
            w.requires_grad_(True)
        with sdpa_kernel(SDPBackend.MATH):
            probe_model(idx, targets=idx)[1].backward()
        for w in weights:
            w.grad = None
            w.requires_grad_(False)

    # Training step, tracker and controller on a LoRA model.
    model = W.ours("lora", config, device)
    for _, layer in adapter_layers(model):
        fill_zero_factors(layer)
    step = W.train_step(model, "lora", idx)
    step()                                                  # AdamW state exists from here on
    loss = W.lm_loss(model, "lora", idx)
    loss.backward()                                         # gradients for the tracker to read
    layers = adapter_layers(model)
    grad_sq, secant = CurvatureTracker(signal="grad_sq"), CurvatureTracker(signal="secant")
    controller = RankController(model, ControllerConfig(r_min=2, r_max=32, rank_step=2))
    first, second = [n for n, _ in layers][:2]
    plans = [{first: 10, second: 6}, {first: 8, second: 8}]
    state = {"k": 0}

    def decide():
        controller.apply_ranks(plans[state["k"] % 2], step.optimizer)
        state["k"] += 1

    def train():            # the tracker reads grads left by the backward above; keep them
        grads = {p: p.grad for p in step.optimizer.param_groups[0]["params"]}
        step()
        for p, g in grads.items():
            p.grad = g

    t = time_interleaved({"probe": probe, "backward": backward}, settings)
    rows = [compare_row(SECTION, "Hutchinson probe / forward+backward", _per_sample(t["probe"]), t["backward"],
                        None, note)]
    t = time_interleaved({"step": train, "grad_sq": lambda: grad_sq.update(layers),
                          "secant": lambda: secant.update(layers)}, settings)
    rows.append(compare_row(SECTION, "EMA tracker (grad_sq) / training step", t["grad_sq"], t["step"], None, note))
    rows.append(compare_row(SECTION, "EMA tracker (secant) / training step", t["secant"], t["step"], None, note))
    # The controller swaps Parameters: the step closure's optimizer follows (state carried).
    t = time_interleaved({"step": train, "decide": decide}, settings)
    rows.append(compare_row(SECTION, "rank controller decision / training step", t["decide"], t["step"], None,
                            note + "; grow one layer 8->10, shrink one 8->6"))
    return rows


def _per_sample(timing: Timing) -> Timing:
    """hessian_traces ran two samples per call: the time of one."""
    return Timing(timing.name, [x / 2 for x in timing.times], timing.number)
