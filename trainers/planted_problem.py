"""The planted-rank problem: a teacher whose weight updates have known ranks, and the task it labels.

On real data nobody knows which layer needs how much rank; here we plant it.

    teacher   f(x; W)   a residual MLP; W random orthogonal, rounded to the NF4 grid
                        (singular values in [0.88, 1.12], and a 4-bit copy equals it)
                        h_0 = x,  h_{i+1} = h_i + fc2_i(gelu(fc1_i(h_i))) / sqrt(L),  f = h_L
    planted   W'_m = W_m + sigma * U_m V_m^T     U_m, V_m (d, k_m) random orthonormal columns,
                        so Delta W_m has rank k_m exactly and every planted direction has the
                        same singular value sigma (the problem is well conditioned)
    data      x ~ N(0, I_d),  y = f(x; W')       fresh seeded samples every step
    student   f(x; W + adapters), W frozen, loss = |f(x) - y|^2 (summed over outputs, batch mean)

The planted ranks k_m are 0, 1, 2, 4, 8, 16, twice each, spread over the 2 x 6 modules.
Every method gets the adapter budget of uniform LoRA r=8 (96 rank units over 12 equal
(d, d) layers); the oracle LoRA is given the planted ranks (`rank_pattern`, 62 units).
A layer with rank r < k_m cannot represent its planted update, so where the rank goes
decides the final loss: uniform r=8 is short of rank in the two k=16 layers and wastes
it in the k=0 ones, and the oracle fits the teacher to float precision.

`input_ids` carries float features (B, d) here: the training loop only passes
`batch["input_ids"]` through to the model, and this is a regression, not a language model.
The benchmark that trains every method on this problem is trainers/planted.py.
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Iterator

import torch
import torch.nn as nn
import torch.nn.functional as F

from lora.layout import module_device
from trainers.config_checks import check_device, check_floats, check_ints

MODULES = ("fc1", "fc2")
# Planted rank per block: (fc1, fc2). Each of 0, 1, 2, 4, 8, 16 appears once in each column.
PLANTED_RANKS = ((16, 2), (0, 8), (4, 0), (1, 16), (8, 1), (2, 4))

# (label in the table, name in trainers.experiments.CONFIGS); the oracle is built from B-FP.
METHODS = (("LoRA", "B-FP"), ("QLoRA", "B-Q4"), ("AdaLoRA", "B-Ada"), ("SADRA", "SADRA"), ("DRaFT-Q", "DRaFT-Q"))
ADAPTIVE = ("AdaLoRA", "SADRA", "DRaFT-Q")
ORACLE = "Oracle"


@dataclass
class PlantedConfig:
    dim: int = 64                   # width d of every (d, d) layer
    planted: tuple = PLANTED_RANKS  # (fc1 rank, fc2 rank) per block; the number of blocks is len(planted)
    sigma: float = 0.5              # singular value of each planted direction (base weights have 1)
    budget_rank: int = 8            # every method's budget: that of uniform LoRA at this rank
    steps: int = 600                # optimizer steps per method
    batch_size: int = 256           # fresh samples per step
    lr: float = 1e-2                # AdamW learning rate (cosine schedule, short warm-up)
    eval_examples: int = 4096       # held-out samples for the final loss
    calibration_batches: int = 4    # batches SADRA's Hutchinson estimate sees before training
    nf4_grid: bool = True           # snap the base weights to the NF4 grid (see build_planted)
    seed: int = 0                   # teacher, planted directions, data and adapters
    device: str | None = None       # None: the best one present (trainers/device.py)

    def __post_init__(self):
        """Refuse a bad value when the config is built (trainers/config_checks.py)."""
        check_ints(self, ("dim", "budget_rank", "steps", "batch_size", "eval_examples", "calibration_batches"),
                   minimum=1)
        check_ints(self, ("seed",), minimum=0)
        check_floats(self, ("sigma", "lr"), minimum=0)
        check_device(self)
        ok = all(len(ks) == len(MODULES) and all(isinstance(k, int) and 0 <= k <= self.dim for k in ks)
                 for ks in self.planted) and len(self.planted) > 0
        if not ok:
            raise ValueError(f"PlantedConfig.planted: expected ({', '.join(MODULES)}) rank pairs, each rank an "
                             f"integer in [0, dim={self.dim}], got {self.planted!r}")

    @classmethod
    def quick(cls, **overrides) -> "PlantedConfig":
        """The small setting the tests use (a few seconds per method)."""
        return cls(**{"dim": 32, "steps": 400, "batch_size": 128, "eval_examples": 1024,
                      "calibration_batches": 2, **overrides})

    def planted_ranks(self) -> dict[str, int]:
        return {f"blocks.{i}.{m}": int(k) for i, ks in enumerate(self.planted) for m, k in zip(MODULES, ks)}


# --- the teacher ------------------------------------------------------------------------------
class PlantedBlock(nn.Module):
    def __init__(self, dim: int, scale: float):
        super().__init__()
        self.fc1 = nn.Linear(dim, dim, bias=False)
        self.fc2 = nn.Linear(dim, dim, bias=False)
        self.scale = scale

    def forward(self, h):                                                   # (B, d)
        return h + self.fc2(F.gelu(self.fc1(h))) * self.scale


class PlantedMLP(nn.Module):
    """h_0 = x, h_{i+1} = h_i + fc2_i(gelu(fc1_i(h_i))) / sqrt(L), output h_L; loss = |h_L - y|^2.

    forward(input_ids (B, d) float, targets (B, d) | None, attention_mask ignored) -> (output, loss),
    the signature of every model the training loop drives.
    """

    def __init__(self, dim: int, n_blocks: int):
        super().__init__()
        self.dim = dim
        self.blocks = nn.ModuleList(PlantedBlock(dim, 1.0 / math.sqrt(n_blocks)) for _ in range(n_blocks))

    def forward(self, input_ids, targets=None, attention_mask=None):
        h = input_ids                                                       # (B, d)
        for block in self.blocks:
            h = block(h)
        if targets is None:
            return h, None
        # squared error summed over the d outputs, averaged over the batch: d x the per-element
        # MSE. Adam does not care about the scale, but the regularisers added to it (AdaLoRA's
        # orthogonality at weight 0.1, Sparse LoRA's L1) are tuned for losses of order 1, as a
        # language model's cross-entropy; the per-element MSE here is ~0.03.
        loss = (h.float() - targets.float()).pow(2).sum(-1).mean()
        return h, loss


def _orthonormal(rows: int, cols: int, gen: torch.Generator) -> torch.Tensor:
    q, r = torch.linalg.qr(torch.randn(rows, cols, generator=gen))
    return q * torch.sign(torch.diagonal(r))                                # (rows, cols), Q^T Q = I


def build_planted(cfg: PlantedConfig) -> tuple[PlantedMLP, PlantedMLP, dict[str, int]]:
    """(base, teacher, planted ranks): the teacher is the base plus sigma * U V^T of rank k_m in layer m.

    With `nf4_grid` the base weights are rounded once through NF4 (QLoRA's 4-bit format,
    block 64, double quantization), so a 4-bit copy of the base is the base, up to ~2e-4 per
    weight (the double-quantized scales move a little). Otherwise the NF4 error of a (64, 64)
    orthogonal matrix (Frobenius ~0.75, full rank) would add an update of that size to every
    layer of the 4-bit methods and hide the planted ranks (a rank-1 plant is 0.5). QLoRA's
    cost on real weights is the memory ablation's and the matrix's business."""
    dim = cfg.dim
    planted = cfg.planted_ranks()                  # each <= dim (PlantedConfig checks)
    gen = torch.Generator().manual_seed(cfg.seed)
    base = PlantedMLP(dim, len(cfg.planted))
    with torch.no_grad():
        for block in base.blocks:
            for name in MODULES:
                layer = getattr(block, name)
                layer.weight.copy_(_orthonormal(dim, dim, gen))                 # singular values 1
                if cfg.nf4_grid:
                    from quantization.layers import Linear4bit
                    layer.weight.copy_(Linear4bit.from_linear(layer).dequantize())  # now in [0.88, 1.12]
    base.requires_grad_(False)
    teacher = copy.deepcopy(base)
    with torch.no_grad():
        for name, k in planted.items():
            if k > 0:
                layer = teacher.get_submodule(name)
                U, V = _orthonormal(dim, k, gen), _orthonormal(dim, k, gen)   # (d, k) each
                layer.weight.add_(cfg.sigma * U @ V.t())                      # rank exactly k
    return base, teacher, planted


@dataclass(frozen=True)
class PlantedSpec:
    """What the trainer reads of a task (as trainers.data.TaskSpec): its name and main metric."""
    name: str = "planted"
    kind: str = "regression"
    metric: str = "mse"


class PlantedTask:
    """x ~ N(0, I) labelled by the teacher, in the shape of a trainers.data task:
    `batches("train", batch_size, seed=...)` is an epoch of fresh seeded samples,
    `evaluate(model)` the held-out mean squared error."""

    spec = PlantedSpec()
    source = "generated (trainers.planted)"
    note = "synthetic: the labels come from a teacher with planted low-rank weight updates"

    def __init__(self, teacher: nn.Module, cfg: PlantedConfig, batches_per_epoch: int = 100):
        self.teacher, self.cfg, self.batches_per_epoch = teacher, cfg, batches_per_epoch
        gen = torch.Generator().manual_seed(cfg.seed + 1_000_003)
        self.eval_x = torch.randn(cfg.eval_examples, cfg.dim, generator=gen)       # (N, d)
        self.eval_y = self._label(self.eval_x)                                     # (N, d)

    @torch.no_grad()
    def _label(self, x):
        return self.teacher(x)[0]

    def sample(self, n: int, gen: torch.Generator) -> dict:
        x = torch.randn(n, self.cfg.dim, generator=gen)                            # (n, d)
        return {"input_ids": x, "labels": self._label(x)}

    def batches(self, split: str, batch_size: int, *, shuffle: bool = True, seed: int = 0,
                drop_last: bool = True) -> Iterator[dict]:
        """An epoch of `batches_per_epoch` fresh batches; the same seed gives the same batches."""
        if split != "train":
            raise ValueError(f"planted task: batches() serves the 'train' split, got {split!r} "
                             f"(evaluate() holds the eval set)")
        gen = torch.Generator().manual_seed(self.cfg.seed * 7919 + 17 + seed)
        for _ in range(self.batches_per_epoch):
            yield self.sample(batch_size, gen)

    @torch.no_grad()
    def evaluate(self, model: nn.Module) -> dict:
        """Held-out mean squared error (lower is better), in chunks, on the model's device."""
        device = module_device(model)
        total = 0.0
        for start in range(0, len(self.eval_x), 1024):
            x = self.eval_x[start:start + 1024].to(device)
            y = self.eval_y[start:start + 1024].to(device)
            out, _ = model(x)
            total += F.mse_loss(out.float(), y, reduction="sum").item()
        return {"mse": total / self.eval_y.numel()}
