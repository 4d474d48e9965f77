"""QLoRA by composition: add_lora_to_model(quantize_model(model, bits=4), ...) trains, only the
LoRA parameters get gradients, input gradients flow through the 4-bit layers, and the merged
model can be re-quantized with its error reported."""
import pytest
import torch

from lora import add_lora_to_model, count_parameters, merge_lora_weights
from quantization import Linear4bit, memory_report, quantize_model, requantize_merged
from trainers.models.gpt2 import GPT2Config, GPT2LMHeadModel

TARGETS = ("c_attn", "c_proj", "c_fc")


def _qlora_model():
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config.tiny(n_embd=64))
    with pytest.warns(UserWarning, match="left in float: lm_head"):     # the output head stays float
        quantize_model(model, bits=4, blocksize=32)
    return add_lora_to_model(model, target_modules=TARGETS, r=8, lora_alpha=16)


def test_qlora_trains_only_adapters():
    model = _qlora_model()
    block = model.transformer.h[0]
    assert isinstance(block.attn.c_attn.base_layer, Linear4bit)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.endswith(("lora_A", "lora_B")) for n in trainable)
    # true counts agree between the two packages
    assert count_parameters(model)[1] == memory_report(model).total_params

    # a learnable job: every sequence counts upward in steps of 7 (mod 97) from its own start
    idx = (torch.arange(4)[:, None] * 13 + torch.arange(16)[None, :] * 7) % 97       # (4, 16)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for step in range(30):
        _, loss = model(idx, targets=idx)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if step == 0:
            for n, p in model.named_parameters():
                assert (p.grad is not None) == p.requires_grad, n
            # lora_A of block 0 only gets a gradient through the frozen 4-bit layers above it
            # (lora_B starts at zero, so A's first gradient comes via the loss -> later layers)
            assert model.transformer.h[0].attn.c_attn.lora_B.grad.abs().sum() > 0
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.85 * losses[0], losses


def test_input_gradient_through_quantized_base():
    model = _qlora_model()
    layer = model.transformer.h[1].mlp.c_fc                 # LoRA over Linear4bit
    x = torch.randn(3, 64, requires_grad=True)
    layer(x).pow(2).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    base = layer.base_layer
    assert all(p.grad is None for p in base.parameters())


def test_merge_then_requantize_reports_error():
    model = _qlora_model()
    idx = torch.randint(0, 97, (2, 12))
    with torch.no_grad():
        for _, m in model.named_modules():                  # a non-zero update to merge
            if hasattr(m, "lora_B"):
                m.lora_B.normal_(0, 0.05)
    logits_adapter, _ = model(idx)
    merge_lora_weights(model)
    logits_merged, _ = model(idx)
    assert torch.allclose(logits_adapter, logits_merged, atol=1e-4)
    report = requantize_merged(model, bits=4, blocksize=32, skip=["lm_head"])
    assert len(report.layers) == 2 * 4                      # c_attn, attn.c_proj, c_fc, mlp.c_proj per block
    assert all(0 < r.mean_abs <= r.max_abs for r in report.layers)
    assert isinstance(model.transformer.h[0].attn.c_attn, Linear4bit)
    logits_requant, _ = model(idx)
    assert (logits_requant - logits_merged).norm() < 0.2 * logits_merged.norm()
