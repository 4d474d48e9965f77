"""Optimizers and learning-rate schedules for the training loop.

AdamW (Loshchilov & Hutter, 2019, "Decoupled Weight Decay Regularization"), per
parameter tensor p with gradient g at step t:

    p   <- p * (1 - lr * wd)                      decoupled weight decay
    m   <- m + (1 - b1) * (g - m)                 first moment  (lerp)
    v   <- b2 * v + (1 - b2) * g * g              second moment
    p   <- p - lr / (1 - b1^t) * m / (sqrt(v) / sqrt(1 - b2^t) + eps)

The moments m and v cost two floats per trainable parameter, twice the
parameters themselves. `PagedAdamW` keeps them in (pinned) CPU memory when the
parameters live on a GPU and streams them through the device in chunks, so the
accelerator holds only one chunk of optimizer state at a time. The idea is the
"paged optimizer" of QLoRA (Dettmers et al., 2023), done here by explicit copies
instead of CUDA unified memory. Every operation is elementwise and in the same
order as `torch.optim.AdamW`'s single-tensor path, so the results are equal bit
for bit (tests/test_train.py checks it).

Schedules, for step t (0-based) of T with W warm-up steps:

    cosine, linear, constant   (nanoGPT's `get_lr`) warm-up lr (t + 1) / W, reaching lr on the
                               last warm-up step; then cosine or linear decay to
                               lr * min_lr_ratio, reached at the last step T - 1, or constant
    cosine_hf, linear_hf       Hugging Face's get_cosine_schedule_with_warmup and
                               get_linear_schedule_with_warmup: warm-up lr t / W from 0 at
                               step 0; then, with p = (t - W) / (T - W),
                               lr * 0.5 (1 + cos(pi p))  or  lr (1 - p): towards 0, reached
                               one step after the last (min_lr_ratio is not used)
"""
from __future__ import annotations

import math
from typing import Iterable

import torch
from torch import Tensor

SCHEDULES = ("cosine", "linear", "constant", "cosine_hf", "linear_hf")


def lr_at(step: int, *, lr: float, total_steps: int, warmup_steps: int = 0,
          schedule: str = "cosine", min_lr_ratio: float = 0.1) -> float:
    """Learning rate for optimizer step `step` (0-based) of `total_steps` (module docstring)."""
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule: expected one of {SCHEDULES}, got {schedule!r}")
    if schedule.endswith("_hf"):                     # transformers.optimization, to the formula
        if step < warmup_steps:
            return lr * step / max(1, warmup_steps)
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        if schedule == "linear_hf":
            return lr * max(0.0, 1.0 - progress)
        return lr * max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))
    if warmup_steps > 0 and step < warmup_steps:
        return lr * (step + 1) / warmup_steps        # reaches lr on the last warm-up step
    if schedule == "constant":
        return lr
    min_lr = lr * min_lr_ratio
    decay_steps = max(1, total_steps - 1 - warmup_steps)
    progress = min(1.0, max(0.0, (step - warmup_steps) / decay_steps))   # 0 -> 1 over the decay
    if schedule == "linear":
        return lr - (lr - min_lr) * progress
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (lr - min_lr)


class PagedAdamW(torch.optim.Optimizer):
    """AdamW whose moments live in CPU memory (pinned when the parameters are on a
    GPU) and are updated `chunk_size` elements at a time on the parameter's device.

    State keys and layout are those of `torch.optim.AdamW` (`step`, `exp_avg`,
    `exp_avg_sq`), so checkpoints and rank controllers that carry optimizer state
    over treat both alike; only the device of the moments differs.
    """

    def __init__(self, params: Iterable, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.0, chunk_size: int = 1 << 20):
        if lr < 0 or eps < 0 or weight_decay < 0:
            raise ValueError(f"PagedAdamW: lr, eps and weight_decay must be >= 0, got {lr}, {eps}, {weight_decay}")
        if not (0.0 <= betas[0] < 1.0 and 0.0 <= betas[1] < 1.0):
            raise ValueError(f"PagedAdamW: betas must be in [0, 1), got {betas}")
        if chunk_size < 1:
            raise ValueError(f"PagedAdamW: chunk_size must be >= 1, got {chunk_size}")
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))
        self.chunk_size = chunk_size

    @staticmethod
    def _host_zeros(p: Tensor) -> Tensor:
        pin = p.device.type == "cuda"                 # pinned pages make the host<->device copies async
        return torch.zeros(p.shape, dtype=p.dtype, device="cpu", pin_memory=pin)

    def load_state_dict(self, state_dict: dict) -> None:
        super().load_state_dict(state_dict)           # torch moves the moments to the params' device...
        for state in self.state.values():             # ...so page them back out to the host
            for key in ("exp_avg", "exp_avg_sq"):
                if key in state and state[key].device.type != "cpu":
                    host = torch.empty(state[key].shape, dtype=state[key].dtype, device="cpu",
                                       pin_memory=state[key].device.type == "cuda")
                    state[key] = host.copy_(state[key])

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, wd, eps = group["lr"], group["weight_decay"], group["eps"]
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("PagedAdamW: sparse gradients are not supported")
                state = self.state[p]
                if len(state) == 0:
                    state["step"] = torch.tensor(0.0)             # float32 scalar, as torch's AdamW
                    state["exp_avg"] = self._host_zeros(p)
                    state["exp_avg_sq"] = self._host_zeros(p)
                state["step"] += 1
                t = state["step"].item()
                bias_correction1 = 1 - beta1 ** t
                bias_correction2_sqrt = (1 - beta2 ** t) ** 0.5
                step_size = lr / bias_correction1
                self._update(p, p.grad, state["exp_avg"], state["exp_avg_sq"],
                             lr, wd, eps, beta1, beta2, step_size, bias_correction2_sqrt)
        return loss

    def _update(self, p, grad, exp_avg_host, exp_avg_sq_host, lr, wd, eps, beta1, beta2,
                step_size, bias_correction2_sqrt) -> None:
        flat_p, flat_g = p.view(-1), grad.reshape(-1)
        m_host, v_host = exp_avg_host.view(-1), exp_avg_sq_host.view(-1)
        on_host = p.device.type == "cpu"
        for start in range(0, flat_p.numel(), self.chunk_size):
            sl = slice(start, start + self.chunk_size)
            pc, g = flat_p[sl], flat_g[sl]
            # the chunk of moments on the parameter's device (a view when both are on the CPU)
            m = m_host[sl] if on_host else m_host[sl].to(p.device, non_blocking=True)
            v = v_host[sl] if on_host else v_host[sl].to(p.device, non_blocking=True)
            if wd != 0:
                pc.mul_(1 - lr * wd)
            m.lerp_(g, 1 - beta1)
            v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
            denom = (v.sqrt() / bias_correction2_sqrt).add_(eps)
            pc.addcdiv_(m, denom, value=-step_size)
            if not on_host:
                m_host[sl].copy_(m, non_blocking=True)
                v_host[sl].copy_(v, non_blocking=True)
        if not on_host and p.device.type == "cuda":
            torch.cuda.current_stream(p.device).synchronize()   # host moments complete before the next step


def make_optimizer(model: torch.nn.Module, *, lr: float, weight_decay: float = 0.0,
                   paged: bool = False, params: list | None = None) -> torch.optim.Optimizer:
    """AdamW over the trainable parameters only (`p.requires_grad`), as nanoGPT's
    `configure_optimizers`. `params` fixes the order (used when resuming)."""
    if params is None:
        params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("make_optimizer: the model has no trainable parameters (requires_grad is False "
                         "everywhere); add adapters with lora.add_lora_to_model or choose full fine-tuning")
    if paged:
        return PagedAdamW(params, lr=lr, weight_decay=weight_decay)
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
