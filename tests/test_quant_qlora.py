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


# --- QLoRALinear: the lecture's one-layer form (quantization/qlora.py) ----------------------------
def test_qlora_linear_quantizes_a_float_linear_or_wraps_a_quantized_one():
    import torch.nn as nn

    from lora import LoRALinear
    from quantization import Linear8bit, QLoRALinear
    torch.manual_seed(0)
    linear = nn.Linear(64, 32)
    before = linear.weight.detach().clone()
    layer = QLoRALinear(linear, rank=4, alpha=8)
    assert isinstance(layer, LoRALinear) and isinstance(layer.base_layer, Linear4bit)
    assert torch.equal(linear.weight, before)                               # the given layer is left as it is
    assert {n for n, p in layer.named_parameters() if p.requires_grad} == {"lora_A", "lora_B"}
    with torch.no_grad():
        layer.lora_B.normal_()
    x = torch.randn(5, 64)
    want = Linear4bit.from_linear(linear)(x) + layer.scaling * (x @ layer.lora_A.t()) @ layer.lora_B.t()
    torch.testing.assert_close(layer(x), want)
    assert isinstance(QLoRALinear(linear, rank=2, method="int8").base_layer, Linear8bit)
    assert isinstance(QLoRALinear(linear, rank=2, bits=8).base_layer, Linear8bit)
    assert QLoRALinear(linear, blocksize=32, double_quant=False).base_layer.blocksize == 32
    packed = Linear4bit.from_linear(linear, blocksize=32)
    assert QLoRALinear(packed, rank=2).base_layer is packed                 # already quantized: used as it is
    with pytest.raises(TypeError, match=r"already quantized \(Linear4bit\).*\['bits'\]"):
        QLoRALinear(packed, bits=4)
    with pytest.raises(ValueError, match="bits=4 and method='int8' disagree"):
        QLoRALinear(linear, bits=4, method="int8")
    with pytest.raises(ValueError, match="double_quant is an NF4 option"):
        QLoRALinear(linear, bits=8, double_quant=False)
    with pytest.raises(TypeError, match="already an adapter"):
        QLoRALinear(layer)
    with pytest.raises(TypeError, match="must be an nn.Linear.*got Conv1d"):
        QLoRALinear(nn.Conv1d(4, 4, 1))
    from test_conv1d_layout import twins                                   # transformers' Conv1D, (in, out)
    conv, twin = twins(64, 32)
    assert torch.equal(QLoRALinear(conv).base_layer.dequantize(), Linear4bit.from_linear(twin).dequantize())


def test_qlora_linear_layers_save_and_load_as_lora(tmp_path):
    """Swapped in by hand, QLoRALinear layers are LoRA adapters to the adapter files, both ways."""
    from lora import adapter_layers, load_adapter, save_adapter
    from quantization import QLoRALinear

    def with_qlora_layers():
        torch.manual_seed(0)
        model = GPT2LMHeadModel(GPT2Config.tiny(n_embd=64))
        for block in model.transformer.h:
            block.attn.c_attn = QLoRALinear(block.attn.c_attn, rank=4, blocksize=32)
        return model

    model = with_qlora_layers()
    with torch.no_grad():
        for _, layer in adapter_layers(model):
            layer.lora_B.normal_()
    save_adapter(model, tmp_path)
    idx = torch.randint(0, 97, (2, 8))
    into_same_kind = load_adapter(with_qlora_layers(), tmp_path)           # existing QLoRALinear adapters
    assert torch.equal(into_same_kind(idx)[0], model(idx)[0])
    torch.manual_seed(0)
    plain = GPT2LMHeadModel(GPT2Config.tiny(n_embd=64))
    quantize_model(plain, bits={"c_attn": 4}, blocksize=32)
    fresh = load_adapter(plain, tmp_path)                                   # LoRALinear over Linear4bit
    assert torch.equal(fresh(idx)[0], model(idx)[0])


def test_only_qlora_py_joins_lora_and_quantization():
    """The layering DESIGN.md asks for, read from the sources: lora never imports quantization; of
    quantization, only qlora.py imports lora at module level (__init__ exports QLoRALinear lazily,
    inside a function), so `import quantization` needs torch alone."""
    import ast
    from pathlib import Path
    root = Path(__file__).resolve().parents[1]

    def imports(nodes):
        names = []
        for node in nodes:
            if isinstance(node, ast.Import):
                names += [a.name.split(".")[0] for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                names.append(node.module.split(".")[0])
        return names

    for path in (root / "lora").glob("*.py"):                   # anywhere in the file
        assert "quantization" not in imports(ast.walk(ast.parse(path.read_text()))), path.name
    for path in (root / "quantization").glob("*.py"):           # at module level
        uses_lora = "lora" in imports(ast.parse(path.read_text()).body)
        assert uses_lora == (path.name == "qlora.py"), path.name
