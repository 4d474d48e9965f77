"""Check trainers.plan against measured peaks: one fresh process per point.

    python -m trainers.plan_check            the table below, a few minutes on one CPU core

Each point runs in its own Python process (so nothing an earlier point allocated, cached or
fragmented counts), on the CPU, with one thread:
    1. import torch and run a tiny model's forward, backward and AdamW step, so kernels,
       thread pools and autograd's engine are set up; read the resident set size (VmRSS);
    2. build the point's model (seeded, random weights), plan it (trainers.plan.plan_memory),
       prepare it as an experiment would (trainers.experiments.prepare: quantize, adapters);
    3. reset the kernel's peak-RSS counter (writing 5 to /proc/self/clear_refs, Linux >= 4.0),
       so building and quantizing in float32 does not count;
    4. train a few steps with trainers.train.train, then read the peak (VmHWM).
measured = peak - the RSS of step 1: what the model, its data and training added.

glibc's malloc keeps freed memory for reuse and raises its mmap threshold as large blocks
are freed, so RSS would lag behind what is live; MALLOC_MMAP_THRESHOLD_ fixes the threshold
(128 KiB), so every large tensor is its own mapping, returned to the kernel when freed.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys

POINTS = [   # family, config overrides, plan options; sizes where tensors dominate the process's overhead
    dict(family="gpt2", config=dict(n_layer=6, n_head=6, n_embd=384, vocab_size=8192, block_size=256),
         method="full", batch=4, seq=128),
    dict(family="gpt2", config=dict(n_layer=6, n_head=6, n_embd=384, vocab_size=8192, block_size=256),
         method="lora", batch=8, seq=128),
    dict(family="gpt2", config=dict(n_layer=6, n_head=6, n_embd=384, vocab_size=8192, block_size=256),
         method="qlora", batch=8, seq=256),
    dict(family="llama", config=dict(dim=384, n_layers=6, n_heads=6, n_kv_heads=2, hidden_dim=1024,
                                     vocab_size=8192, max_seq_len=256), method="lora", batch=4, seq=256),
    dict(family="llama", config=dict(dim=384, n_layers=6, n_heads=6, n_kv_heads=2, hidden_dim=1024,
                                     vocab_size=8192, max_seq_len=256), method="full", batch=4, seq=128,
         grad_checkpointing=True),
    dict(family="llama", config=dict(dim=384, n_layers=6, n_heads=6, n_kv_heads=2, hidden_dim=1024,
                                     vocab_size=8192, max_seq_len=256), method="dora", bits=4, batch=8, seq=128),
]
MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": str(128 * 1024), "OMP_NUM_THREADS": "1"}


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        return int(re.search(rf"^{field}:\s+(\d+) kB", f.read(), re.M).group(1))


def _warm_up() -> None:
    import torch
    from trainers.models import GPT2Config, LlamaConfig, build_model
    for family, cfg in (("gpt2", GPT2Config.tiny()), ("llama", LlamaConfig.tiny())):
        model = build_model(family, cfg)
        idx = torch.randint(0, cfg.vocab_size, (2, 8))
        model(idx, targets=idx)[1].backward()
        opt = torch.optim.AdamW(model.parameters())
        opt.step()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)


def measure_here(point: dict, steps: int = 2) -> dict:
    """Steps 1-4 of the module docstring in this process; returns planned and measured bytes."""
    import gc

    import torch
    from trainers.configs import ExperimentConfig
    from trainers.prepare import prepare
    from trainers.models import GPT2Config, LlamaConfig, build_model
    from trainers.plan import PlanConfig, plan_memory
    from trainers.train import TrainConfig, train

    torch.set_num_threads(1)
    _warm_up()
    gc.collect()
    base = _status_kib("VmRSS") * 1024
    torch.manual_seed(0)
    cls = GPT2Config if point["family"] == "gpt2" else LlamaConfig
    model = build_model(point["family"], cls(**point["config"]))
    method, bits = point["method"], point.get("bits")
    cfg = PlanConfig(model="(measured)", method=method, bits=bits, rank=point.get("rank", 8), batch=point["batch"],
                     seq=point["seq"], grad_checkpointing=point.get("grad_checkpointing", False),
                     paged_adamw=point.get("paged_adamw", False), foreach=False,   # CPU: per-tensor AdamW
                     device="cpu")
    plan = plan_memory(cfg, model)
    exp = ExperimentConfig("check", method="lora" if method == "qlora" else method, r=cfg.rank,
                           quant=4 if method == "qlora" else bits)
    model, _ = prepare(model, exp)
    V, B, T = cls(**point["config"]).vocab_size, cfg.batch, cfg.seq
    data = torch.randint(0, V, (B * steps, T), generator=torch.Generator().manual_seed(1))

    def batches(epoch):
        for i in range(steps):
            x = data[i * B:(i + 1) * B]
            yield {"input_ids": x, "labels": x}
    gc.collect()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")                                           # peak RSS := current RSS
    train(model, batches, TrainConfig(steps=steps, device="cpu", progress=False, warmup_steps=0, eval_every=0,
                                      grad_checkpointing=cfg.grad_checkpointing, paged_adamw=cfg.paged_adamw))
    return {"planned": plan.total, "phase": plan.peak_phase, "measured": _status_kib("VmHWM") * 1024 - base}


def measure(point: dict, steps: int = 2, timeout: float = 600) -> dict:
    """measure_here(point) in a fresh Python process (see the module docstring)."""
    env = {**os.environ, **MALLOC_ENV}
    code = "import json, sys; from trainers.plan_check import measure_here; " \
           "print(json.dumps(measure_here(json.loads(sys.argv[1]), int(sys.argv[2]))))"
    out = subprocess.run([sys.executable, "-c", code, json.dumps(point), str(steps)], env=env,
                         capture_output=True, text=True, timeout=timeout)
    if out.returncode != 0:
        raise RuntimeError(f"plan_check: the point {point} failed:\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def describe(point: dict) -> str:
    c = point["config"]
    size = f"{c.get('n_layer', c.get('n_layers'))}x{c.get('n_embd', c.get('dim'))}"
    extra = (" ckpt" if point.get("grad_checkpointing") else "") + (f" {point['bits']}-bit" if point.get("bits") else "")
    return f"{point['family']} {size} {point['method']}{extra} b{point['batch']} s{point['seq']}"


def main() -> int:
    if not sys.platform.startswith("linux"):
        print("plan_check: needs Linux (/proc/self/status, /proc/self/clear_refs)", file=sys.stderr)
        return 2
    print(f"{'point':<38} {'planned MiB':>12} {'measured MiB':>13} {'ratio':>6}  peak phase (planned)")
    worst = 0.0
    for point in POINTS:
        r = measure(point)
        ratio = r["planned"] / r["measured"]
        worst = max(worst, abs(ratio - 1))
        print(f"{describe(point):<38} {r['planned'] / 2**20:12.1f} {r['measured'] / 2**20:13.1f} {ratio:6.3f}  "
              f"{r['phase']}")
    print(f"largest relative error: {100 * worst:.1f} %")
    return 0


if __name__ == "__main__":
    sys.exit(main())
