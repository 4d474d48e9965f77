"""Training step: GPT-2 full fine-tuning vs LoRA vs QLoRA here, and vs transformers + PEFT.

One step = forward, next-token loss, backward, AdamW step, zero_grad, batch 4 x 128
(quick: a 2-layer GPT-2, batch 4 x 64; the note says so). Random init: speed does
not depend on the values. Our three configurations are timed interleaved in one
group, and our LoRA with transformers + PEFT in a second group, in the same process;
tokens/s ratios are time ratios inverted (ours tokens/s / theirs).

Peak memory, measured fairly on the CPU: each configuration runs in a FRESH
subprocess (python -m trainers.bench.train_step --memory KIND), which records its
resident set size before building the model, resets the kernel's high-water mark
(writing 5 to /proc/self/clear_refs, Linux), builds the model, runs two steps and
reads the high-water mark (VmHWM). Peak = VmHWM - RSS before the build: weights,
activations, gradients and optimizer state, without the interpreter and libraries.
(tracemalloc does not see torch's allocations, and the process-wide ru_maxrss cannot
be reset, hence fresh processes.) Where clear_refs is not writable the peak is
ru_maxrss - RSS before the build. The subprocesses run with glibc's mmap threshold fixed
(`measurement_env`): by default glibc raises it each time a large block is freed, after which
freed blocks stay in the heap and the peak RSS of the same step varied by 10 MiB between runs
(stories260K: 29-40 MiB); fixed at 64 KiB, every tensor's pages return to the system when it
dies and the RSS follows the live tensors (runs within 1 MiB). On CUDA:
torch.cuda.max_memory_allocated after reset_peak_memory_stats, minus memory_allocated before
the build; on MPS: driver_allocated_memory after the steps minus before the build (no peak
counter there).
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import subprocess
import sys

import torch

from trainers.bench import workloads as W
from trainers.bench.timing import Settings, compare_row, make_row, skip_row, time_interleaved

SECTION = "train_step"
ROWS = ("LoRA tokens/s / full FT tokens/s", "QLoRA step / LoRA step", "LoRA tokens/s / HF+PEFT LoRA tokens/s",
        "LoRA peak memory / full FT peak memory", "QLoRA peak memory / LoRA peak memory",
        "LoRA peak memory / HF+PEFT LoRA peak memory")


def shapes(quick: bool):
    config, note = W.gpt2_bench_config(quick)
    batch, seq = (4, 64) if quick else (4, 128)
    return config, batch, seq, f"{note}, batch {batch}x{seq}"


# ---------------------------------------------------------------------------- memory (child)

def _maxrss_bytes() -> int:
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss        # KiB on Linux, bytes on macOS
    return rss if sys.platform == "darwin" else rss * 1024


def _rss_bytes() -> int:
    """Current RSS; without /proc (macOS) the peak so far, which in a fresh process that has
    only imported libraries is the current size to within the import transients."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return _maxrss_bytes()


def _hwm_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def _reset_hwm() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def measure_memory(kind: str, quick: bool, device_name: str | None, steps: int = 2) -> dict:
    """Peak memory of `steps` training steps of one configuration, in THIS (fresh) process."""
    from trainers.device import Runtime
    rt = Runtime.create(device_name)
    device = rt.device
    config, batch, seq, _ = shapes(quick)
    if kind == W.HF_PEFT:                       # import before the baseline: libraries are not the model
        import peft  # noqa: F401
        import transformers  # noqa: F401
    gc.collect()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        method = "cuda max_memory_allocated - allocated before build"
    elif device.type == "mps":
        before = torch.mps.driver_allocated_memory()
        method = "mps driver_allocated_memory after steps - before build (no peak counter)"
    else:
        before = _rss_bytes()
        method = ("fresh process, VmHWM (reset via /proc/self/clear_refs) - RSS before build"
                  if _reset_hwm() else "fresh process, ru_maxrss - RSS before build")
    model = W.build(kind, config, device)
    step = W.train_step(model, kind, W.token_batch(config.vocab_size, batch, seq, device))
    for _ in range(steps):
        step()
    rt.synchronize()
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device)
    elif device.type == "mps":
        peak = torch.mps.driver_allocated_memory()
    elif method.startswith("fresh process, VmHWM"):
        peak = _hwm_bytes()
    else:
        peak = _maxrss_bytes()
    return {"kind": kind, "peak_bytes": int(peak - before), "method": method}


def measurement_env() -> dict:
    """The environment of a memory-measuring subprocess: this one's, with glibc's mmap threshold
    fixed at 64 KiB unless the caller set it (module docstring; other C libraries ignore it)."""
    return {"MALLOC_MMAP_THRESHOLD_": "65536", **os.environ}


def memory_in_subprocess(kind: str, quick: bool, device_name: str | None) -> dict:
    cmd = [sys.executable, "-m", "trainers.bench.train_step", "--memory", kind]
    if quick:
        cmd.append("--quick")
    if device_name:
        cmd += ["--device", device_name]
    out = subprocess.run(cmd, capture_output=True, text=True, env=measurement_env(), timeout=1800)
    if out.returncode != 0:
        raise RuntimeError(f"memory run of {kind} failed:\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------------------- the section

def run(settings: Settings) -> list:
    device = settings.device
    config, batch, seq, note = shapes(settings.quick)
    idx = W.token_batch(config.vocab_size, batch, seq, device)
    missing = W.hf_available()
    kinds = list(W.OURS) + ([] if missing else [W.HF_PEFT])
    fns = {kind: W.train_step(W.build(kind, config, device), kind, idx) for kind in kinds}
    # Two interleaved groups, so that the pairs that carry targets run next to each other.
    t = time_interleaved({k: fns[k] for k in W.OURS}, settings)
    if not missing:
        vs_hf = time_interleaved({"lora": fns["lora"], W.HF_PEFT: fns[W.HF_PEFT]}, settings)
    tokens = batch * seq
    per_s = {k: f"{tokens / t[k].median:.0f} tok/s" for k in W.OURS}
    rows = [compare_row(SECTION, "LoRA tokens/s / full FT tokens/s", t["full"], t["lora"], None,
                        f"{note}; LoRA {per_s['lora']}, full {per_s['full']}"),
            compare_row(SECTION, "QLoRA step / LoRA step", t["qlora"], t["lora"], "<= 1.3", note)]
    if missing:
        rows.append(skip_row(SECTION, "LoRA tokens/s / HF+PEFT LoRA tokens/s", missing, ">= 1.2"))
    else:
        rows.append(compare_row(SECTION, "LoRA tokens/s / HF+PEFT LoRA tokens/s", vs_hf[W.HF_PEFT],
                                vs_hf["lora"], ">= 1.2", f"{note}; HF+PEFT "
                                f"{tokens / vs_hf[W.HF_PEFT].median:.0f} tok/s, "
                                f"LoRA {tokens / vs_hf['lora'].median:.0f} tok/s"))
    del fns
    gc.collect()

    name = None if device.type == "cpu" and str(device) == "cpu" else str(device)
    mem = {k: memory_in_subprocess(k, settings.quick, name) for k in kinds}
    mb = {k: f"{mem[k]['peak_bytes'] / 2**20:.0f} MiB" for k in kinds}
    method = mem["lora"]["method"]
    rows.append(make_row(SECTION, "LoRA peak memory / full FT peak memory",
                         mem["lora"]["peak_bytes"] / mem["full"]["peak_bytes"], None,
                         f"LoRA {mb['lora']}, full {mb['full']}", method=method,
                         **{f"{k}_peak_bytes": mem[k]["peak_bytes"] for k in kinds}))
    rows.append(make_row(SECTION, "QLoRA peak memory / LoRA peak memory",
                         mem["qlora"]["peak_bytes"] / mem["lora"]["peak_bytes"], None,
                         f"QLoRA {mb['qlora']}", method=method))
    if missing:
        rows.append(skip_row(SECTION, "LoRA peak memory / HF+PEFT LoRA peak memory", missing, "<= 1.0"))
    else:
        rows.append(make_row(SECTION, "LoRA peak memory / HF+PEFT LoRA peak memory",
                             mem["lora"]["peak_bytes"] / mem[W.HF_PEFT]["peak_bytes"], "<= 1.0",
                             f"HF+PEFT {mb[W.HF_PEFT]}; {method}", method=method))
    return rows


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description="child process: peak memory of one training configuration")
    parser.add_argument("--memory", required=True, choices=list(W.OURS) + [W.HF_PEFT])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--device", default=None)
    args = parser.parse_args(argv)
    print(json.dumps(measure_memory(args.memory, args.quick, args.device)))


if __name__ == "__main__":
    main()
