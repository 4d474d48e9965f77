"""Loading a model that does not fit in float32: peak resident memory (RSS) of the load.

A synthetic LLaMA-architecture HF checkpoint (random weights, float32 safetensors in
shards of ~500 MB, model.safetensors.index.json) is written to a temporary folder:

    full    dim 1024, 24 layers, 16 heads (8 kv), SwiGLU 2816, vocab 32000, untied lm_head:
            349M parameters, a 1.39 GB (1330 MiB) checkpoint
    quick   dim 256, 4 layers, SwiGLU 704, vocab 8000: 7M parameters

Each way of loading it to NF4 runs in a fresh Python process, which reports its RSS just
before the load (after the imports: the interpreter and torch's own ~260 MB) and its peak
(VmHWM) after.  A row is (peak - before) / checkpoint bytes:

    streamed      trainers.quantized_load.load_quantized_model(folder, bits=4)
    after-load    quantize_model(load_hf_model(folder), bits=4)

The goal for the streamed load is <= 0.35 of the float32 checkpoint: the NF4 layers, the
float embeddings, norms and lm_head (left in float by quantize_model), plus one tensor.
Always on the CPU (host memory is what is measured), whatever --device says.
`python -m trainers.bench.load MODE FOLDER` is the measuring process.
"""
from __future__ import annotations

import json
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from trainers.bench.timing import Settings, make_row, skip_row
from trainers.models import LlamaConfig, LlamaForCausalLM

SECTION = "load"
ROWS = ("streamed NF4 load peak RSS / fp32 checkpoint", "load then quantize_model peak RSS / fp32 checkpoint",
        "streamed / load-then-quantize peak RSS")
FULL = LlamaConfig(vocab_size=32000, dim=1024, n_layers=24, n_heads=16, n_kv_heads=8, hidden_dim=2816,
                   max_seq_len=2048)
QUICK = LlamaConfig(vocab_size=8000, dim=256, n_layers=4, n_heads=8, n_kv_heads=4, hidden_dim=704, max_seq_len=512)
SHARD_BYTES = 500 * 2 ** 20
MODES = ("streamed", "after-load")
ROOT = Path(__file__).resolve().parents[2]


def write_synthetic_llama(folder: Path, config: LlamaConfig, shard_bytes: int = SHARD_BYTES, seed: int = 0) -> int:
    """A random-weight HF LLaMA checkpoint in `folder` (config.json, sharded float32 safetensors and
    their index), written shard by shard: the whole model is never in memory. Returns its bytes."""
    from safetensors.torch import save_file
    folder.mkdir(parents=True, exist_ok=True)
    hf = dict(model_type="llama", architectures=["LlamaForCausalLM"], vocab_size=config.vocab_size,
              hidden_size=config.dim, num_hidden_layers=config.n_layers, num_attention_heads=config.n_heads,
              num_key_value_heads=config.n_kv_heads, intermediate_size=config.hidden_dim,
              rms_norm_eps=config.norm_eps, max_position_embeddings=config.max_seq_len,
              tie_word_embeddings=config.tie_word_embeddings)
    (folder / "config.json").write_text(json.dumps(hf, indent=1))
    with torch.device("meta"):
        shapes = {name: p.shape for name, p in LlamaForCausalLM(config).named_parameters()}  # = HF keys
    generator = torch.Generator().manual_seed(seed)
    shards, shard = [], {}

    def flush():
        if shard:
            shards.append(dict(shard))
            name = f"model-{len(shards):05d}.safetensors"
            save_file(shard, str(folder / name))
            shards[-1] = {key: name for key in shard}
            shard.clear()
    for key, shape in shapes.items():
        shard[key] = torch.randn(shape, generator=generator) * 0.02
        if sum(t.numel() * 4 for t in shard.values()) >= shard_bytes:
            flush()
    flush()
    weight_map = {key: name for names in shards for key, name in names.items()}
    total = sum((folder / name).stat().st_size for name in set(weight_map.values()))
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=1))
    return total


def _status(field: str) -> int | None:
    """A size field of /proc/self/status ("VmRSS", "VmHWM") in bytes; None off Linux."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _peak_rss() -> int:
    """Peak RSS of this process in bytes. On Linux VmHWM, the high-water mark of this process's
    own memory: ru_maxrss also counts the parent's memory at fork (it survives the exec), so a
    child forked from a large benchmark process reported the parent's RSS as its peak."""
    peak = _status("VmHWM")
    if peak is not None:
        return peak
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss          # KiB on Linux, bytes on macOS
    return peak if platform.system() == "Darwin" else peak * 1024


def _rss() -> int:
    """Current RSS in bytes (Linux; elsewhere the peak so far)."""
    return _status("VmRSS") or _peak_rss()


def measure(mode: str, folder: str) -> dict:
    """Load `folder` to NF4 the `mode` way, in this process: RSS before, peak, seconds."""
    import warnings
    from quantization import memory_report, quantize_model
    from trainers.checkpoints import load_hf_model
    from trainers.quantized_load import load_quantized_model
    warnings.simplefilter("ignore")
    before, start = _rss(), time.perf_counter()
    model = load_quantized_model(folder, bits=4) if mode == "streamed" else quantize_model(load_hf_model(folder), 4)
    seconds = time.perf_counter() - start
    return {"mode": mode, "rss_before": before, "peak_rss": _peak_rss(), "seconds": seconds,
            "model_bytes": memory_report(model).total_bytes}


@dataclass
class LoadMemory:
    """Both loads of one checkpoint, each measured in a fresh process."""
    params: int
    checkpoint_bytes: int
    streamed: dict
    after_load: dict

    def ratio(self, run: dict) -> float:
        return (run["peak_rss"] - run["rss_before"]) / self.checkpoint_bytes


def measure_in_fresh_process(mode: str, folder: Path, timeout: float = 1800) -> dict:
    proc = subprocess.run([sys.executable, "-m", "trainers.bench.load", mode, str(folder)], cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"bench load: the {mode} measurement failed:\n{proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def load_memory(config: LlamaConfig, workdir: Path | None = None) -> LoadMemory:
    """Write the synthetic checkpoint of `config` in a temporary folder, measure both loads, delete it."""
    with tempfile.TemporaryDirectory(dir=workdir, prefix="nanopeft-load-") as tmp:
        folder = Path(tmp) / "checkpoint"
        size = write_synthetic_llama(folder, config)
        runs = {mode: measure_in_fresh_process(mode, folder) for mode in MODES}
    return LoadMemory(size // 4, size, runs["streamed"], runs["after-load"])


def run(settings: Settings) -> list:
    config = QUICK if settings.quick else FULL
    with torch.device("meta"):
        params = sum(p.numel() for p in LlamaForCausalLM(config).parameters())
    free = shutil.disk_usage(tempfile.gettempdir()).free
    if free < 3 * 4 * params:
        reason = f"needs {3 * 4 * params / 1e9:.1f} GB free in {tempfile.gettempdir()}, has {free / 1e9:.1f} GB"
        return [skip_row(SECTION, ROWS[0], reason, "<= 0.35"), skip_row(SECTION, ROWS[1], reason),
                skip_row(SECTION, ROWS[2], reason)]
    m = load_memory(config)
    mb = 2 ** 20
    size = f"{params / 1e6:.0f}M-param LLaMA, {m.checkpoint_bytes / mb:.0f} MiB fp32, NF4, CPU"
    details = {"checkpoint_bytes": m.checkpoint_bytes, "streamed": m.streamed, "after_load": m.after_load}
    s, a = m.ratio(m.streamed), m.ratio(m.after_load)
    return [make_row(SECTION, ROWS[0], s, "<= 0.35" if not settings.quick else None,
                     f"{size}; +{(m.streamed['peak_rss'] - m.streamed['rss_before']) / mb:.0f} MiB over "
                     f"{m.streamed['rss_before'] / mb:.0f} MiB, {m.streamed['seconds']:.1f} s", **details),
            make_row(SECTION, ROWS[1], a, None,
                     f"+{(m.after_load['peak_rss'] - m.after_load['rss_before']) / mb:.0f} MiB, "
                     f"{m.after_load['seconds']:.1f} s"),
            make_row(SECTION, ROWS[2], s / a, "<= 0.5" if not settings.quick else None, "peak increments")]


if __name__ == "__main__":
    if len(sys.argv) != 3 or sys.argv[1] not in MODES:
        raise SystemExit(f"usage: python -m trainers.bench.load {{{','.join(MODES)}}} FOLDER")
    print(json.dumps(measure(sys.argv[1], sys.argv[2])))
