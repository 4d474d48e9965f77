"""Several processes (trainers/distributed.py): 2 CPU processes on gloo, started here, against
one process with the same global batch.

Each run records, after every optimizer step, the loss and the adapters' ranks and masks. The
two ranks must agree exactly at every step (a decision on one rank only would corrupt
training), and both must follow the single process within float tolerance.
"""
import json
import os
import socket
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn
import torch.nn.functional as F

from allocation import AdaLoRAAllocator, AdaLoRAConfig, ControllerConfig, CurvatureRankAllocator, SparsityAllocator
from allocation.allocator import no_reduce
from allocation.curvature import CurvatureTracker
from lora.model import add_lora_to_model
from trainers import distributed
from trainers.train import TrainConfig, epoch_batches, train

V, D, T, STEPS, BATCH = 13, 16, 6, 6, 8
pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="needs torch.distributed with gloo")


class TinyLM(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(V, D)
        self.blocks = nn.Sequential(nn.Linear(D, D), nn.Tanh(), nn.Linear(D, D), nn.Tanh(), nn.Linear(D, D))
        self.head = nn.Linear(D, V)

    def forward(self, idx, targets=None, attention_mask=None):
        logits = self.head(torch.tanh(self.blocks(self.emb(idx))))
        loss = None if targets is None else F.cross_entropy(logits.reshape(-1, V), targets.reshape(-1))
        return logits, loss


def build(method):
    """(model, allocator factory) for `method`, seeded: the same on every process."""
    torch.manual_seed(0)
    model = TinyLM()
    targets = ["blocks.0", "blocks.2", "blocks.4"]
    if method == "lora":
        add_lora_to_model(model, target_modules=targets, r=4)
        return model, None
    if method == "adalora":
        add_lora_to_model(model, target_modules=targets, method="adalora", r=4)
        return model, AdaLoRAAllocator(model, AdaLoRAConfig(init_r=4, target_r=2, tinit=1, tfinal=1),
                                       total_steps=STEPS)
    if method == "draftq":
        add_lora_to_model(model, target_modules=targets, r=2)
        return model, CurvatureRankAllocator(model, ControllerConfig(interval=2, r_min=1, r_max=8, rank_step=2))
    if method == "sparse":
        add_lora_to_model(model, target_modules=targets, method="sparse", r=4)
        return model, SparsityAllocator(model, total_steps=STEPS, final_sparsity=0.6)
    raise ValueError(method)


def data():
    g = torch.Generator().manual_seed(1)
    x = torch.randint(0, V, (64, T), generator=g)
    return {"input_ids": x, "labels": (x * 5 + 3) % V}


def adapter_state(model):
    """Every adapter's rank and mask buffers: what a decision changes."""
    out = {}
    for name, module in model.named_modules():
        if hasattr(module, "lora_A"):
            out[name + ".rank"] = int(module.rank)
            for bname, buf in module.named_buffers(recurse=False):
                out[f"{name}.{bname}"] = buf.detach().clone()
    return out


def run(method, grad_accum=1, out_dir=None, resume=False, steps=STEPS, parallel="ddp"):
    """Train `method`; returns (per-step losses, per-step adapter states, final trainable values)."""
    model, allocator = build(method)
    states = []
    if allocator is not None:
        after = allocator.after_step

        def recorded(step, m, opt):
            after(step, m, opt)
            states.append(adapter_state(m))
        allocator.after_step = recorded
    cfg = TrainConfig(steps=steps, batch_size=BATCH, grad_accum=grad_accum, lr=1e-2, warmup_steps=0,
                      schedule="constant", eval_every=0, checkpoint_every=2 if out_dir else 0, device="cpu",
                      progress=False, parallel=parallel)
    result = train(model, epoch_batches(data(), BATCH, seed=3), cfg, allocator=allocator, out_dir=out_dir,
                   resume=resume)
    final = {n: p for n, p in distributed.gathered(model).items() if "lora_" in n}      # the adapters, whole
    held = sum((p.to_local() if hasattr(p, "to_local") else p).numel() for p in model.parameters())
    return [r["loss"] for r in result.loss_log], states, final, {**result.metrics, "held": held}


# what the 2 processes run, in one process group (starting processes costs seconds):
# name -> (method, grad_accum, checkpoint folder name, resume, steps, parallel)
JOBS = {m: (m, 1, None, False, STEPS, "ddp") for m in ("lora", "adalora", "draftq", "sparse")}
JOBS.update({"accum": ("lora", 2, None, False, STEPS, "ddp"),
             "whole": ("draftq", 1, "whole", False, STEPS, "ddp"),
             "first_part": ("draftq", 1, "stopped", False, 4, "ddp"),
             "resumed": ("draftq", 1, "stopped", True, STEPS, "ddp"),
             "fsdp": ("lora", 1, None, False, STEPS, "fsdp")})


def _worker(rank, world, port, folder):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    try:
        out = {}
        for name, (method, grad_accum, ckpt, resume, steps, parallel) in JOBS.items():
            out_dir = os.path.join(folder, ckpt) if ckpt else None
            out[name] = run(method, grad_accum, out_dir, resume, steps, parallel)
        try:
            run("draftq", parallel="fsdp")
        except ValueError as error:
            out["fsdp_refused"] = str(error)
        model, _ = build("lora")                    # what DDP sends: the adapters only
        with torch.no_grad():
            model.blocks[0].base_layer.weight.add_(rank)   # a frozen weight that differs by rank
        net = distributed.wrap(model, torch.device("cpu"))
        out["ddp"] = {"bytes": net._get_ddp_logging_data()["total_parameter_size_bytes"],
                      "base": model.blocks[0].base_layer.weight.detach().clone()}
        torch.save(out, os.path.join(folder, f"rank{rank}.pt"))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def two(tmp_path_factory):
    """Every job of JOBS on 2 gloo processes: [rank 0's results, rank 1's], each {job: run(...)}."""
    folder = tmp_path_factory.mktemp("ddp")
    mp.start_processes(_worker, args=(2, free_port(), str(folder)), nprocs=2, start_method="spawn")
    return [torch.load(folder / f"rank{r}.pt", weights_only=False) for r in range(2)]


def assert_same_states(a, b, exact=True):
    assert len(a) == len(b)
    for step, (sa, sb) in enumerate(zip(a, b)):
        assert sa.keys() == sb.keys()
        for key in sa:
            if torch.is_tensor(sa[key]) and not exact and sa[key].is_floating_point():
                torch.testing.assert_close(sa[key], sb[key], atol=1e-5, rtol=1e-5)
            else:
                assert torch.equal(torch.as_tensor(sa[key]), torch.as_tensor(sb[key])), (step, key)


@pytest.mark.parametrize("method", ["lora", "adalora", "draftq", "sparse"])
def test_two_processes_match_one_process_and_each_other(two, method):
    single_losses, single_states, single_final, _ = run(method)
    (l0, s0, f0, m0), (l1, s1, f1, _) = two[0][method], two[1][method]
    assert l0 == l1                                            # the logged loss is the all-reduced one
    assert_same_states(s0, s1)                                 # every decision, bit for bit, on both ranks
    for n in f0:
        assert torch.equal(f0[n], f1[n]), n                    # the replicas never drift apart
    torch.testing.assert_close(torch.tensor(l0), torch.tensor(single_losses), atol=1e-5, rtol=1e-5)
    assert_same_states(s0, single_states, exact=False)         # and they are the single process's decisions
    for n in f0:
        torch.testing.assert_close(f0[n], single_final[n], atol=1e-5, rtol=1e-5)
    assert m0["world_size"] == 2
    if method == "adalora":
        assert len({tuple(int(s[k].sum()) for k in s if k.endswith(".rank_mask")) for s in s0}) > 1   # it pruned
    if method == "draftq":
        assert len({tuple(s[k] for k in s if k.endswith(".rank")) for s in s0}) > 1                 # it resized


def test_only_adapters_travel(two):
    """DDP's buckets hold the adapters' bytes only, and wrapping does not overwrite rank 1's
    (deliberately different) frozen weight with rank 0's."""
    model, _ = build("lora")
    adapter_bytes = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    assert two[0]["ddp"]["bytes"] == two[1]["ddp"]["bytes"] == adapter_bytes
    torch.testing.assert_close(two[1]["ddp"]["base"], two[0]["ddp"]["base"] + 1)


def test_fsdp_lora_on_a_float_base_matches_one_process(two):
    """fully_shard: each rank holds half of every parameter, and training follows one process."""
    single, _, single_final, _ = run("lora")
    (l0, _, f0, _), (l1, _, f1, _) = two[0]["fsdp"], two[1]["fsdp"]
    assert l0 == l1 and all(torch.equal(f0[n], f1[n]) for n in f0)
    assert two[0]["fsdp"][3]["held"] + two[1]["fsdp"][3]["held"] == two[0]["lora"][3]["held"]   # shards
    torch.testing.assert_close(torch.tensor(l0), torch.tensor(single), atol=1e-5, rtol=1e-5)
    for n in single_final:
        torch.testing.assert_close(f0[n], single_final[n], atol=1e-5, rtol=1e-5)
    assert "adaptive allocator" in two[0]["fsdp_refused"]


def test_accumulation_across_processes(two):
    """grad_accum=2 (DDP's no_sync on the first micro-batch) still follows one process."""
    single, _, _, _ = run("lora", grad_accum=2)
    torch.testing.assert_close(torch.tensor(two[0]["accum"][0]), torch.tensor(single), atol=1e-5, rtol=1e-5)


def test_resume_across_processes(two):
    """Rank 0 writes the checkpoint; both ranks resume from it (after a resize) to the losses
    of the run that never stopped."""
    whole, resumed = two[0]["whole"][0], two[0]["resumed"][0]
    assert resumed == two[1]["resumed"][0] and len(resumed) == STEPS
    torch.testing.assert_close(torch.tensor(resumed), torch.tensor(whole), atol=1e-6, rtol=1e-6)


# ----------------------------------------------------------------------------- one process

def test_shard_batch_splits_rows_and_refuses_uneven_batches():
    batch = {"input_ids": torch.arange(8).view(4, 2), "labels": torch.arange(8).view(4, 2)}
    parts = [distributed.shard_batch(batch, distributed.World(r, 2)) for r in range(2)]
    assert torch.equal(torch.cat([p["input_ids"] for p in parts]), batch["input_ids"])
    with pytest.raises(ValueError, match="multiple of the world size"):
        distributed.shard_batch(batch, distributed.World(0, 3))


def test_world_from_env_names_the_bad_variable():
    assert distributed.world_from_env({}) == distributed.World(0, 1, 0)
    assert distributed.world_from_env({"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1"}).rank == 1
    with pytest.raises(ValueError, match="WORLD_SIZE"):
        distributed.world_from_env({"WORLD_SIZE": "two"})
    with pytest.raises(ValueError, match="RANK=2"):
        distributed.world_from_env({"RANK": "2", "WORLD_SIZE": "2"})


def test_curvature_scores_come_from_the_reduced_signal():
    """The EMA is fed reduce(signal), not the process's own signal."""
    layer = nn.Linear(2, 2)
    layer.adapter_parameters = lambda: [layer.weight]
    layer.weight.grad = torch.ones(2, 2)
    own, reduced = CurvatureTracker(), CurvatureTracker()
    own.update([("l", layer)])
    reduced.update([("l", layer)], reduce=lambda t: (t + 3.0) / 2)        # as if another rank saw 3.0
    assert own.scores() == {"l": 1.0} and reduced.scores() == {"l": 2.0}


def test_adalora_importance_comes_from_the_reduced_sensitivity():
    model, allocator = build("adalora")
    with torch.no_grad():
        for _, layer in allocator.layers:
            layer.lora_E.fill_(0.5)                 # E starts at 0, so would every sensitivity
    model(torch.zeros(2, T, dtype=torch.long), targets=torch.zeros(2, T, dtype=torch.long))[1].backward()
    allocator.update_importance()
    own = {k: v.clone() for k, v in allocator.ipt.items()}
    _, other = build("adalora")
    other.layers = allocator.layers
    other.reduce = lambda t: t * 0
    other.update_importance()
    assert any(v.abs().sum() > 0 for v in own.values())
    assert all(v.abs().sum() == 0 for v in other.ipt.values())
    assert allocator.reduce is no_reduce


def test_single_process_leaves_the_allocators_unreduced():
    _, allocator = build("draftq")
    _, _, _, metrics = run("lora", steps=1)
    assert allocator.reduce is no_reduce and metrics["world_size"] == 1


def test_torchrun_cli_run_writes_one_run_folder_with_its_world_size(tmp_path, shared_data):
    """`torchrun --nproc_per_node=2 -m trainers run ...`: rank 0 writes the folder (and its
    checkpoint), and config.json and metrics.json record the world size."""
    results = tmp_path / "results"
    env = {**os.environ, "PYTHONPATH": os.getcwd(), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
           f"--master_port={free_port()}", "-m", "trainers", "run", "--config", "B-FP", "--task", "sst2",
           "--model", "gpt2-tiny", "--results", str(results), "--steps", "4", "--batch-size", "8",
           "--limit", "64", "--max-length", "32", "--eval-examples", "16", "--no-progress", "--device", "cpu",
           "--checkpoint-every", "2", "--data-dir", str(shared_data)]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.count("results:") == 1                                   # one report, from rank 0
    folder = results / "sst2__B-FP"
    assert json.loads((folder / "config.json").read_text())["world_size"] == 2
    assert json.loads((folder / "metrics.json").read_text())["world_size"] == 2
    assert (folder / "checkpoint.pt").exists() and (folder / "adapter_model.safetensors").exists()


def test_run_experiment_refuses_fsdp_before_touching_the_folder(tmp_path, monkeypatch):
    from trainers.configs import get_config
    from trainers.experiments import run_experiment
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    cfg = TrainConfig(steps=1, device="cpu", parallel="fsdp")
    with pytest.raises(ValueError, match="parallel='fsdp'"):
        run_experiment(get_config("B-FP"), None, None, cfg, tmp_path / "run")
    assert not (tmp_path / "run").exists()
    with pytest.raises(ValueError, match="parallel"):
        TrainConfig(parallel="zero3")
