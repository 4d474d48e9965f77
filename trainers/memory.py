"""What a run costs in memory: the device's peak, and the training state counted exactly.

    reset_peak_memory(device)            # at the start of a run (train() does it)
    peak, kind = peak_memory(device)     # at its end
    training_state_bytes(model)          # weights as stored + gradients + AdamW moments

The peak is what the device reports: CUDA's allocator peak, a sampled MPS maximum, or on
the CPU the resident-set high-water mark, which includes the Python and PyTorch runtime.
The training state is what grows with the model (no activations): the number the memory
ablation compares across methods, independent of the runtime and the allocator.
"""
from __future__ import annotations

import contextlib
import resource
import sys

import torch
import torch.nn as nn

from allocation.budget import training_bytes
from quantization.model import memory_report


def reset_peak_memory(device: torch.device) -> None:
    """Start a new peak where the device allows it: CUDA's allocator statistics; on Linux the
    process's resident-set high-water mark (5 to /proc/self/clear_refs, Linux >= 4.0), which
    otherwise only grows within a process, and which a child process even inherits across
    fork + exec. Elsewhere the CPU peak stays process-wide (trainers/isolated.py runs a run in
    a fresh process for that)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    elif device.type == "cpu" and sys.platform.startswith("linux"):
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
        except OSError:                 # an old kernel or a locked-down /proc: the peak stays process-wide
            pass


def peak_memory(device: torch.device, mps_seen: int = 0) -> tuple[int, str]:
    """(bytes, what was measured): the CUDA allocator's peak, the largest MPS driver
    allocation seen (MPS keeps no peak: the loop samples it at every log step and passes
    the maximum as `mps_seen`), or the process's peak resident set size on the CPU (since
    the last reset_peak_memory on Linux; process-wide elsewhere)."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device)), "cuda_max_allocated"
    if device.type == "mps":
        return max(int(torch.mps.driver_allocated_memory()), mps_seen), "mps_driver_allocated_max_sampled"
    if sys.platform.startswith("linux"):
        # VmHWM: this address space's high-water mark (reset by reset_peak_memory). Not ru_maxrss,
        # which also holds the peak of the parent a spawned child was forked from.
        with contextlib.suppress(OSError, StopIteration, ValueError):
            with open("/proc/self/status") as f:
                line = next(line for line in f if line.startswith("VmHWM:"))
            return int(line.split()[1]) * 1024, "cpu_peak_rss"          # kB
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss   # KiB on Linux, bytes on macOS
    return int(rss if sys.platform == "darwin" else rss * 1024), "cpu_peak_rss"


def trainable_bytes(model: nn.Module) -> int:
    """Bytes of the trainable parameters: what an adapter file (or a full fine-tune) stores."""
    return sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)


def training_state_bytes(model: nn.Module) -> dict[str, int]:
    """What training holds besides activations, counted exactly: every weight as stored (a
    quantized layer's packed codes and constants, quantization.memory_report), plus a gradient
    and AdamW's two moments per trainable parameter (allocation.budget.training_bytes)."""
    weights = memory_report(model).total_bytes
    grads = optimizer = 0
    for p in model.parameters():
        if p.requires_grad:
            n, size = p.numel(), p.element_size()
            grads += n * size
            optimizer += training_bytes(n, size) - 2 * n * size      # the two moments, in the weight's dtype
    return {"state_bytes": weights + grads + optimizer, "state_weight_bytes": weights,
            "state_grad_bytes": grads, "state_optimizer_bytes": optimizer}
