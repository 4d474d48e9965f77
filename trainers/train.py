"""The training loop: one visible loop in a fixed order, as nanoGPT's train.py.

Per optimizer step:
    1. set the learning rate (warm-up, then cosine / linear / constant; trainers/optim.py)
    2. evaluate and checkpoint when due
    3. forward/backward over `grad_accum` micro-batches under autocast, each loss divided
       by `grad_accum` and with the allocator's regulariser (AdaLoRA orthogonality, L1) added
    4. allocator.on_step (gradients present: importance, curvature)
    5. clip the gradient norm
    6. optimizer.step()
    7. allocator.after_step (masking, rank changes)
    8. zero_grad(set_to_none=True), log

Device and autocast dtype are chosen once (trainers.device.Runtime); the model is
moved there and batches (CPU tensors) follow. The optimizer is AdamW over the
parameters with `requires_grad` only, so a LoRA run keeps no moments for the
frozen base.

Checkpoints (out_dir/checkpoint.pt, written atomically; trainers/resume.py) hold the trainable
parameters, the adapter layers' buffers (masks), every low-rank layer's rank,
the optimizer, the allocator, the RNG states, the data position and the logs:
enough for `resume=True` to continue to the same losses, bit for bit, as a run
that never stopped. That needs `batches(epoch)` to yield the same batches for
the same epoch (seed any shuffling by the epoch, as `epoch_batches` does).

`compile=True` (trainers/compiling.py): the loop calls a torch.compile wrapper of the model
(`forward`), compiled again after a rank change; everything else (checkpoints, evaluation,
allocators) uses `model` itself, so nothing saved changes.

Several processes (torchrun; trainers/distributed.py): every rank reads the same global
batches and keeps its share of the rows, the model is wrapped in DistributedDataParallel
(only the trainable parameters' gradients are all-reduced), the logged loss is the mean
over ranks, the allocator's `reduce` is the all-reduce mean, the model is wrapped again
after a resize, and only rank 0 writes checkpoints.
"""
from __future__ import annotations

import contextlib
import inspect
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import torch
import torch.nn as nn
from tqdm.auto import tqdm

from lora.trainable import count_parameters
from trainers import compiling, distributed
from trainers.config_checks import check_choice, check_device, check_dtype, check_floats, check_ints
from trainers.device import Runtime
from trainers.memory import peak_memory, reset_peak_memory, trainable_bytes, training_state_bytes  # noqa: F401
from trainers.optim import SCHEDULES, lr_at, make_optimizer
from trainers.resume import _load_checkpoint, _save_checkpoint

CHECKPOINT_NAME = "checkpoint.pt"


@dataclass
class TrainConfig:
    steps: int = 200                # optimizer steps
    batch_size: int = 8             # examples per micro-batch (used by whoever builds `batches`)
    grad_accum: int = 1             # micro-batches per optimizer step
    lr: float = 1e-3                # peak learning rate
    weight_decay: float = 0.0       # decoupled (AdamW) weight decay
    warmup_steps: int = 10          # linear warm-up steps
    schedule: str = "cosine"        # "cosine" | "linear" | "constant" after warm-up; "cosine_hf" | "linear_hf":
                                    # Hugging Face's (warm-up from lr 0, decay to 0; trainers/optim.py)
    clip: float = 1.0               # max global gradient norm; 0 disables clipping
    eval_every: int = 50            # evaluate every N steps (and always at the end); 0: only at the end
    log_every: int = 10             # progress-bar refresh every N steps (loss_log keeps every step)
    checkpoint_every: int = 0       # checkpoint every N steps into out_dir; 0: never
    seed: int = 0                   # seeds torch before the loop (dropout, sampling)
    device: str | None = None       # None: CUDA, then MPS, then CPU
    dtype: str | None = None        # autocast dtype; None: bf16/fp16 on accelerators, fp32 on CPU
    grad_checkpointing: bool = False  # recompute activations in backward (model must support it)
    paged_adamw: bool = False       # AdamW with moments in (pinned) CPU memory, trainers/optim.py
    progress: bool = True           # tqdm bar with loss and tokens/s
    min_lr_ratio: float = 0.1       # cosine/linear decay ends at lr * min_lr_ratio (not used by the _hf ones)
    parallel: str = "ddp"           # under torchrun: "ddp" (a whole replica per process) or "fsdp" (sharded;
                                    # plain LoRA on a float base, no checkpoints; trainers/distributed.py)
    compile: bool = False           # run forward/backward through torch.compile (inductor; one process; compiled
                                    # again after a rank change; checkpoints unchanged; trainers/compiling.py)

    def __post_init__(self):
        """Refuse a bad value when the config is built (trainers/config_checks.py)."""
        check_ints(self, ("steps", "batch_size", "grad_accum"), minimum=1)
        check_ints(self, ("warmup_steps", "eval_every", "log_every", "checkpoint_every", "seed"), minimum=0)
        check_floats(self, ("lr", "weight_decay", "clip"), minimum=0)
        check_floats(self, ("min_lr_ratio",), minimum=0, maximum=1)
        check_choice(self, "schedule", SCHEDULES)
        check_choice(self, "parallel", distributed.PARALLEL)
        if not isinstance(self.compile, bool):
            raise TypeError(f"TrainConfig.compile must be True or False, got {self.compile!r}")
        check_device(self)
        check_dtype(self)


@dataclass
class TrainResult:
    loss_log: list[dict] = field(default_factory=list)   # {step, loss, lr} for every step
    eval_log: list[dict] = field(default_factory=list)   # {step, **evaluate(model)}
    metrics: dict = field(default_factory=dict)          # final eval + params, bytes, memory, time, throughput
    final_loss: float = float("nan")                     # training loss of the last step


class NonFiniteLossError(RuntimeError):
    """Training stopped because the loss became NaN or infinite (before the optimizer step)."""

    def __init__(self, step: int, loss: float, checkpoint: Path | None):
        self.step, self.loss, self.checkpoint = step, loss, checkpoint
        where = (f"the last good checkpoint is {str(checkpoint)!r}" if checkpoint is not None
                 else "no checkpoint was written (set checkpoint_every and out_dir to keep one)")
        super().__init__(f"training stopped: the loss is {loss} at step {step}; the parameters were not "
                         f"updated with it and {where}. Try a lower lr, clipping, or fp32.")


def epoch_batches(tensors: dict[str, torch.Tensor], batch_size: int, *, shuffle: bool = True,
                  seed: int = 0, drop_last: bool = True) -> Callable[[int], Iterator[dict]]:
    """`batches(epoch)` over equal-length tensors (first dim = examples), shuffled by a
    generator seeded with (seed, epoch), so an epoch can be replayed exactly."""
    n = len(next(iter(tensors.values())))
    for name, t in tensors.items():
        if len(t) != n:
            raise ValueError(f"epoch_batches: {name!r} has {len(t)} rows, expected {n} like the others")
    if n < batch_size and drop_last:
        raise ValueError(f"epoch_batches: {n} examples is fewer than batch_size={batch_size}")

    def batches(epoch: int) -> Iterator[dict]:
        order = (torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))
                 if shuffle else torch.arange(n))
        stop = n - n % batch_size if drop_last else n
        for start in range(0, stop, batch_size):
            idx = order[start:start + batch_size]
            yield {name: t[idx] for name, t in tensors.items()}
    return batches


# ----------------------------------------------------------------------------- the loop

def _enable_grad_checkpointing(model: nn.Module) -> None:
    """trainers.models read `config.gradient_checkpointing`; HF-style models have a method."""
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "gradient_checkpointing"):
        config.gradient_checkpointing = True
    elif callable(getattr(model, "gradient_checkpointing_enable", None)):
        model.gradient_checkpointing_enable()
    else:
        raise ValueError(f"grad_checkpointing: {type(model).__name__} has neither config.gradient_checkpointing "
                         f"nor gradient_checkpointing_enable(); use a model from trainers.models or set "
                         f"grad_checkpointing=False")


def _label_keywords(model: nn.Module) -> Callable[[torch.Tensor], dict]:
    """How labels reach `model`, read once from its forward signature: `targets=` for
    trainers.models (and wrappers that take **kwargs), `labels=` for transformers models,
    `start_positions=`/`end_positions=` for transformers QA heads (labels are (B, 2))."""
    params = inspect.signature(model.forward).parameters
    if "targets" in params:
        return lambda labels: {"targets": labels}
    if "labels" in params:
        return lambda labels: {"labels": labels}
    if "start_positions" in params and "end_positions" in params:
        return lambda labels: {"start_positions": labels[:, 0], "end_positions": labels[:, 1]}
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return lambda labels: {"targets": labels}
    raise TypeError(f"train: {type(model).__name__}.forward{inspect.signature(model.forward)} takes no labels; "
                    f"train() calls model(input_ids, targets=labels, attention_mask=mask) (trainers.models) or "
                    f"model(input_ids, labels=labels, attention_mask=mask) (transformers models)")


def _loss_of(output) -> torch.Tensor:
    """The scalar loss in a model's output: a (logits, loss) tuple, as trainers.models return,
    or an object with `.loss`, as transformers' ModelOutput (duck-typed: no transformers import)."""
    if isinstance(output, tuple):
        loss = output[1] if len(output) == 2 else None
    else:
        loss = getattr(output, "loss", None)
    if not (isinstance(loss, torch.Tensor) and loss.dim() == 0):
        what = (f"a tuple of {len(output)}" if isinstance(output, tuple) else type(output).__name__)
        got = f"{tuple(loss.shape)}-shaped tensor" if isinstance(loss, torch.Tensor) else repr(loss)
        raise TypeError(f"train: the model returned {what} whose loss is {got}; train() needs (logits, loss) "
                        f"with a scalar loss, or an object with a scalar .loss (e.g. a transformers ModelOutput; "
                        f"return_dict=False tuples put the loss first and are not read)")
    return loss


def logits_of(output) -> torch.Tensor:
    """The logits in a model's output: the first of a (logits, loss) tuple, as trainers.models
    return, or `.logits` of a transformers ModelOutput (duck-typed, as `_loss_of`)."""
    logits = output[0] if isinstance(output, tuple) else getattr(output, "logits", None)
    if not isinstance(logits, torch.Tensor):
        raise TypeError(f"evaluate: the model returned {type(output).__name__} without logits; expected "
                        f"(logits, loss) or an object with .logits (e.g. a transformers ModelOutput)")
    return logits


def _evaluate(model: nn.Module, evaluate: Callable, rt: Runtime, step: int) -> dict:
    model.eval()
    with torch.no_grad(), rt.autocast():
        out = evaluate(model)
    model.train()
    return {"step": step, **{k: (float(v) if isinstance(v, (int, float, torch.Tensor)) else v)
                             for k, v in out.items()}}


def train(model: nn.Module, batches: Callable[[int], Iterator[dict]], cfg: TrainConfig, *,
          evaluate: Callable[[nn.Module], dict] | None = None, allocator=None,
          out_dir: Path | None = None, resume: bool = False) -> TrainResult:
    """Train the trainable parameters of `model` on `batches(epoch)` for `cfg.steps` steps.

    `model(input_ids, targets=labels, attention_mask=mask) -> (logits, loss)`; a transformers
    model is called with `labels=` instead and its output's `.loss` is used (_label_keywords).
    `evaluate(model) -> dict` runs under no_grad in eval mode. Raises
    NonFiniteLossError when the loss becomes NaN/inf."""
    cfg.__post_init__()                 # again: a field may have been changed since the config was built
    label_keywords = _label_keywords(model)
    rt = Runtime.create(cfg.device, cfg.dtype)
    world = distributed.init(rt.device)
    torch.manual_seed(cfg.seed)
    model.to(rt.device)
    if cfg.compile:
        compiling.check_compile(world.world_size)
    fsdp = world.world_size > 1 and cfg.parallel == "fsdp"
    if fsdp:
        distributed.check_fsdp(model, allocator, cfg.checkpoint_every, resume)
        distributed.shard(model)                          # before the optimizer: it holds the shards
    if world.world_size > 1 and allocator is not None and hasattr(allocator, "reduce"):
        allocator.reduce = distributed.all_reduce_mean      # every rank decides from the same statistics
    if cfg.grad_checkpointing:
        _enable_grad_checkpointing(model)
    reset_peak_memory(rt.device)       # the run's own peak, not the process's so far
    scaler = torch.amp.GradScaler(rt.device.type) if rt.needs_grad_scaler() else None
    ckpt_path = Path(out_dir) / CHECKPOINT_NAME if out_dir is not None else None
    if resume and ckpt_path is None:
        raise ValueError("train: resume=True needs out_dir (where checkpoint.pt lives)")

    start_step, position, loss_log, eval_log = 0, {"epoch": 0, "batches_done": 0}, [], []
    if resume:
        optimizer, state = _load_checkpoint(ckpt_path, model, allocator, scaler, cfg)
        start_step, position = state["step"], state["position"]
        loss_log, eval_log = state["loss_log"], state["eval_log"]
    else:
        optimizer = make_optimizer(model, lr=cfg.lr, weight_decay=cfg.weight_decay, paged=cfg.paged_adamw)
    model.zero_grad(set_to_none=True)   # e.g. gradients left by a sensitivity pass in prepare()
    net = distributed.wrap(model, rt.device) if world.world_size > 1 and not fsdp else model   # what forward runs
    forward = compiling.compile_module(net) if cfg.compile else net    # a wrapper: `model` is what is saved
    wrapped = distributed.trainable_signature(model)

    # the data stream: batches(epoch), restarted with epoch + 1 when it runs out
    stream = iter(batches(position["epoch"]))
    for _ in range(position["batches_done"]):
        next(stream)

    def next_batch() -> dict:
        nonlocal stream
        for _ in range(2):                    # the current epoch, else the next one
            try:
                batch = next(stream)
                position["batches_done"] += 1
                return distributed.shard_batch(batch, world)
            except StopIteration:
                position["epoch"] += 1
                position["batches_done"] = 0
                stream = iter(batches(position["epoch"]))
        raise ValueError(f"batches({position['epoch']}) yielded no batch")

    model.train()
    tokens = examples = 0
    train_time = 0.0
    wall_start = time.perf_counter()
    last_loss = float("nan")
    mps_seen = 0
    bar = tqdm(total=cfg.steps, initial=start_step, desc="train", disable=not (cfg.progress and world.is_main), leave=False)
    for step in range(start_step, cfg.steps):
        # 1. learning rate
        lr = lr_at(step, lr=cfg.lr, total_steps=cfg.steps, warmup_steps=cfg.warmup_steps,
                   schedule=cfg.schedule, min_lr_ratio=cfg.min_lr_ratio)
        for group in optimizer.param_groups:
            group["lr"] = lr
        # 2. evaluate / checkpoint (a resumed run did both before saving this step)
        if not (resume and step == start_step):
            if evaluate is not None and cfg.eval_every > 0 and step % cfg.eval_every == 0:
                eval_log.append(_evaluate(model, evaluate, rt, step))
            if ckpt_path is not None and cfg.checkpoint_every > 0 and step > 0 and step % cfg.checkpoint_every == 0:
                if world.is_main:
                    _save_checkpoint(ckpt_path, model, optimizer, allocator, scaler, step=step, position=position,
                                     loss_log=loss_log, eval_log=eval_log, cfg=cfg)
                distributed.barrier()
        t0 = time.perf_counter()
        # 3. forward/backward with accumulation
        step_loss = torch.zeros((), device=rt.device)     # task loss, for the log
        step_total = torch.zeros((), device=rt.device)    # what was differentiated (+ regulariser)
        for micro in range(cfg.grad_accum):
            batch = next_batch()
            input_ids = batch["input_ids"].to(rt.device, non_blocking=True)
            labels = batch["labels"].to(rt.device, non_blocking=True)
            mask = batch.get("attention_mask")
            mask = mask.to(rt.device, non_blocking=True) if mask is not None else None
            # DDP all-reduces the gradients in the last micro-batch's backward only
            last = net is model or micro == cfg.grad_accum - 1
            with contextlib.nullcontext() if last else net.no_sync(), compiling.errors(cfg.compile):
                with rt.autocast():
                    output = forward(input_ids, attention_mask=mask, **label_keywords(labels))
                    loss = _loss_of(output)
                    total = loss if allocator is None else loss + allocator.regularization(model)
                    total = total / cfg.grad_accum
                (scaler.scale(total) if scaler is not None else total).backward()
            step_loss += loss.detach().float() / cfg.grad_accum
            step_total += total.detach().float()
            tokens += int(mask.sum()) if mask is not None else input_ids.numel()
            examples += input_ids.shape[0]
            # Drop every handle on the graph now: it holds activations, and a live graph keeps
            # autograd's per-parameter accumulators, which remember the shapes of parameters that a
            # dynamic allocator may resize in after_step.
            del output, loss, total
        if world.world_size > 1:     # the global batch's loss; a NaN on any rank stops every rank
            step_loss, step_total = distributed.all_reduce_mean(torch.stack([step_loss, step_total]))
        last_loss = step_loss.item()
        if not (math.isfinite(last_loss) and math.isfinite(step_total.item())):
            bar.close()
            optimizer.zero_grad(set_to_none=True)
            good = ckpt_path if ckpt_path is not None and ckpt_path.exists() else None
            raise NonFiniteLossError(step, last_loss if not math.isfinite(last_loss) else step_total.item(), good)
        if scaler is not None:
            scaler.unscale_(optimizer)           # hooks and clipping see true gradients
        # 4. allocator sees the gradients
        if allocator is not None:
            allocator.on_step(step, model, optimizer)
        # 5. clip
        if cfg.clip > 0:
            params = [p for group in optimizer.param_groups for p in group["params"]]
            torch.nn.utils.clip_grad_norm_(params, cfg.clip)
        # 6. step
        if scaler is not None:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()
        # 7. allocator after the step (masking, rank changes)
        if allocator is not None:
            allocator.after_step(step, model, optimizer)
            # a rank changed, and a DDP wrapper or a compiled graph holds the old shapes
            if (net is not model or cfg.compile) and distributed.trainable_signature(model) != wrapped:
                if net is not model:
                    del net, forward     # DDP's buckets hold the old shapes: wrap the resized model anew
                    net = distributed.wrap(model, rt.device)
                forward = compiling.recompile(net) if cfg.compile else net   # compiled for the new shapes
                wrapped = distributed.trainable_signature(model)
        # 8. zero_grad, log
        optimizer.zero_grad(set_to_none=True)
        rt.synchronize()
        train_time += time.perf_counter() - t0
        loss_log.append({"step": step, "loss": last_loss, "lr": lr})
        bar.update(1)
        if cfg.log_every > 0 and (step % cfg.log_every == 0 or step == cfg.steps - 1):
            bar.set_postfix(loss=f"{last_loss:.4f}", tok_s=f"{tokens / max(train_time, 1e-9):.0f}")
            if rt.device.type == "mps":
                mps_seen = max(mps_seen, int(torch.mps.driver_allocated_memory()))
    bar.close()

    final_eval = _evaluate(model, evaluate, rt, cfg.steps) if evaluate is not None else {}
    if final_eval:
        eval_log.append(final_eval)
    if ckpt_path is not None and cfg.checkpoint_every > 0:
        if world.is_main:
            _save_checkpoint(ckpt_path, model, optimizer, allocator, scaler, step=cfg.steps, position=position,
                             loss_log=loss_log, eval_log=eval_log, cfg=cfg)
        distributed.barrier()
    if allocator is not None:
        allocator.finish(cfg.steps)

    if world.world_size > 1:         # throughput of the whole run, not of one process
        counts = distributed.all_reduce_mean(torch.tensor([tokens, examples], dtype=torch.float64))
        tokens, examples = (round(float(c) * world.world_size) for c in counts)
    trainable, total_params = count_parameters(model)
    memory, memory_kind = peak_memory(rt.device, mps_seen)
    if loss_log:
        last_loss = loss_log[-1]["loss"]
    metrics = {k: v for k, v in final_eval.items() if k != "step"}
    metrics.update({
        "final_loss": last_loss, "trainable_params": trainable, "total_params": total_params,
        "trainable_pct": 100.0 * trainable / max(total_params, 1), "adapter_bytes": trainable_bytes(model),
        "peak_memory_bytes": memory, "peak_memory_kind": memory_kind, **training_state_bytes(model),
        "wall_time_s": time.perf_counter() - wall_start, "train_time_s": train_time,
        "tokens_per_s": tokens / train_time if train_time > 0 else 0.0,
        "examples_per_s": examples / train_time if train_time > 0 else 0.0,
        "steps": cfg.steps, "world_size": world.world_size, "device": str(rt.device), "autocast_dtype": str(rt.autocast_dtype).replace("torch.", ""),
    })
    return TrainResult(loss_log=loss_log, eval_log=eval_log, metrics=metrics, final_loss=last_loss)
