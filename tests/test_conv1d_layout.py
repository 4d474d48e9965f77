"""Bases that store their weight (in, out), like transformers' GPT-2 `Conv1D`: every adapter, merging,
PiSSA, quantization and adapter files give the same numbers as over the equivalent nn.Linear.

The Conv1D here copies transformers.pytorch_utils.Conv1D's layout (nx, nf, weight (nx, nf),
y = x W + b) without importing transformers; tests/test_hf_interop.py runs the real one.
"""
import copy
import json

import pytest
import torch
import torch.nn as nn
from hypothesis import given, settings
from hypothesis import strategies as st

from allocation.hutchinson import module_shapes
from lora import (adapter_layers, add_lora_to_model, base_weight, load_adapter, merge_lora_weights, save_adapter)
from lora.base import in_out_features, weight_layout
from lora.model import make_adapter, make_config
from quantization import Linear4bit, Linear8bit, load_quantized, quantize_model, save_quantized

# method name -> extra LoraConfig fields: every adapter kind, and LoRA's rsLoRA and PiSSA variants
METHODS = {"lora": {}, "sparse": {}, "hira": {}, "dora": {}, "adalora": {},
           "rslora": {"method": "lora", "use_rslora": True}, "pissa": {"method": "lora", "init": "pissa"}}


class Conv1D(nn.Module):
    """transformers' Conv1D: y = x W + b with W stored (nx, nf) = (in, out)."""

    def __init__(self, nf: int, nx: int):
        super().__init__()
        self.nf, self.nx = nf, nx
        self.weight = nn.Parameter(torch.randn(nx, nf) * 0.5)
        self.bias = nn.Parameter(torch.randn(nf) * 0.1)

    def forward(self, x):
        return torch.addmm(self.bias, x.reshape(-1, x.shape[-1]), self.weight).view(*x.shape[:-1], self.nf)


def twins(n_in: int, n_out: int) -> tuple[Conv1D, nn.Linear]:
    """A Conv1D and an nn.Linear computing the same function."""
    conv = Conv1D(n_out, n_in)
    linear = nn.Linear(n_in, n_out)
    with torch.no_grad():
        linear.weight.copy_(conv.weight.t())
        linear.bias.copy_(conv.bias)
    return conv, linear


class Block(nn.Module):
    """GPT-2-like names: Conv1D projections, an nn.Linear head."""

    def __init__(self, d: int = 8, linear: bool = False):
        super().__init__()
        layer = (lambda i, o: nn.Linear(i, o)) if linear else (lambda i, o: Conv1D(o, i))
        # sizes are multiples of 64 so NF4 leaves no padding (save_quantized refuses padded storage)
        self.c_attn, self.c_proj, self.lm_head = layer(d, 3 * d), layer(3 * d, d), nn.Linear(d, d)

    def forward(self, x):
        return self.lm_head(torch.tanh(self.c_proj(torch.tanh(self.c_attn(x)))))


def linear_twin(model: Block) -> Block:
    """The same model with nn.Linear projections (weights transposed)."""
    twin = Block(model.lm_head.in_features, linear=True)
    with torch.no_grad():
        for name in ("c_attn", "c_proj"):
            getattr(twin, name).weight.copy_(getattr(model, name).weight.t())
            getattr(twin, name).bias.copy_(getattr(model, name).bias)
        twin.lm_head.load_state_dict(model.lm_head.state_dict())
    return twin


def perturb(layer, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in layer.adapter_parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.3)


def test_base_weight_is_a_transposed_view_not_a_copy():
    conv, linear = twins(5, 7)
    W = base_weight(conv)
    assert W.shape == (7, 5) and W.data_ptr() == conv.weight.data_ptr() and torch.equal(W, conv.weight.t())
    assert weight_layout(conv) == "in_out" and weight_layout(linear) == "out_in"
    assert in_out_features(conv) == in_out_features(linear) == (5, 7)
    assert weight_layout(nn.Conv1d(5, 7, 1)) == "out_in"    # torch's convolution is not a GPT-2 Conv1D


@settings(max_examples=20, deadline=None)
@given(shape=st.sampled_from([(5, 7), (6, 6), (9, 2)]), rank=st.integers(1, 2),
       method=st.sampled_from(sorted(METHODS)))
def test_every_method_over_conv1d_equals_it_over_the_linear(shape, rank, method):
    torch.manual_seed(0)
    conv, linear = twins(*shape)
    stored = conv.weight.detach().clone()
    config = make_config(r=rank, **{"method": method, **METHODS[method]})
    torch.manual_seed(1)
    on_linear = make_adapter(linear, config)
    torch.manual_seed(1)
    on_conv = make_adapter(conv, config)
    assert (on_conv.in_features, on_conv.out_features) == shape
    assert on_conv.lora_A.shape == (rank, shape[0]) and on_conv.lora_B.shape == (shape[1], rank)
    if method == "pissa":   # the residual W0 - s B A went into the Conv1D's own (in, out) storage
        torch.testing.assert_close(conv.weight.t(), linear.weight, rtol=0, atol=1e-5)
        conv_storage_changed = not torch.equal(conv.weight, stored)
        assert conv_storage_changed
    perturb(on_linear)
    on_conv.load_state_dict({k: v for k, v in on_linear.state_dict().items() if not k.startswith("base_layer.")},
                            strict=False)
    x = torch.randn(4, 3, shape[0])
    want = on_linear(x)
    torch.testing.assert_close(on_conv(x), want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(on_conv.get_delta_weight(), on_linear.get_delta_weight(), rtol=1e-5, atol=1e-6)
    before = conv.weight.detach().clone()
    ptr = conv.weight.data_ptr()
    on_conv.merge()
    assert conv.weight.shape == (shape[0], shape[1]) and conv.weight.data_ptr() == ptr   # written in place
    torch.testing.assert_close(on_conv(x), want, rtol=1e-5, atol=1e-5)
    on_conv.unmerge()
    assert torch.equal(conv.weight, before)                                            # bit-exact


def test_merge_lora_weights_keeps_a_conv1d_as_conv1d():
    torch.manual_seed(0)
    model = add_lora_to_model(Block(), r=2, target_modules=["c_attn", "c_proj"], method="dora")
    for _, layer in adapter_layers(model):
        perturb(layer)
    x = torch.randn(3, 8)
    want = model(x)
    merged = merge_lora_weights(model)
    assert type(merged.c_attn) is Conv1D and merged.c_attn.weight.shape == (8, 24)   # checkpoint layout kept
    torch.testing.assert_close(merged(x), want, rtol=1e-5, atol=1e-5)


def test_all_linear_adapts_conv1d_layers():
    model = add_lora_to_model(Block(), r=2, target_modules="all-linear")
    assert [n for n, _ in adapter_layers(model)] == ["c_attn", "c_proj"]                # lm_head excluded


@pytest.mark.parametrize("bits, kind", [(4, Linear4bit), (8, Linear8bit)])
def test_quantizing_a_conv1d_equals_quantizing_its_linear(bits, kind):
    torch.manual_seed(0)
    model = Block()
    x = torch.randn(3, 8)
    reference = quantize_model(linear_twin(model), bits=bits, include_head=True)   # lm_head too, for the check
    quantize_model(model, bits=bits, include_head=True)
    for name in ("c_attn", "c_proj", "lm_head"):
        ours, theirs = getattr(model, name), getattr(reference, name)
        assert type(ours) is kind
        assert torch.equal(ours.dequantize(torch.float32), theirs.dequantize(torch.float32))
        assert torch.equal(ours.bias, theirs.bias)
    torch.testing.assert_close(model(x), reference(x), rtol=1e-6, atol=1e-6)


def test_qlora_on_conv1d_trains_and_saved_quantized_model_loads_back(tmp_path):
    torch.manual_seed(0)
    model = add_lora_to_model(quantize_model(Block(), bits=4), r=2, target_modules="all-linear")
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    x, y = torch.randn(8, 8), torch.randint(0, 8, (8,))
    losses = []
    for _ in range(3):
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    plain = quantize_model(Block(), bits=4)
    save_quantized(plain, tmp_path / "q.safetensors")
    back = load_quantized(Block(), tmp_path / "q.safetensors")         # a float Conv1D model to fill
    assert type(back.c_attn) is Linear4bit and torch.equal(back(x), plain(x))


def test_module_shapes_reads_conv1d():
    assert module_shapes(Block(), ["c_attn", "c_proj"]) == {"c_attn": (8, 24), "c_proj": (24, 8)}


@pytest.mark.parametrize("method", ["lora", "dora"])
def test_files_exchange_between_conv1d_and_linear_models(tmp_path, method):
    torch.manual_seed(0)
    conv_model = Block()
    linear_model = linear_twin(conv_model)
    x = torch.randn(3, 8)
    source = add_lora_to_model(copy.deepcopy(conv_model), r=2, target_modules=["c_attn", "c_proj"], method=method)
    for _, layer in adapter_layers(source):
        perturb(layer)
    save_adapter(source, tmp_path / "conv")
    assert json.loads((tmp_path / "conv" / "adapter_config.json").read_text())["fan_in_fan_out"] is True
    on_linear = load_adapter(copy.deepcopy(linear_model), tmp_path / "conv")
    torch.testing.assert_close(on_linear(x), source(x), rtol=1e-5, atol=1e-5)
    save_adapter(on_linear, tmp_path / "linear")
    assert json.loads((tmp_path / "linear" / "adapter_config.json").read_text())["fan_in_fan_out"] is False
    back = load_adapter(copy.deepcopy(conv_model), tmp_path / "linear")
    torch.testing.assert_close(back(x), source(x), rtol=1e-5, atol=1e-5)


def test_non_boolean_fan_in_fan_out_is_refused_by_name(tmp_path):
    save_adapter(add_lora_to_model(Block(), r=2, target_modules=["c_attn"]), tmp_path)
    file = tmp_path / "adapter_config.json"
    meta = json.loads(file.read_text())
    file.write_text(json.dumps({**meta, "fan_in_fan_out": "yes"}))
    model = Block()
    with pytest.raises(ValueError, match="adapter_config.json: fan_in_fan_out must be true or false, got 'yes'"):
        load_adapter(model, tmp_path)
    assert adapter_layers(model) == []
