"""How fast a trained model answers: inference speed, adapters unmerged and merged.

    speed = inference_speed(model, data, batch_size=8, iters=3)    # {inference_...: value}

    lm, summarization         tokens/s of greedy generation (`model.generate`, KV cache) of
                              `new_tokens` tokens after a prompt of `prompt_tokens`
    classification, qa, ...   examples/s of one forward pass over eval examples

each at batch 1 and at `batch_size`, with the adapters as trained (unmerged: base + B A on
every call) and merged (a deep copy with every adapter folded into its base by
lora.merge_lora_weights, so the run's model and its saved files are untouched). Merging a
quantized base gives a float layer holding the dequantized W0 + delta W: the merged numbers
then describe a float model in the adapted layers, which `inference_merged_base` says.

Measured briefly, for the run's report (one warm-up call, then the median of `iters` timed
calls): not a benchmark, which trainers/bench is. Training throughput (tokens_per_s,
examples_per_s of the summary) is another number: forward and backward, at the training batch.
"""
from __future__ import annotations

import copy
import statistics
import time

import torch
import torch.nn as nn

from lora.merge import merge_lora_weights
from lora.targets import adapter_layers
from trainers.device import Runtime
from trainers.prepare import base_bits

GENERATING = ("lm", "summarization")           # timed as greedy generation; every other kind as a forward pass


def _timed(call, rt: Runtime, iters: int) -> float:
    """Median seconds of `call()` after one warm-up call."""
    call()
    rt.synchronize()
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        call()
        rt.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _speeds(model: nn.Module, data, kind: str, batch_size: int, iters: int, rt: Runtime,
            prompt_tokens: int, new_tokens: int) -> dict[str, float]:
    """{b1, batched: units per second, latency_b1: seconds} for one model."""
    out = {}
    for label, size in (("b1", 1), ("batched", batch_size)):
        batch = {k: v.to(rt.device) for k, v in _examples(data, size).items()}
        if kind in GENERATING:
            prompt = batch["input_ids"][:, :prompt_tokens]

            def call():
                model.generate(prompt, new_tokens, temperature=0.0)
            units = size * new_tokens
        else:
            mask = {"attention_mask": batch["attention_mask"]} if "attention_mask" in batch else {}

            def call():
                model(batch["input_ids"], **mask)
            units = size
        with torch.no_grad(), rt.autocast():
            seconds = _timed(call, rt, iters)
        out[label] = units / seconds
        if size == 1:
            out["latency_b1"] = seconds
    return out


def _examples(data, size: int) -> dict:
    """The first `size` eval examples of a trainers.data.TaskData; for a task without an eval
    split to collate (the planted task), a first training batch."""
    if callable(getattr(data, "collate", None)):
        return data.collate("eval", list(range(size)))
    return next(iter(data.batches("train", size, shuffle=False, seed=0)))


def inference_speed(model: nn.Module, data, *, batch_size: int = 8, iters: int = 3, rt: Runtime | None = None,
                    prompt_tokens: int = 16, new_tokens: int = 16) -> dict:
    """The inference columns of a run (module docstring); {} when iters is 0. A task of another
    kind (the planted regression) is timed as a forward pass, in examples/s."""
    kind = getattr(getattr(data, "spec", None), "kind", None)
    if kind in GENERATING and not callable(getattr(model, "generate", None)):
        kind = None                                    # an LM that cannot generate: time its forward pass
    if iters < 1:
        return {}
    if callable(getattr(data, "num_examples", None)):
        batch_size = max(1, min(batch_size, data.num_examples("eval")))
    rt = rt or Runtime.create(str(next(model.parameters()).device), None)
    was_training = model.training
    model.eval()
    try:
        unmerged = _speeds(model, data, kind, batch_size, iters, rt, prompt_tokens, new_tokens)
        quantized = bool(base_bits(model))
        adapted = bool(adapter_layers(model))
        merged_model = merge_lora_weights(copy.deepcopy(model)) if adapted else model
        merged = _speeds(merged_model, data, kind, batch_size, iters, rt, prompt_tokens, new_tokens)
        del merged_model
    finally:
        model.train(was_training)
    return {
        "inference_unit": "tokens/s" if kind in GENERATING else "examples/s",
        "inference_b1_per_s": unmerged["b1"], "inference_batched_per_s": unmerged["batched"],
        "inference_b1_merged_per_s": merged["b1"], "inference_batched_merged_per_s": merged["batched"],
        "inference_latency_ms_b1": 1000.0 * unmerged["latency_b1"],
        "inference_batch_size": batch_size,
        "inference_merged_base": ("no adapters (merged = unmerged)" if not adapted else
                                  "adapted layers dequantized to float" if quantized else "float"),
    }
