"""The small-model speed paths compute what the plain code computes: fused q/k/v and gate/up
projections (trainers/models/fused.py), LoRALinear's _FusedLoRA and _ThinLoRA, GQA attention
without copied heads, F.rms_norm, SwiGLU with silu recomputed, and the next-token loss with
shifted labels. Each is compared with the same model run the plain way."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

import trainers.models.fused as fused
import trainers.models.llama as llama
from lora import LoraConfig, LoRALinear, add_lora_to_model
from quantization import quantize_model
from trainers.models import LlamaConfig, LlamaForCausalLM
from trainers.models.common import IGNORE_INDEX, next_token_loss
from trainers.train import TrainConfig, epoch_batches, train

TOL = dict(rtol=1e-5, atol=1e-6)


def _unfused(monkeypatch):
    monkeypatch.setattr(fused, "fusable", lambda x, layers: False)


def _model(targets, seed=0, r=4):
    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig.tiny())
    if targets:
        add_lora_to_model(model, LoraConfig(r=r, lora_alpha=8, target_modules=targets))
        with torch.no_grad():                     # B != 0, so the adapters change the function
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.normal_(std=0.1)
    return model


def _loss_and_grads(model, idx):
    model.zero_grad(set_to_none=True)
    loss = model(idx, targets=idx)[1]
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("targets", ["all-linear", ["q_proj", "v_proj"], ["k_proj", "up_proj"], ["o_proj"]])
def test_fused_model_equals_unfused(targets, monkeypatch):
    """Loss and every gradient, with adapters on all, some or none of q/k/v and gate/up."""
    idx = torch.randint(0, 97, (4, 40), generator=torch.Generator().manual_seed(1))
    model = _model(targets)
    assert fused.fusable(torch.zeros(4, 40, 32), (model.model.layers[0].self_attn.q_proj,
                                                   model.model.layers[0].self_attn.k_proj))
    loss, grads = _loss_and_grads(model, idx)
    _unfused(monkeypatch)
    ref_loss, ref_grads = _loss_and_grads(model, idx)
    torch.testing.assert_close(loss, ref_loss, **TOL)
    assert grads.keys() == ref_grads.keys() and grads
    for name in grads:
        torch.testing.assert_close(grads[name], ref_grads[name], **TOL, msg=name)


class _CountMatmuls(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket in (torch.ops.aten.mm, torch.ops.aten.addmm, torch.ops.aten.bmm):
            self.count += 1
        return func(*args, **(kwargs or {}))


def _matmuls(model, idx):
    with _CountMatmuls() as counter:
        model(idx, targets=idx)[1].backward()
    return counter.count


def test_fused_step_runs_fewer_matmuls(monkeypatch):
    """q/k/v and gate/up each in one matmul (forward and input gradient): fewer matmuls per step."""
    model, idx = _model("all-linear"), torch.randint(0, 97, (4, 40))
    fused_count = _matmuls(model, idx)
    _unfused(monkeypatch)
    assert fused_count < _matmuls(model, idx)


def test_fused_projections_bias_and_double_backward(monkeypatch):
    """Biases (some layers with, some without) and create_graph (Hessian-vector products)."""
    torch.manual_seed(0)
    layers = (add_lora_to_model(nn.Sequential(nn.Linear(8, 6)), LoraConfig(r=2, target_modules=["0"]))[0],
              nn.Linear(8, 4, bias=False).requires_grad_(False),
              add_lora_to_model(nn.Sequential(nn.Linear(8, 5, bias=False)), LoraConfig(r=3, target_modules=["0"]))[0])
    for layer in (layers[0], layers[2]):
        nn.init.normal_(layer.lora_B, std=0.3)
    for layer in layers:                          # float64: second derivatives compared without rounding noise
        layer.double()
    x = torch.randn(3, 10, 8, dtype=torch.float64, requires_grad=True)
    params = [p for layer in layers for p in layer.parameters() if p.requires_grad]

    def hvp():
        out = fused.project(x, layers)
        loss = sum((o.tanh() ** 2).sum() for o in out)
        grads = torch.autograd.grad(loss, [x, *params], create_graph=True)
        v = [torch.ones_like(g) for g in grads]
        return [o.detach() for o in out], [g.detach() for g in grads], torch.autograd.grad(grads, [x, *params], v)

    assert fused.fusable(x, layers)
    got = hvp()
    _unfused(monkeypatch)
    want = hvp()
    for a, b in zip([t for part in got for t in part], [t for part in want for t in part]):
        torch.testing.assert_close(a, b, **TOL)


def test_quantized_or_trainable_bases_are_not_fused():
    """A 4-bit base owns its matmul, and a trainable base needs its weight gradient: no fusion."""
    x = torch.randn(2, 40, 32)
    qmodel = quantize_model(_model(None), bits=4)
    add_lora_to_model(qmodel, LoraConfig(r=4, target_modules="all-linear"))
    attn = qmodel.model.layers[0].self_attn
    assert not fused.fusable(x, (attn.q_proj, attn.k_proj, attn.v_proj))
    qmodel(torch.randint(0, 97, (2, 40)), targets=torch.randint(0, 97, (2, 40)))[1].backward()
    full = _model(None).model.layers[0].self_attn
    assert not fused.fusable(x, (full.q_proj, full.k_proj, full.v_proj))


def test_training_losses_unchanged(monkeypatch):
    """Five LoRA steps on a tiny seeded model: the same training and held-out losses with the
    speed paths as without them (unfused projections, repeated kv heads, RMSNorm's formula,
    LoRALinear's textbook base(x) + s B A x instead of _FusedLoRA and _ThinLoRA)."""
    data = {"input_ids": torch.randint(0, 97, (8, 33), generator=torch.Generator().manual_seed(2))}
    data["labels"] = data["input_ids"]
    held_out = torch.randint(0, 97, (8, 33), generator=torch.Generator().manual_seed(3))
    down_proj = _model("all-linear").model.layers[0].mlp.down_proj   # 33 rows: in 32 fuses, in 64 does not
    assert down_proj._plain(torch.zeros(33, 64)) and not down_proj._can_fuse(torch.zeros(33, 64))

    def run():
        model = _model("all-linear")
        cfg = TrainConfig(steps=5, batch_size=1, lr=1e-2, warmup_steps=0, progress=False, eval_every=0)
        result = train(model, epoch_batches(data, 1, seed=0), cfg,
                       evaluate=lambda m: {"loss": m(held_out, targets=held_out)[1]})
        return [e["loss"] for e in result.loss_log], result.metrics["loss"]

    losses, held = run()
    _unfused(monkeypatch)
    monkeypatch.setattr(llama, "_SDPA_GQA", False)
    monkeypatch.setattr(llama, "_FUSED_RMS_NORM", False)
    monkeypatch.setattr(LoRALinear, "_plain", lambda self, x: False)
    ref_losses, ref_held = run()
    assert losses == pytest.approx(ref_losses, rel=1e-5) and held == pytest.approx(ref_held, rel=1e-5)


def test_rms_norm_and_gqa_paths_equal_plain(monkeypatch):
    """F.rms_norm equals RMSNorm's formula; enable_gqa equals repeating the kv heads."""
    model, idx = _model(None), torch.randint(0, 97, (2, 24))
    model.requires_grad_(True)
    loss, grads = _loss_and_grads(model, idx)
    monkeypatch.setattr(llama, "_SDPA_GQA", False)
    monkeypatch.setattr(llama, "_FUSED_RMS_NORM", False)
    ref_loss, ref_grads = _loss_and_grads(model, idx)
    torch.testing.assert_close(loss, ref_loss, **TOL)
    for name in grads:
        torch.testing.assert_close(grads[name], ref_grads[name], **TOL, msg=name)


def test_swiglu_equals_the_formula_and_is_twice_differentiable():
    g = torch.Generator().manual_seed(0)
    gate, up = (torch.randn(3, 5, 7, dtype=torch.float64, generator=g, requires_grad=True) for _ in range(2))
    grad_out = torch.randn(3, 5, 7, dtype=torch.float64, generator=g)
    got = llama._SwiGLU.apply(gate, up)
    want = F.silu(gate) * up
    torch.testing.assert_close(got, want)
    for a, b in zip(torch.autograd.grad(got, (gate, up), grad_out), torch.autograd.grad(want, (gate, up), grad_out)):
        torch.testing.assert_close(a, b)
    assert torch.autograd.gradcheck(llama._SwiGLU.apply, (gate, up))
    assert torch.autograd.gradgradcheck(llama._SwiGLU.apply, (gate, up))


def test_next_token_loss_equals_shifted_logits():
    """Shifting the labels gives the mean over the same terms as slicing the logits, -100 ignored;
    and the logits' gradient is computed without copying them."""
    logits = torch.randn(3, 7, 11, requires_grad=True)
    labels = torch.randint(0, 11, (3, 7))
    labels[0, 3] = labels[2, 6] = IGNORE_INDEX
    loss = next_token_loss(logits, labels)
    ref = F.cross_entropy(logits[:, :-1].reshape(-1, 11), labels[:, 1:].reshape(-1), ignore_index=IGNORE_INDEX)
    torch.testing.assert_close(loss, ref)
    g, = torch.autograd.grad(loss, logits)
    g_ref, = torch.autograd.grad(ref, logits)
    torch.testing.assert_close(g, g_ref)

    class CountCopies(TorchDispatchMode):
        copies = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func.overloadpacket in (torch.ops.aten.clone, torch.ops.aten._unsafe_view, torch.ops.aten.copy_,
                                       torch.ops.aten.slice_backward):
                CountCopies.copies += 1
            return func(*args, **(kwargs or {}))
    with CountCopies():
        next_token_loss(logits, labels).backward()
    assert CountCopies.copies == 0
