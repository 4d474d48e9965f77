"""quantize_model (patterns, mixed bits, skip, tied weights, errors), memory_report,
safetensors round trip, requantize_merged."""
import pytest
import torch
import torch.nn as nn

from quantization import (Linear4bit, Linear8bit, load_quantized, memory_report, nf4_bits_formula,
                          quantize_model, requantize_merged, save_quantized)


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(50, 64)
        self.blocks = nn.ModuleList(nn.ModuleDict({"q_proj": nn.Linear(64, 64), "up": nn.Linear(64, 256),
                                                   "down": nn.Linear(256, 64, bias=False)}) for _ in range(2))
        self.head = nn.Linear(64, 10)

    def forward(self, idx):
        h = self.emb(idx)
        for b in self.blocks:
            h = h + b["q_proj"](h)
            h = h + b["down"](torch.relu(b["up"](h)))
        return self.head(h)


def _kinds(model):
    return {n: type(m).__name__ for n, m in model.named_modules()
            if isinstance(m, (nn.Linear, Linear4bit, Linear8bit))}


def test_quantize_all_4bit_and_outputs_close():
    model = Tiny()
    idx = torch.randint(0, 50, (3, 7))
    ref = model(idx)
    assert quantize_model(model, bits=4) is model
    assert set(_kinds(model).values()) == {"Linear4bit"}
    out = model(idx)
    assert (out - ref).norm() < 0.2 * ref.norm()            # 7 stacked 4-bit layers, random weights
    assert all(not p.requires_grad for n, p in model.named_parameters() if n.endswith("bias") and "blocks" in n)


def test_mixed_bits_patterns_and_skip():
    model = Tiny()
    quantize_model(model, bits={"q_proj": 8, r"blocks\.\d+\.(up|down)": 4}, skip=["blocks.1.down"])
    k = _kinds(model)
    assert k["blocks.0.q_proj"] == k["blocks.1.q_proj"] == "Linear8bit"     # dotted suffix
    assert k["blocks.0.up"] == k["blocks.0.down"] == k["blocks.1.up"] == "Linear4bit"   # regex full match
    assert k["blocks.1.down"] == "Linear"                                    # skipped
    assert k["head"] == "Linear"                                             # no pattern matched
    # an exact name wins over an earlier, more general pattern
    m2 = Tiny()
    quantize_model(m2, bits={r".*": 4, "head": 8})
    assert _kinds(m2)["head"] == "Linear8bit" and _kinds(m2)["blocks.0.up"] == "Linear4bit"


@pytest.mark.parametrize("bits", [3, 16, 2.5, True, "4"])
def test_bad_bits(bits):
    with pytest.raises(ValueError, match="bits must be 4 or 8"):
        quantize_model(Tiny(), bits=bits)
    with pytest.raises(ValueError, match="bits must be 4 or 8"):
        quantize_model(Tiny(), bits={"head": bits})


def test_bad_patterns_and_models():
    with pytest.raises(ValueError, match="matches no nn.Linear.*candidates"):
        quantize_model(Tiny(), bits={"nope": 4})
    with pytest.raises(ValueError, match="skip pattern"):
        quantize_model(Tiny(), skip=["nope"])
    with pytest.raises(ValueError, match="no nn.Linear"):
        quantize_model(nn.Sequential(nn.ReLU()))
    with pytest.raises(ValueError, match="from_linear"):
        quantize_model(nn.Linear(4, 4))
    model = Tiny()
    with torch.no_grad():
        model.head.weight[0, 0] = float("inf")
    with pytest.raises(ValueError, match="layer 'head'.*NaN/inf"):
        quantize_model(model)
    with pytest.raises(ValueError, match="blocksize"):
        quantize_model(Tiny(), blocksize=48)
    assert set(_kinds(model).values()) == {"Linear"}         # nothing half-done


def test_memory_report_true_counts():
    model = Tiny()
    n_float = sum(p.numel() for p in model.parameters())
    quantize_model(model, bits={"up": 4, "down": 4, "q_proj": 8}, double_quant=True)
    rep = memory_report(model)
    assert rep.total_params == n_float                       # true counts, not packed bytes
    rows = {r.name: r for r in rep.layers}
    up = rows["blocks.0.up"]
    assert up.kind == "nf4" and up.params == 64 * 256 + 256
    assert up.bytes == model.blocks[0]["up"].storage_bytes()
    down = rows["blocks.0.down"]                              # no bias: bits/param = NF4 formula + mean
    assert down.bits_per_param == pytest.approx(nf4_bits_formula(64, True) + 32 / (64 * 256), abs=1e-9)
    assert rows["blocks.0.q_proj"].kind == "int8"
    assert rows["emb"].kind == "float32" and rows["emb"].bytes == 50 * 64 * 4
    assert rep.total_bytes == sum(r.bytes for r in rep.layers) < 4 * n_float
    text = str(rep)
    assert "blocks.0.up" in text and "total" in text and f"{n_float:,}" in text


def test_tied_weights_left_in_float():
    from trainers.models.gpt2 import GPT2Config, GPT2LMHeadModel
    model = GPT2LMHeadModel(GPT2Config.tiny())
    n = sum(p.numel() for p in model.parameters())
    with pytest.warns(UserWarning, match=r"lm_head \(its weight is shared with another module: tied\)"):
        quantize_model(model, bits=4, include_head=True)                # even when heads may be quantized
    assert type(model.lm_head) is nn.Linear and model.lm_head.weight is model.transformer.wte.weight
    assert isinstance(model.transformer.h[0].attn.c_attn, Linear4bit)
    assert memory_report(model).total_params == n
    idx = torch.randint(0, 97, (2, 9))
    _, loss = model(idx, targets=idx)
    assert torch.isfinite(loss)


@pytest.mark.parametrize("bits", [4, 8, {"up": 4, "q_proj": 8}])
def test_save_load_bit_exact(tmp_path, bits):
    torch.manual_seed(0)
    model = Tiny()
    quantize_model(model, bits=bits, compute_dtype=torch.bfloat16 if bits == 8 else None, blocksize=128)
    path = tmp_path / "q.safetensors"
    save_quantized(model, path)
    fresh = Tiny()                                           # float architecture, other random weights
    load_quantized(fresh, path)
    a, b = model.state_dict(), fresh.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k
    assert _kinds(fresh) == _kinds(model)
    q, f = model.blocks[0]["up"], fresh.blocks[0]["up"]
    assert (f.blocksize, f.compute_dtype, f.weight_dtype) == (q.blocksize, q.compute_dtype, q.weight_dtype)
    idx = torch.randint(0, 50, (2, 5))
    assert torch.equal(model(idx), fresh(idx))


def test_load_needs_metadata_and_matching_shapes(tmp_path):
    from safetensors.torch import save_model
    plain = tmp_path / "plain.safetensors"
    save_model(Tiny(), str(plain))
    with pytest.raises(ValueError, match="metadata"):
        load_quantized(Tiny(), plain)
    model = quantize_model(Tiny(), bits=4)
    save_quantized(model, tmp_path / "q.safetensors")
    other = Tiny()
    other.head = nn.Linear(64, 11)
    with pytest.raises(ValueError, match="head is 64->11"):
        load_quantized(other, tmp_path / "q.safetensors")


def test_requantize_merged_reports_error():
    torch.manual_seed(0)
    model = Tiny()
    quantize_model(model, bits=4, skip=["head"])
    # stand-in for lora.merge_lora_weights: plain float Linear holding dequantized W + ΔW
    for b in model.blocks:
        for key in ("q_proj", "up"):
            q = b[key]
            lin = nn.Linear(q.in_features, q.out_features)
            with torch.no_grad():
                lin.weight.copy_(q.dequantize(torch.float32) + 1e-3 * torch.randn(q.out_features, q.in_features))
                lin.bias.copy_(q.bias)
            b[key] = lin
    merged = {n: m.weight.detach().clone() for n, m in model.named_modules() if type(m) is nn.Linear}
    report = requantize_merged(model, bits=4, skip=["head"])
    names = [r.name for r in report.layers]
    assert sorted(names) == sorted(n for n in merged if n != "head")
    for r in report.layers:
        err = (model.get_submodule(r.name).dequantize(torch.float32) - merged[r.name]).abs()
        assert r.max_abs == pytest.approx(float(err.max())) and r.mean_abs == pytest.approx(float(err.mean()))
        assert 0 < r.mean_abs <= r.max_abs
    assert isinstance(model.blocks[0]["q_proj"], Linear4bit) and type(model.head) is nn.Linear
    assert "blocks.0.up" in str(report)


def tiny_llama():
    from trainers.models.llama import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig.tiny(dim=32, n_layers=1, n_heads=4, n_kv_heads=2, hidden_dim=64))


def test_output_head_and_embeddings_stay_float_by_default():
    """QLoRA practice: the LM head (here untied) and the embeddings stay float, and the call says so."""
    model = tiny_llama()
    with pytest.warns(UserWarning, match=r"left in float: lm_head \(output head; include_head=True.*"
                                         r"embeddings stay float too: \['model.embed_tokens'\]"):
        quantize_model(model, bits=4)
    assert type(model.lm_head) is nn.Linear and type(model.model.embed_tokens) is nn.Embedding
    assert isinstance(model.model.layers[0].self_attn.q_proj, Linear4bit)
    included = quantize_model(tiny_llama(), bits=4, include_head=True)
    assert isinstance(included.lm_head, Linear4bit)
    classifier = Tiny()                                      # task heads too (score, classifier, ...)
    classifier.classifier = classifier.head
    del classifier.head
    with pytest.warns(UserWarning, match="left in float: classifier"):
        quantize_model(classifier, bits=8)
    assert type(classifier.classifier) is nn.Linear and isinstance(classifier.blocks[0]["up"], Linear8bit)


def test_method_names_the_format():
    assert set(_kinds(quantize_model(Tiny(), method="nf4")).values()) == {"Linear4bit"}
    assert set(_kinds(quantize_model(Tiny(), method="int8")).values()) == {"Linear8bit"}   # bits 8 implied
    assert set(_kinds(quantize_model(Tiny(), bits=8, method="int8")).values()) == {"Linear8bit"}
    mixed = quantize_model(Tiny(), bits={"up": 4, "down": 4}, method="nf4")
    assert _kinds(mixed)["blocks.0.up"] == "Linear4bit" and _kinds(mixed)["head"] == "Linear"
    model = Tiny()
    with pytest.raises(ValueError, match=r"bits=4 and method='int8' disagree \(int8 is 8-bit\)"):
        quantize_model(model, bits=4, method="int8")
    with pytest.raises(ValueError, match=r"bits\['up'\]=8 and method='nf4' disagree"):
        quantize_model(model, bits={"down": 4, "up": 8}, method="nf4")
    with pytest.raises(ValueError, match=r"method must be one of \['int8', 'nf4'\], got 'fp4'"):
        quantize_model(model, method="fp4")
    assert set(_kinds(model).values()) == {"Linear"}         # refusals change nothing
