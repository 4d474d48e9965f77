"""Several processes: data parallelism with torch.distributed (torchrun), in one small module.

    torchrun --nproc_per_node=N -m trainers run ...

torchrun starts N copies of the program and gives each RANK, WORLD_SIZE, LOCAL_RANK and
MASTER_ADDR/MASTER_PORT. Every process holds the whole model; each optimizer step:

    global batch (B rows, the same on every rank)  ->  rank k keeps rows [k B/N, (k+1) B/N)
    forward/backward on its shard                  ->  g_k = dL_k/dθ
    DistributedDataParallel all-reduces            ->  g = (1/N) sum_k g_k  on every rank
    the same AdamW step on every rank              ->  θ stays identical everywhere

When every shard has the same number of counted tokens (fixed-length rows, no padding),
mean_k L_k is the loss of the whole batch, so N processes follow a single process with
batch B step for step (up to float rounding of the sums). With padding DDP weighs each
shard equally, as every data-parallel trainer does.

What travels: DDP registers only parameters with requires_grad, so only the adapters'
gradients are all-reduced; the frozen base (float, 8-bit or NF4) never leaves its process.
Buffers are not broadcast either (`wrap`): the adapters' masks change only by decisions
every rank makes identically (below), and a quantized base keeps its weights in buffers.

The adaptive allocators decide from statistics (AdaLoRA's importance EMAs, the curvature
EMA, Sparse LoRA's magnitudes). A decision taken on one rank only would change the
parameter shapes or masks there and corrupt training silently, so each allocator has a
`reduce` hook (allocation/allocator.py) that the trainer sets to `all_reduce_mean`: every
rank decides from the same, all-reduced numbers, bit for bit.

FSDP (`parallel="fsdp"`, torch's fully_shard, Zhao et al. 2023): instead of a whole copy,
each rank keeps 1/N of every parameter, the frozen base included, and gathers a layer's
weights just for its forward and backward; gradients are reduce-scattered. That is what
lets a float base too big for one device train. Here it is offered for plain LoRA on a
float base without checkpoints (`check_fsdp`): the allocators resize and mask parameters
that FSDP keeps as flat shards, and checkpoints would need the gathered state.

DDP caches parameter shapes in its gradient buckets, so after an allocator resizes layers
(fresh Parameters, allocation/resize.py) the trainer wraps the model in a new DDP.

Backend: NCCL on CUDA, gloo on the CPU. Rank 0 writes results and checkpoints; the others
wait at a barrier (`is_main`, `barrier`).
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn as nn

from lora.targets import adapter_layers


@dataclass(frozen=True)
class World:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def world_from_env(env=os.environ) -> World:
    """The process's place in the run from torchrun's variables (a single process when unset)."""
    values = {}
    for key, default in (("RANK", 0), ("WORLD_SIZE", 1), ("LOCAL_RANK", 0)):
        text = env.get(key, str(default))
        try:
            values[key] = int(text)
        except ValueError:
            raise ValueError(f"distributed: environment variable {key} must be an int, got {text!r}") from None
    world = World(values["RANK"], values["WORLD_SIZE"], values["LOCAL_RANK"])
    if world.world_size < 1 or not 0 <= world.rank < world.world_size:
        raise ValueError(f"distributed: RANK={world.rank} must be in [0, WORLD_SIZE={world.world_size})")
    return world


def backend_for(device: torch.device) -> str:
    return "nccl" if device.type == "cuda" else "gloo"


def init(device: torch.device) -> World:
    """Join the process group torchrun described (no-op for a single process); on CUDA the
    process takes the GPU cuda:LOCAL_RANK. Returns the World."""
    world = world_from_env()
    if world.world_size == 1 or (dist.is_available() and dist.is_initialized()):
        return current()
    if not dist.is_available():
        raise RuntimeError(f"distributed: WORLD_SIZE={world.world_size} but this torch has no torch.distributed")
    if device.type == "cuda":
        torch.cuda.set_device(world.local_rank)
    dist.init_process_group(backend_for(device), rank=world.rank, world_size=world.world_size)
    return world


def current() -> World:
    """The World of the initialised process group, or a single process."""
    if not (dist.is_available() and dist.is_initialized()):
        return World()
    return World(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0)))


def is_main() -> bool:
    return current().is_main


def barrier() -> None:
    if current().world_size > 1:
        dist.barrier()


def all_reduce_mean(tensor: torch.Tensor) -> torch.Tensor:
    """The mean of `tensor` over all processes (a new tensor; the input itself for one process).
    Integer and bool tensors are averaged in float32 and returned as float32."""
    if current().world_size == 1:
        return tensor
    out = tensor.detach().clone() if tensor.is_floating_point() else tensor.detach().float()
    dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out.div_(dist.get_world_size())


def shard_batch(batch: dict, world: World) -> dict:
    """Rank k's contiguous share of a global batch: rows [k B/N, (k+1) B/N) of every tensor."""
    if world.world_size == 1:
        return batch
    rows = {name: t.shape[0] for name, t in batch.items() if torch.is_tensor(t)}
    n = next(iter(rows.values()))
    if any(r != n for r in rows.values()) or n % world.world_size:
        raise ValueError(f"distributed: a batch of {rows} rows cannot be split evenly over {world.world_size} "
                         f"processes; make batch_size (the global batch) a multiple of the world size")
    size = n // world.world_size
    lo = world.rank * size
    return {name: (t[lo:lo + size] if torch.is_tensor(t) else t) for name, t in batch.items()}


def trainable_signature(model: nn.Module) -> list[tuple[int, tuple]]:
    """What DDP's buckets were built from: each trainable parameter's identity and shape."""
    return [(id(p), tuple(p.shape)) for p in model.parameters() if p.requires_grad]


def wrap(model: nn.Module, device: torch.device) -> nn.Module:
    """`model` inside DistributedDataParallel. Only requires_grad parameters enter its gradient
    buckets anyway; the frozen parameters and every buffer are also kept out of the broadcast DDP
    does when it wraps (and the trainer wraps again after each resize): each rank has loaded
    the same base, so sending it from rank 0 would only cost time."""
    from torch.nn.parallel import DistributedDataParallel as DDP
    frozen = [n for n, p in model.named_parameters() if not p.requires_grad]
    DDP._set_params_and_buffers_to_ignore_for_model(model, frozen + [n for n, _ in model.named_buffers()])
    ids = [device.index if device.index is not None else torch.cuda.current_device()] if device.type == "cuda" \
        else None
    return DDP(model, device_ids=ids)


PARALLEL = ("ddp", "fsdp")


def check_fsdp(model: nn.Module, allocator, checkpoint_every: int, resume: bool) -> None:
    """What parallel="fsdp" supports, refused by name before anything is sharded."""
    problems = []
    if allocator is not None and type(allocator).__name__ != "NullAllocator":
        problems.append(f"an adaptive allocator ({type(allocator).__name__}) resizes or masks sharded parameters")
    if checkpoint_every > 0 or resume:
        problems.append("checkpoints (checkpoint_every > 0, resume) need the gathered state")
    frozen = [n for n, p in model.named_parameters() if not p.requires_grad]
    odd = [n for n, b in model.named_buffers() if not b.is_floating_point() and b.numel() > 1]
    if not frozen or odd:
        problems.append(f"it is for LoRA on a float base (found {'no frozen base' if not frozen else odd[:2]})")
    if problems:
        raise ValueError("train: parallel='fsdp' supports plain LoRA on a float base only: "
                         + "; ".join(problems) + "; use parallel='ddp'")


def shard(model: nn.Module) -> nn.Module:
    """FSDP2 in place: each adapter layer (its base and factors) is one group, the rest of the
    model the root group. The parameters become DTensors (1/N of each on this rank)."""
    from torch.distributed.fsdp import fully_shard
    for _, layer in adapter_layers(model):
        fully_shard(layer)
    fully_shard(model)
    return model


def gathered(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter whole (DTensor shards gathered; plain tensors as they are), on every rank."""
    return {n: (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().clone()
            for n, p in model.named_parameters()}
