"""Model surgery: target matching (PEFT rules), errors, freezing, true counts, merging."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from lora import (AdapterLayer, LoraConfig, adapter_layers, add_lora_to_model, count_parameters,
                  lora_state_dict, mark_only_lora_as_trainable, merge_adapters, merge_lora_weights,
                  unmerge_lora_weights)
from lora.model import ADAPTER_CLASSES, METHODS
from tests.adapters import randomize_adapters

D = 8


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.q_proj = nn.Linear(D, D)
        self.v_proj = nn.Linear(D, D, bias=False)
        self.my_q_proj = nn.Linear(D, D)       # must NOT match the list entry "q_proj"
        self.act = nn.GELU()

    def forward(self, x):
        return x + self.v_proj(self.act(self.q_proj(x) + self.my_q_proj(x)))


class Tiny(nn.Module):
    def __init__(self, vocab=11):
        super().__init__()
        self.wte = nn.Embedding(vocab, D)
        self.layers = nn.ModuleList([Block(), Block()])
        self.lm_head = nn.Linear(D, vocab, bias=False)
        self.lm_head.weight = self.wte.weight     # tied, as GPT-2

    def forward(self, idx):
        x = self.wte(idx)
        for block in self.layers:
            x = block(x)
        return self.lm_head(x)


class FakeQuantLinear(nn.Module):
    """A duck-typed stand-in for quantization/'s layers: int8 rows + a per-row scale.

    Its storage (int8 weight + scales) is not its true parameter count (out*in + bias)."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        W = linear.weight.detach()
        scale = W.abs().amax(dim=1, keepdim=True) / 127                       # (out, 1)
        self.qweight = nn.Parameter(torch.round(W / scale).to(torch.int8), requires_grad=False)
        self.scale = nn.Parameter(scale, requires_grad=False)
        self.bias = nn.Parameter(linear.bias.detach().clone(), requires_grad=False)
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.compute_dtype = torch.float32

    def dequantize(self, dtype=None):
        return (self.qweight.float() * self.scale).to(dtype or self.compute_dtype)

    def forward(self, x):
        return F.linear(x, self.dequantize(x.dtype), self.bias)

    def true_param_count(self):
        return self.in_features * self.out_features + self.out_features


def names(model):
    return [n for n, _ in adapter_layers(model)]


def tokens():
    return torch.randint(0, 11, (2, 5))


# --- matching ----------------------------------------------------------------------------------
def test_exact_name_matches_one_module():
    model = add_lora_to_model(Tiny(), target_modules=["layers.0.q_proj"], r=2)
    assert names(model) == ["layers.0.q_proj"]


def test_list_entry_matches_by_dotted_suffix_only():
    model = add_lora_to_model(Tiny(), target_modules=["q_proj"], r=2)
    assert names(model) == ["layers.0.q_proj", "layers.1.q_proj"]   # not my_q_proj


def test_string_is_full_match_regex():
    model = add_lora_to_model(Tiny(), target_modules=r"layers\.1\.(q|v)_proj", r=2)
    assert names(model) == ["layers.1.q_proj", "layers.1.v_proj"]
    with pytest.raises(ValueError, match="matches no module"):
        add_lora_to_model(Tiny(), target_modules="q_proj")              # must match the WHOLE name


def test_all_linear_skips_lm_head():
    model = add_lora_to_model(Tiny(), r=2)                              # default target_modules
    assert set(names(model)) == {f"layers.{i}.{m}" for i in range(2) for m in ("q_proj", "v_proj", "my_q_proj")}


def test_rank_and_alpha_patterns_follow_peft():
    model = add_lora_to_model(Tiny(), target_modules=["q_proj", "v_proj"], r=4, lora_alpha=8,
                              rank_pattern={r"1\.q_proj": 2, "q_proj": 3}, alpha_pattern={"v_proj": 2})
    layers = dict(adapter_layers(model))
    assert layers["layers.1.q_proj"].rank == 2                          # first matching key wins
    assert layers["layers.0.q_proj"].rank == 3
    assert layers["layers.0.v_proj"].rank == 4
    assert layers["layers.0.v_proj"].scaling == pytest.approx(2 / 4)
    assert layers["layers.0.q_proj"].scaling == pytest.approx(8 / 3)
    assert tuple(layers["layers.1.q_proj"].lora_A.shape) == (2, D)


def test_rank_pattern_key_matches_at_dot_boundary():
    model = add_lora_to_model(Tiny(), target_modules=["q_proj", "my_q_proj"], r=4, rank_pattern={"q_proj": 2})
    layers = dict(adapter_layers(model))
    assert layers["layers.0.q_proj"].rank == 2
    assert layers["layers.0.my_q_proj"].rank == 4                       # "my_q_proj" does not end in ".q_proj"


@pytest.mark.parametrize("pattern", ["rank_pattern", "alpha_pattern"])
def test_pattern_key_matching_no_adapted_module_is_an_error(pattern):
    model = Tiny()
    with pytest.raises(ValueError, match=rf"{pattern} key 'k_proj' matches none of the adapted modules.*"
                                         r"layers\.0\.q_proj"):
        add_lora_to_model(model, target_modules=["q_proj"], **{pattern: {"k_proj": 2}})
    with pytest.raises(ValueError, match=f"{pattern} key 'v_proj'"):       # a module, but not a target
        add_lora_to_model(model, target_modules=["q_proj"], **{pattern: {"v_proj": 2}})
    assert adapter_layers(model) == [] and all(p.requires_grad for p in model.parameters())


def test_unknown_target_lists_candidates():
    model = Tiny()
    with pytest.raises(ValueError) as err:
        add_lora_to_model(model, target_modules=["q_proj", "k_proj"])
    msg = str(err.value)
    assert "'k_proj'" in msg and "q_proj" in msg and "v_proj" in msg and "lm_head" in msg
    assert adapter_layers(model) == []                                  # nothing changed


def test_non_linear_target_names_its_type():
    model = Tiny()
    with pytest.raises(TypeError, match="GELU"):
        add_lora_to_model(model, target_modules=["act"])
    with pytest.raises(TypeError, match="Embedding"):
        add_lora_to_model(model, target_modules=["wte"])
    assert adapter_layers(model) == []


@pytest.mark.parametrize("targets", [["q_proj"], ["v_proj"], "all-linear"])
def test_second_surgery_is_refused_whatever_the_targets(targets):
    model = add_lora_to_model(Tiny(), target_modules=["q_proj"])
    with pytest.raises(ValueError, match=r"already has adapters \(2 adapter layers: \['layers.0.q_proj', "
                                         r"'layers.1.q_proj'\]\).*load_adapter.*fresh model"):
        add_lora_to_model(model, target_modules=targets)


@pytest.mark.parametrize("bad, match", [
    (dict(r=0), "rank"), (dict(r=-2), "rank"), (dict(r=2.5), "rank"),
    (dict(rank_pattern={"q_proj": 0}), "rank"), (dict(lora_alpha=0), "lora_alpha"),
    (dict(lora_dropout=1.0), "lora_dropout"), (dict(method="vera"), "lora, sparse, hira, dora, adalora"),
    (dict(target_modules="(unclosed"), "regex"), (dict(bias="some"), "bias"), (dict(init="xavier"), "init"),
])
def test_config_rejects_bad_values(bad, match):
    with pytest.raises(ValueError, match=match):
        LoraConfig(**bad)


def test_overrides_accept_aliases_and_reject_unknown():
    model = add_lora_to_model(Tiny(), LoraConfig(target_modules=["v_proj"]), rank=3, alpha=6, dropout=0.1)
    layer = dict(adapter_layers(model))["layers.0.v_proj"]
    assert layer.rank == 3 and layer.scaling == pytest.approx(2.0)
    with pytest.raises(TypeError, match="unknown option 'rnk'"):
        add_lora_to_model(Tiny(), rnk=3)
    with pytest.raises(TypeError, match="lora.LoraConfig"):
        add_lora_to_model(Tiny(), {"r": 2})


def test_methods_dispatch_to_their_classes():
    for method, cls in ADAPTER_CLASSES.items():
        model = add_lora_to_model(Tiny(), target_modules=["v_proj"], method=method, r=2)
        assert all(type(layer) is cls for _, layer in adapter_layers(model))
    assert set(ADAPTER_CLASSES) <= set(METHODS)


# --- freezing and counting -----------------------------------------------------------------------
@pytest.mark.parametrize("method", sorted(ADAPTER_CLASSES))
def test_only_adapter_parameters_train(method):
    model = add_lora_to_model(Tiny(), target_modules=["q_proj", "v_proj"], method=method, r=2)
    randomize_adapters(model)
    adapter_ids = {id(p) for _, layer in adapter_layers(model) for p in layer.adapter_parameters()}
    assert adapter_ids and {id(p) for p in model.parameters() if p.requires_grad} == adapter_ids
    model(tokens()).square().mean().backward()
    for name, p in model.named_parameters():
        if id(p) in adapter_ids:
            assert p.grad is not None and p.grad.abs().sum() > 0, name
        else:
            assert p.grad is None, name


def test_modules_to_save_and_bias_options():
    model = add_lora_to_model(Tiny(), target_modules=["q_proj"], modules_to_save=["lm_head"], bias="lora_only")
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert model.lm_head.weight.requires_grad                           # (tied with wte.weight)
    assert "layers.0.q_proj.base_layer.bias" in trainable
    assert "layers.0.my_q_proj.bias" not in trainable
    mark_only_lora_as_trainable(model, bias="all")
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert "layers.0.my_q_proj.bias" in trainable and not model.lm_head.weight.requires_grad
    with pytest.raises(ValueError, match="modules_to_save"):
        add_lora_to_model(Tiny(), target_modules=["q_proj"], modules_to_save=["classifier"])


def test_count_parameters_true_counts():
    model = Tiny()
    n_total = sum(p.numel() for p in model.parameters())                # tied weight counted once
    assert count_parameters(model) == (n_total, n_total)
    add_lora_to_model(model, target_modules=["q_proj", "v_proj"], r=3, rank_pattern={"v_proj": 1})
    lora = 2 * (3 * (D + D)) + 2 * (1 * (D + D))
    assert count_parameters(model) == (lora, n_total + lora)
    assert sum(t.numel() for t in lora_state_dict(model).values()) == lora


def test_count_parameters_uses_true_param_count_of_quantized_layers():
    model = Tiny()
    n_total = count_parameters(model)[1]
    for block in model.layers:
        block.q_proj = FakeQuantLinear(block.q_proj)                    # storage: int8 W + scales
    naive = sum(p.numel() for p in model.parameters())
    assert naive == n_total + 2 * D                                     # the scales are storage, not weights
    assert count_parameters(model) == (n_total - 2 * (D * D + D), n_total)   # frozen q_proj layers
    add_lora_to_model(model, target_modules=["q_proj"], r=2)
    assert count_parameters(model) == (2 * 2 * (D + D), n_total + 2 * 2 * (D + D))


def test_lora_state_dict_holds_adapter_tensors_only():
    model = add_lora_to_model(Tiny(), target_modules=["q_proj"], method="sparse", r=2)
    state = lora_state_dict(model, modules_to_save=["lm_head"])
    assert set(state) == {f"layers.{i}.q_proj.{k}" for i in range(2)
                          for k in ("lora_A", "lora_B", "mask_A", "mask_B")} | {"lm_head.weight"}


# --- merging -----------------------------------------------------------------------------------
@settings(max_examples=12, deadline=None)
@given(method=st.sampled_from(sorted(ADAPTER_CLASSES)), r=st.integers(1, 6), seed=st.integers(0, 2**16))
def test_merge_lora_weights_same_outputs_plain_layers(method, r, seed):
    torch.manual_seed(seed)
    model = add_lora_to_model(Tiny(), target_modules=["q_proj", "v_proj"], method=method, r=r)
    randomize_adapters(model)
    idx = tokens()
    with torch.no_grad():
        want = model(idx)
        merged = merge_lora_weights(model)
        got = merged(idx)
    assert merged is model
    assert not any(isinstance(m, AdapterLayer) for m in merged.modules())
    assert all(type(m) is nn.Linear for n, m in merged.named_modules() if n.endswith(("q_proj", "v_proj")))
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5 * float(want.abs().max()))


@pytest.mark.parametrize("method", sorted(ADAPTER_CLASSES))
def test_merge_lora_weights_over_quantized_base(method):
    model = Tiny()
    for block in model.layers:
        block.q_proj = FakeQuantLinear(block.q_proj)
    add_lora_to_model(model, target_modules=["q_proj"], r=2, method=method)
    randomize_adapters(model)
    idx = tokens()
    with torch.no_grad():
        want = model(idx)
        got = merge_lora_weights(model)(idx)
    assert all(type(b.q_proj) is nn.Linear for b in model.layers)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_merge_lora_weights_on_a_bare_adapter_returns_linear():
    layer = ADAPTER_CLASSES["lora"](nn.Linear(D, 3), rank=2)
    randomize_adapters(layer)
    x = torch.randn(4, D)
    with torch.no_grad():
        merged = merge_lora_weights(layer)
        torch.testing.assert_close(merged(x), layer(x), rtol=1e-5, atol=1e-6)
    assert type(merged) is nn.Linear


@pytest.mark.parametrize("method", sorted(ADAPTER_CLASSES))
def test_merge_in_place_then_unmerge_restores_weights(method):
    model = add_lora_to_model(Tiny(), target_modules=["q_proj", "v_proj"], method=method, r=2)
    randomize_adapters(model)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    idx = tokens()
    with torch.no_grad():
        want = model(idx)
        merge_adapters(model)
        assert all(layer.merged for _, layer in adapter_layers(model))
        torch.testing.assert_close(model(idx), want, rtol=1e-4, atol=1e-5)
        unmerge_lora_weights(model)
    assert not any(layer.merged for _, layer in adapter_layers(model))
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]), n


def test_merge_lora_weights_after_in_place_merge_adds_update_once():
    model = add_lora_to_model(Tiny(), target_modules=["q_proj"], r=2)
    randomize_adapters(model)
    idx = tokens()
    with torch.no_grad():
        want = model(idx)
        got = merge_lora_weights(merge_adapters(model))(idx)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("kind", ["Linear4bit", "Linear8bit"])
@pytest.mark.parametrize("method", sorted(ADAPTER_CLASSES))
def test_qlora_composition_with_the_real_quantized_layers(kind, method):
    """add_lora_to_model over quantization's layers (duck-typed by lora): true counts, same merged outputs."""
    layers = pytest.importorskip("quantization.layers")
    model = Tiny()
    n_total = count_parameters(model)[1]
    for block in model.layers:
        block.q_proj = getattr(layers, kind).from_linear(block.q_proj)
        block.v_proj = getattr(layers, kind).from_linear(block.v_proj)
    add_lora_to_model(model, target_modules=["q_proj", "v_proj"], r=2, method=method)
    n_adapter = sum(p.numel() for _, l in adapter_layers(model) for p in l.adapter_parameters())
    assert count_parameters(model) == (n_adapter, n_total + n_adapter)
    randomize_adapters(model)
    idx = tokens()
    with torch.no_grad():
        want = model(idx)
        got = merge_lora_weights(model)(idx)
    assert not any(isinstance(m, (AdapterLayer, getattr(layers, kind))) for m in model.modules())
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4 * float(want.abs().max()))
