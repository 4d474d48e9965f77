"""AdaLoRA: prune singular-value triplets by importance under a cubic budget schedule.

Zhang et al. 2023, "AdaLoRA: Adaptive Budget Allocation for Parameter-Efficient
Fine-Tuning" (ICLR, arXiv:2303.10512). Each adapted layer k holds its update as
P_k Λ_k Q_k (lora.svd.SVDLoRALinear); triplet i of layer k is (P_k[:, i], λ_k,i, Q_k[i]).

Importance of one trainable entry w, every step (paper eqs. 8-10):

    I_t   = |w * dL/dw|                                 sensitivity
    Ī_t   = β1 Ī_{t-1} + (1 - β1) I_t                   smoothed sensitivity
    Ū_t   = β2 Ū_{t-1} + (1 - β2) |I_t - Ī_t|           uncertainty
    s_t   = Ī_t * Ū_t

Under several processes I_t is passed through `reduce` (the all-reduce mean, set by the
trainer; allocation/allocator.py) before the EMAs, so every rank masks the same triplets.

Score of a triplet (eq. 11): S_k,i = s(λ_k,i) + mean_j s(P_k,ji) + mean_j s(Q_k,ij).

Total budget b(t) = number of active triplets over all layers (eq. 12), cubic:

    b(t) = b0                                                    t < t_i          (warm-up)
    b(t) = bT + floor((b0 - bT) (1 - (t - t_i) / (T - t_i - t_f))^3)   t_i <= t < T - t_f
    b(t) = bT                                                    t >= T - t_f     (final)

with b0 = the sum of the initial ranks and bT = target_r * (number of layers).
Every ΔT steps in the middle phase (and once on entering the final phase) the
b(t) triplets with the highest scores over all layers stay active; the others get
Λ = 0 and mask 0. In the final phase the mask is frozen. The budget only
decreases, so a pruned triplet (mask 0: no gradient, its score decays) stays pruned.

The loss gets γ mean over the 2K factors of the K layers of ||P_k^T P_k - I||_F and
||Q_k Q_k^T - I||_F, which keeps P, Q near orthogonal so that λ really is the size of a
direction. That is the form of the authors' code (QingruZhang/AdaLoRA, loralib
`compute_orth_regu`; PEFT's AdaLoRA too), with which γ = 0.1 was tuned; the paper writes
R = ||P^T P - I||_F^2 + ||Q Q^T - I||_F^2 per layer, summed. The summed squared form is
~200x stronger at initialisation on stories260K with all 35 linear layers (about 800 γ
against 3.4 γ), and with γ = 0.1 it gave held-out perplexity 17.7 where the mean form gives
the figure in README's real-model table.
"""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

import torch
import torch.nn as nn

from allocation.allocator import check_stepped, no_reduce
from lora.svd import SVDLoRALinear


@dataclass
class AdaLoRAConfig:
    init_r: int = 12                 # rank each layer is built with (LoraConfig r for method="adalora")
    target_r: int = 8                # average rank at the end: bT = target_r * number of layers
    tinit: int = 0                   # t_i: warm-up steps without pruning
    tfinal: int = 0                  # t_f: last steps with the mask frozen at bT
    deltaT: int = 1                  # ΔT: steps between maskings in the middle phase
    beta1: float = 0.85              # EMA of the sensitivity
    beta2: float = 0.85              # EMA of the uncertainty
    orth_reg_weight: float = 0.1     # γ (the paper's 0.1)

    def __post_init__(self):
        for name, low in (("init_r", 1), ("target_r", 1), ("tinit", 0), ("tfinal", 0), ("deltaT", 1)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < low:
                raise ValueError(f"AdaLoRAConfig.{name} must be an int >= {low}, got {value!r}")
        if self.target_r > self.init_r:
            raise ValueError(f"AdaLoRAConfig.target_r must be <= init_r = {self.init_r} (the budget only "
                             f"decreases), got {self.target_r}")
        for name in ("beta1", "beta2"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0.0 <= value < 1.0:
                raise ValueError(f"AdaLoRAConfig.{name} must be in [0, 1), got {value!r}")
        w = self.orth_reg_weight
        if isinstance(w, bool) or not isinstance(w, numbers.Real) or not (math.isfinite(w) and w >= 0):
            raise ValueError(f"AdaLoRAConfig.orth_reg_weight must be a finite number >= 0, got {w!r}")


def budget_schedule(step: int, total_steps: int, b0: int, bT: int, tinit: int, tfinal: int) -> int:
    """b(t) of the cubic schedule (module docstring); an int between bT and b0."""
    if step < tinit:
        return b0
    span = total_steps - tinit - tfinal
    if step >= total_steps - tfinal or span <= 0:
        return bT
    frac = 1.0 - (step - tinit) / span
    return bT + math.floor((b0 - bT) * frac ** 3)


def svd_layers(model: nn.Module) -> list[tuple[str, SVDLoRALinear]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, SVDLoRALinear)]


def orthogonal_regularizer(model: nn.Module):
    """The mean over the SVD layers' factors of ||P^T P - I||_F and ||Q Q^T - I||_F (module
    docstring; 0.0 when there are none)."""
    terms = [t for _, layer in svd_layers(model) for t in layer.orthogonality_terms()]
    return torch.stack(terms).mean() if terms else 0.0


class AdaLoRAAllocator:
    """The allocator protocol (allocation.allocator) for AdaLoRA."""

    name = "AdaLoRA"
    PARAMS = ("lora_A", "lora_E", "lora_B")

    def __init__(self, model: nn.Module, config: AdaLoRAConfig | None = None, total_steps: int | None = None):
        self.config = c = config or AdaLoRAConfig()
        self.layers = svd_layers(model)
        if not self.layers:
            raise ValueError("AdaLoRAAllocator: the model has no SVDLoRALinear layers "
                             "(add_lora_to_model(model, method='adalora') first)")
        AdaLoRAConfig.__post_init__(c)          # a config edited after construction is checked again
        self.total_steps = self._check_total_steps(total_steps)
        self.b0 = sum(layer.rank for _, layer in self.layers)
        self.bT = c.target_r * len(self.layers)
        if not 0 < self.bT <= self.b0:
            raise ValueError(f"AdaLoRAAllocator: target total rank {self.bT} (target_r={c.target_r} x "
                             f"{len(self.layers)} layers) must be in (0, {self.b0}], the initial total rank")
        self.ipt: dict[str, torch.Tensor] = {}     # "layer.param" -> smoothed sensitivity Ī
        self.unc: dict[str, torch.Tensor] = {}     # "layer.param" -> uncertainty Ū
        self.n_steps = 0
        self.frozen = False
        self.n_skipped, self.last_skipped = 0, []
        self.reduce = no_reduce                    # all-reduce mean under several processes (allocator.py)
        self.rank_history = [{"step": 0, "ranks": self.ranks()}]

    def _check_total_steps(self, total_steps) -> int:
        """T of the budget schedule: a positive int that leaves a pruning phase after tinit + tfinal."""
        c = self.config
        if isinstance(total_steps, bool) or not isinstance(total_steps, numbers.Integral) or total_steps < 1:
            raise ValueError(f"AdaLoRAAllocator: total_steps must be a positive int (the budget schedule needs "
                             f"T), got {total_steps!r}")
        if c.tinit + c.tfinal >= total_steps:
            raise ValueError(f"AdaLoRAAllocator: tinit + tfinal = {c.tinit + c.tfinal} leaves no pruning "
                             f"phase in total_steps = {total_steps}")
        return int(total_steps)

    def ranks(self) -> dict[str, int]:
        return {name: layer.active_rank for name, layer in self.layers}

    # --- importance -------------------------------------------------------------------------
    @torch.no_grad()
    def update_importance(self) -> None:
        """One step of eqs. 8-10. All-or-nothing like the curvature tracker: if any sensitivity is
        NaN/inf (an fp16 overflow step the GradScaler skips too), no EMA moves for any layer;
        `n_skipped` counts such steps and `last_skipped` names the parameters of the latest."""
        b1, b2 = self.config.beta1, self.config.beta2
        sens = {}
        for name, layer in self.layers:
            for pname in self.PARAMS:
                p = getattr(layer, pname)
                if p.grad is None:
                    continue
                cur = (p.detach() * p.grad.detach()).abs()                     # I_t
                sens[f"{name}.{pname}"] = cur.to(torch.promote_types(cur.dtype, torch.float32))   # bf16 -> fp32
        if sens and self.reduce is not no_reduce:    # one collective for all: every rank scores the same I_t
            flat = self.reduce(torch.cat([cur.flatten().double() for cur in sens.values()]))
            parts = flat.split([cur.numel() for cur in sens.values()])
            sens = {key: part.view_as(cur).to(cur.dtype) for (key, cur), part in zip(sens.items(), parts)}
        bad = [key for key, cur in sens.items() if not bool(torch.isfinite(cur).all())]
        if bad:
            self.n_skipped += 1
            self.last_skipped = bad
            return
        for key, cur in sens.items():
            if key not in self.ipt or self.ipt[key].shape != cur.shape:
                self.ipt[key] = torch.zeros_like(cur)
                self.unc[key] = torch.zeros_like(cur)
            self.ipt[key].mul_(b1).add_(cur, alpha=1 - b1)                     # Ī_t
            self.unc[key].mul_(b2).add_((cur - self.ipt[key]).abs(), alpha=1 - b2)   # Ū_t

    def triplet_scores(self) -> dict[str, torch.Tensor]:
        """name -> (r,) scores S_i = s(λ_i) + mean_j s(P_ji) + mean_j s(Q_ij)."""
        out = {}
        for name, layer in self.layers:
            r = layer.rank
            dev = layer.lora_E.device

            def s(pname):
                key = f"{name}.{pname}"
                return self.ipt[key] * self.unc[key] if key in self.ipt else None
            sA, sE, sB = s("lora_A"), s("lora_E"), s("lora_B")
            score = torch.zeros(r, device=dev, dtype=torch.float64)
            if sE is not None:
                score += sE.reshape(r)
            if sB is not None:
                score += sB.mean(dim=0)                                        # P columns (out, r) -> (r,)
            if sA is not None:
                score += sA.mean(dim=1)                                        # Q rows (r, in) -> (r,)
            out[name] = score
        return out

    # --- masking ----------------------------------------------------------------------------
    @torch.no_grad()
    def mask_to_budget(self, budget: int) -> None:
        """Keep the `budget` best active triplets over all layers (ties: earlier layer, lower index)."""
        scores = self.triplet_scores()
        flat = torch.cat([scores[n].float().cpu() for n, _ in self.layers])
        active = torch.cat([layer.rank_mask.bool().cpu() for _, layer in self.layers])
        flat[~active] = -math.inf                                              # pruned stays pruned
        order = torch.argsort(-flat, stable=True)
        keep = torch.zeros_like(flat, dtype=torch.bool)
        keep[order[:budget]] = True
        start = 0
        for _, layer in self.layers:
            layer.set_mask(keep[start:start + layer.rank])
            start += layer.rank

    @torch.no_grad()
    def _reapply_masks(self) -> None:
        for _, layer in self.layers:
            layer.set_mask(layer.rank_mask.bool())

    def budget_at(self, step: int) -> int:
        c = self.config
        return budget_schedule(step, self.total_steps, self.b0, self.bT, c.tinit, c.tfinal)

    # --- the protocol -------------------------------------------------------------------------
    def on_step(self, step: int, model: nn.Module, optimizer) -> None:
        """After backward: update Ī, Ū from the weights and their gradients."""
        self.update_importance()
        self.n_steps += 1

    def after_step(self, step: int, model: nn.Module, optimizer) -> None:
        """After optimizer.step(): mask every ΔT steps of the middle phase; keep pruned Λ at zero."""
        c = self.config
        masked = False
        if not self.frozen and step >= c.tinit:
            if step >= self.total_steps - c.tfinal:
                self.mask_to_budget(self.bT)                                   # once, then frozen
                self.frozen = True
                masked = True
            elif (step - c.tinit) % c.deltaT == 0:
                self.mask_to_budget(self.budget_at(step))
                masked = True
        if not masked:
            self._reapply_masks()
        if masked:
            self.rank_history.append({"step": int(step), "ranks": self.ranks()})

    def regularization(self, model: nn.Module):
        return self.config.orth_reg_weight * orthogonal_regularizer(model)

    def finish(self, total_steps: int) -> None:
        check_stepped(self.name, self.n_steps, total_steps)

    def state_dict(self) -> dict:
        return {"n_steps": self.n_steps, "frozen": self.frozen, "total_steps": self.total_steps,
                "n_skipped": self.n_skipped,
                "ipt": {k: v.clone() for k, v in self.ipt.items()},
                "unc": {k: v.clone() for k, v in self.unc.items()},
                "rank_history": list(self.rank_history)}

    def load_state_dict(self, state: dict) -> None:
        """Checks the whole state against the model first (ValueError naming the bad entry), then replaces."""
        need = {"n_steps", "frozen", "total_steps", "ipt", "unc", "rank_history"}
        if not isinstance(state, dict) or not need <= set(state):
            raise ValueError(f"AdaLoRAAllocator.load_state_dict: expected a dict with {sorted(need)}, got "
                             f"{state if not isinstance(state, dict) else sorted(state)!r}")
        total = self._check_total_steps(state["total_steps"])
        n = state["n_steps"]
        if isinstance(n, bool) or not isinstance(n, numbers.Integral) or n < 0:
            raise ValueError(f"AdaLoRAAllocator.load_state_dict: n_steps must be an int >= 0, got {n!r}")
        shapes = {f"{name}.{p}": getattr(layer, p).shape for name, layer in self.layers for p in self.PARAMS}
        for what in ("ipt", "unc"):
            for key, value in state[what].items():
                if key not in shapes:
                    raise ValueError(f"AdaLoRAAllocator.load_state_dict: {what}[{key!r}] names no adapter "
                                     f"parameter of the model; known: {sorted(shapes)}")
                if not torch.is_tensor(value) or value.shape != shapes[key]:
                    raise ValueError(f"AdaLoRAAllocator.load_state_dict: {what}[{key!r}] must be a tensor of "
                                     f"shape {tuple(shapes[key])}, got {getattr(value, 'shape', value)!r}")
        if set(state["ipt"]) != set(state["unc"]):
            raise ValueError("AdaLoRAAllocator.load_state_dict: ipt and unc name different parameters")
        self.n_steps, self.frozen, self.total_steps = int(n), bool(state["frozen"]), total
        self.ipt = {k: v.clone() for k, v in state["ipt"].items()}
        self.unc = {k: v.clone() for k, v in state["unc"].items()}
        self.rank_history = list(state["rank_history"])
        self.n_skipped = int(state.get("n_skipped", 0))
