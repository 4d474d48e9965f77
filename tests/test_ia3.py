"""IA3 (lora/ia3.py): starts as the base, computes its formula, merges and unmerges exactly, saves and
loads, and its surgery is all-or-nothing (PEFT's files: tests/test_peft_named.py)."""
import copy

import pytest
import torch
import torch.nn as nn
from hypothesis import given, settings
from hypothesis import strategies as st

import lora.model as lora_model
from lora import (IA3Config, IA3Linear, adapter_layers, add_ia3_to_model, load_adapter, merge_adapters,
                  merge_lora_weights, save_adapter, unmerge_lora_weights)
from tests.snapshot import assert_unchanged, snapshot


def scaled(layer, seed=0):
    torch.manual_seed(seed)
    with torch.no_grad():
        layer.ia3_l.copy_(torch.rand_like(layer.ia3_l) + 0.5)
    return layer


@settings(max_examples=20, deadline=None)
@given(d_in=st.integers(1, 9), d_out=st.integers(1, 9), feedforward=st.booleans(), bias=st.booleans(),
       dtype=st.sampled_from([torch.float32, torch.float64]))
def test_ia3_formula_init_and_exact_merge(d_in, d_out, feedforward, bias, dtype):
    base = nn.Linear(d_in, d_out, bias=bias, dtype=dtype)
    W0, b0 = base.weight.detach().clone(), None if base.bias is None else base.bias.detach().clone()
    layer = IA3Linear(base, feedforward=feedforward)
    x = torch.randn(3, d_in, dtype=dtype)
    assert torch.equal(layer(x), base(x))                               # l = 1 at init
    scaled(layer)
    l = layer.ia3_l.detach().flatten()
    want = base(x * l) if feedforward else base(x) * l                  # input side / output side
    torch.testing.assert_close(layer(x), want)
    y = layer(x)
    plain = merge_lora_weights(copy.deepcopy(layer))
    torch.testing.assert_close(plain(x), y, rtol=1e-5, atol=1e-6)   # merge_lora_weights sums in float32
    layer.merge()
    torch.testing.assert_close(layer(x), y)
    layer.unmerge()
    assert torch.equal(base.weight, W0) and (b0 is None or torch.equal(base.bias, b0))   # bit for bit


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.k_proj, self.v_proj = nn.Linear(6, 6), nn.Linear(6, 6)
        self.up_proj, self.down_proj = nn.Linear(6, 10), nn.Linear(10, 6)

    def forward(self, x):
        return self.down_proj(torch.relu(self.up_proj(x))) + self.k_proj(x) * self.v_proj(x)


def test_add_ia3_rescales_keys_values_and_the_feed_forward_input():
    model = add_ia3_to_model(Block(), IA3Config(target_modules=["k_proj", "v_proj", "down_proj"],
                                                feedforward_modules=["down_proj"]))
    kinds = {n: (type(m).__name__, m.ia3_l.shape) for n, m in adapter_layers(model)}
    assert kinds == {"k_proj": ("IA3Linear", (6, 1)), "v_proj": ("IA3Linear", (6, 1)),
                     "down_proj": ("IA3Linear", (1, 10))}
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {
        "k_proj.ia3_l", "v_proj.ia3_l", "down_proj.ia3_l"}


def test_ia3_model_merges_saves_and_loads(tmp_path):
    config = IA3Config(target_modules=["k_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"])
    model = add_ia3_to_model(Block(), config)
    for i, (_, layer) in enumerate(adapter_layers(model)):
        scaled(layer, i)
    x = torch.randn(4, 6)
    y = model(x)
    save_adapter(model, tmp_path)
    torch.manual_seed(0)
    fresh = copy.deepcopy(model)
    for _, layer in adapter_layers(fresh):
        with torch.no_grad():
            layer.ia3_l.fill_(1)
    torch.testing.assert_close(load_adapter(fresh, tmp_path)(x), y)
    merge_adapters(model)
    torch.testing.assert_close(model(x), y)
    unmerge_lora_weights(model)
    assert torch.equal(model(x), y)


def test_feedforward_modules_must_be_targets():
    with pytest.raises(ValueError, match="subset of target_modules"):
        add_ia3_to_model(Block(), target_modules=["k_proj"], feedforward_modules=["down_proj"])


def test_add_ia3_failing_on_the_last_swap_changes_nothing(monkeypatch):
    model = Block()
    before = snapshot(model)
    real = lora_model._set_submodule

    def set_submodule(m, name, module):
        if name == "down_proj" and isinstance(module, IA3Linear):
            raise RuntimeError("injected")
        real(m, name, module)
    monkeypatch.setattr(lora_model, "_set_submodule", set_submodule)
    with pytest.raises(RuntimeError, match="injected"):
        add_ia3_to_model(model, target_modules=["k_proj", "down_proj"], feedforward_modules=["down_proj"])
    assert_unchanged(before, model)
