"""The accelerator code paths, one test each: run by .ci/gpu (`pytest -m cuda`), skipped without
the device. CUDA: autocast fp16 + GradScaler, PagedAdamW's pinned host moments, NF4
dequantization and Linear4bit on the GPU, the memory figures (and the planner against them);
the cheap ones also on Apple's MPS where present."""
import pytest
import torch
import torch.nn as nn

from lora.model import add_lora_to_model
from quantization import Linear4bit, dequantize_nf4, quantize_nf4
from quantization.nf4 import NF4Tensor
from trainers.models import GPT2Config, build_model
from trainers.optim import PagedAdamW
from trainers.train import TrainConfig, train

pytestmark = pytest.mark.cuda
HAS_CUDA = torch.cuda.is_available()
HAS_MPS = torch.backends.mps.is_available()
needs_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU (.ci/gpu runs these)")
DEVICES = [pytest.param("cuda", marks=needs_cuda),
           pytest.param("mps", marks=pytest.mark.skipif(not HAS_MPS, reason="needs Apple MPS"))]


def lm_batches(vocab: int, batch: int, seq: int, n: int = 4):
    data = torch.randint(0, vocab, (n * batch, seq), generator=torch.Generator().manual_seed(0))

    def batches(epoch):
        for i in range(n):
            x = data[i * batch:(i + 1) * batch]
            yield {"input_ids": x, "labels": x}
    return batches


@needs_cuda
def test_autocast_fp16_with_grad_scaler_trains_a_lora_model():
    torch.manual_seed(0)
    model = build_model("gpt2", GPT2Config.tiny(vocab_size=97, n_embd=64, n_head=4, block_size=32))
    model.requires_grad_(False)
    add_lora_to_model(model, r=8, lora_alpha=16, target_modules=["c_attn", "c_fc"])
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    cfg = TrainConfig(steps=30, lr=1e-2, warmup_steps=0, device="cuda", dtype="fp16", progress=False, eval_every=0)
    result = train(model, lm_batches(97, 8, 32, n=1), cfg)      # one batch, seen 30 times
    assert result.metrics["autocast_dtype"] == "float16" and result.metrics["device"].startswith("cuda")
    losses = [r["loss"] for r in result.loss_log]
    assert all(torch.isfinite(torch.tensor(losses))) and losses[-1] < 0.8 * losses[0]
    after = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert all(p.dtype == torch.float32 and p.is_cuda for p in after.values())    # fp32 master weights
    assert any(not torch.equal(before[n], after[n].cpu()) for n in before)


@needs_cuda
def test_paged_adamw_keeps_pinned_host_moments_and_matches_torch_adamw():
    torch.manual_seed(0)
    shapes = [(37, 19), (5,), (300,)]
    ours = [torch.randn(s, device="cuda", requires_grad=True) for s in shapes]
    ref = [p.detach().clone().requires_grad_(True) for p in ours]
    opt = PagedAdamW(ours, lr=1e-2, weight_decay=0.1, chunk_size=64)          # several chunks per tensor
    ref_opt = torch.optim.AdamW(ref, lr=1e-2, weight_decay=0.1, foreach=False)
    for step in range(5):
        grads = [torch.randn(s, device="cuda") for s in shapes]
        for p, q, g in zip(ours, ref, grads):
            p.grad, q.grad = g.clone(), g.clone()
        opt.step()
        ref_opt.step()
    for p, q in zip(ours, ref):
        assert torch.equal(p, q)
        state, ref_state = opt.state[p], ref_opt.state[q]
        for key in ("exp_avg", "exp_avg_sq"):
            assert state[key].device.type == "cpu" and state[key].is_pinned()
            assert torch.equal(state[key], ref_state[key].cpu())


def _to(q: NF4Tensor, device) -> NF4Tensor:
    fields = {k: getattr(q, k) for k in ("packed", "absmax", "absmax_codes", "absmax_scales", "absmax_mean")}
    moved = {k: (v.to(device) if v is not None else None) for k, v in fields.items()}
    return NF4Tensor(shape=q.shape, dtype=q.dtype, blocksize=q.blocksize, **moved)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape, blocksize, double_quant", [((257, 129), 64, True), ((64, 4096), 64, True),
                                                              ((33, 65), 128, False)])
def test_nf4_dequantization_on_the_device_equals_the_cpu_bit_for_bit(device, shape, blocksize, double_quant):
    torch.manual_seed(0)
    q = quantize_nf4(torch.randn(shape) * 0.02, blocksize, double_quant)    # odd sizes: a partial last block
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        if device == "mps" and dtype == torch.bfloat16:
            continue
        cpu = dequantize_nf4(q, dtype)
        dev = dequantize_nf4(_to(q, device), dtype)
        assert dev.device.type == device and torch.equal(dev.cpu(), cpu)


@pytest.mark.parametrize("device", DEVICES)
def test_linear4bit_forward_and_backward_on_the_device(device):
    torch.manual_seed(0)
    linear = nn.Linear(96, 80)
    cpu_layer = Linear4bit.from_linear(linear)
    dev_layer = Linear4bit.from_linear(linear).to(device)
    assert dev_layer.weight_packed.device.type == device and dev_layer.absmax_scales.dtype == torch.float32
    assert torch.equal(dev_layer.dequantize(torch.float32).cpu(), cpu_layer.dequantize(torch.float32))
    x = torch.randn(4, 7, 96, requires_grad=True)
    xd = x.detach().to(device).requires_grad_(True)
    g = torch.randn(4, 7, 80)
    y, yd = cpu_layer(x), dev_layer(xd)
    y.backward(g)
    yd.backward(g.to(device))
    torch.testing.assert_close(yd.cpu(), y, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(xd.grad.cpu(), x.grad, rtol=1e-4, atol=1e-4)
    with torch.autocast(device_type=device, dtype=torch.float16):        # a 16-bit compute path too
        half = dev_layer(xd)
    torch.testing.assert_close(half.float().cpu(), y, rtol=2e-2, atol=2e-2)


@needs_cuda
def test_memory_figures_come_from_the_cuda_allocator_and_match_the_plan():
    from trainers.plan import PlanConfig, plan_memory
    torch.manual_seed(0)
    model = build_model("gpt2", GPT2Config(n_layer=6, n_head=6, n_embd=384, vocab_size=8192, block_size=256))
    plan = plan_memory(PlanConfig(model="(this)", method="lora", rank=8, batch=8, seq=256), model)
    model.requires_grad_(False)
    add_lora_to_model(model, r=8, lora_alpha=16, target_modules=["c_attn"])
    cfg = TrainConfig(steps=3, warmup_steps=0, device="cuda", dtype="float32", progress=False, eval_every=0)
    result = train(model, lm_batches(8192, 8, 256, n=3), cfg)
    m = result.metrics
    assert m["peak_memory_kind"] == "cuda_max_allocated"
    assert m["peak_memory_bytes"] == torch.cuda.max_memory_allocated() > 0
    assert abs(plan.total / m["peak_memory_bytes"] - 1) <= 0.15, (plan.total, m["peak_memory_bytes"])
