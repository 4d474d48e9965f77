"""Many adapters on one base (lora/named.py, lora/multi.py, lora/combine.py): each way of computing
compared with another (an adapter alone vs among others, mixed batch vs one adapter at a time,
combinations vs their formulas), files round-tripped, and every change all-or-nothing."""
import copy

import pytest
import torch
import torch.nn as nn
from hypothesis import given, settings
from hypothesis import strategies as st

import lora.model as lora_model
from lora import (LoraConfig, LoRALinear, MultiAdapterLinear, active_adapter, adapter_layers, add_adapter,
                  add_lora_to_model, add_weighted_adapter, delete_adapter, disable_adapters, list_adapters,
                  load_adapter, load_adapters, mark_only_lora_as_trainable, merge_adapters, merge_lora_weights,
                  mixed_batch, save_adapter, save_adapters, set_adapter, unload, unmerge_lora_weights)
from safetensors.torch import load_file

from lora.adapter_io import CONFIG_NAME, WEIGHTS_NAME
from tests.snapshot import assert_files_unchanged, assert_unchanged, snapshot, snapshot_files

D = 8
METHODS = ["lora", "sparse", "hira", "dora", "adalora"]


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.q_proj = nn.Linear(D, D)
        self.v_proj = nn.Linear(D, D, bias=False)
        self.down_proj = nn.Linear(D, D)

    def forward(self, x):
        return self.down_proj(torch.tanh(self.q_proj(x) + self.v_proj(x)))


def base_net():
    torch.manual_seed(0)
    return Net()


def perturb(model, adapter=None, seed=1):
    torch.manual_seed(seed)
    with torch.no_grad():
        for _, layer in adapter_layers(model, adapter):
            for p in layer.adapter_parameters():
                p.copy_(torch.randn_like(p) * 0.3)            # set, not add: the inits differ by RNG state


CONFIGS = {"a": LoraConfig(r=2, target_modules=["q_proj", "v_proj"]),
           "b": LoraConfig(r=3, target_modules=["v_proj", "down_proj"], method="dora"),
           "c": LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "down_proj"])}


def three_adapters():
    """A model with adapters a (LoRA), b (DoRA), c (LoRA), each perturbed, active "a"."""
    model = base_net()
    for i, (name, config) in enumerate(CONFIGS.items()):
        add_adapter(model, name, config)
        set_adapter(model, name)
        perturb(model, seed=i + 1)
    set_adapter(model, "a")
    return model


def alone(name, seed):
    """The adapter `name` on its own model, made exactly as in three_adapters."""
    model = base_net()
    add_lora_to_model(model, CONFIGS[name])
    perturb(model, seed=seed)
    return model


X = torch.randn(4, 5, D)


# --- one adapter looks as today ---------------------------------------------------------------
def test_one_named_adapter_is_the_plain_single_adapter_model():
    named = add_adapter(base_net(), "x", CONFIGS["a"])
    plain = add_lora_to_model(base_net(), CONFIGS["a"])
    assert list(named.state_dict()) == list(plain.state_dict())
    assert [type(m) for m in named.modules()] == [type(m) for m in plain.modules()]
    assert list_adapters(named) == ["x"] and list_adapters(plain) == ["default"]


def test_second_adapter_makes_containers_holding_the_base_once_and_keeps_the_first_bit_for_bit():
    model = add_adapter(base_net(), "a", CONFIGS["a"])
    perturb(model)
    before = model(X)
    add_adapter(model, "b", CONFIGS["b"])
    assert isinstance(model.q_proj, MultiAdapterLinear) and isinstance(model.down_proj, MultiAdapterLinear)
    keys = list(model.state_dict())
    assert keys.count("v_proj.base_layer.weight") == 1 and not any("adapters.a.base_layer" in k for k in keys)
    assert model.v_proj.adapters["a"].base_layer is model.v_proj.adapters["b"].base_layer is model.v_proj.base_layer
    assert torch.equal(model(X), before)                 # "a" still active, same function
    assert active_adapter(model) == "a"


@pytest.mark.parametrize("method", METHODS)
def test_every_method_as_a_named_adapter_computes_what_it_computes_alone(method):
    config = LoraConfig(r=2, target_modules=["q_proj", "down_proj"], method=method)
    single = add_lora_to_model(base_net(), config)
    perturb(single, seed=5)
    model = three_adapters()
    add_adapter(model, "m", config)
    set_adapter(model, "m")
    perturb(model, seed=5)
    torch.testing.assert_close(model(X), single(X), rtol=1e-5, atol=1e-6)
    for i, name in enumerate(CONFIGS):
        set_adapter(model, name)
        torch.testing.assert_close(model(X), alone(name, i + 1)(X), rtol=1e-5, atol=1e-6)


def test_set_adapter_switches_what_computes_and_what_trains():
    model = three_adapters()
    set_adapter(model, "c")
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trained and all(".adapters.c." in n for n in trained)
    assert len(trained) == 4                              # A and B at q_proj and down_proj
    assert [n for n, _ in adapter_layers(model)] == ["q_proj", "down_proj"]   # the allocators' view
    model.requires_grad_(False)                           # a model loaded for inference stays frozen
    set_adapter(model, "a")
    assert not any(p.requires_grad for p in model.parameters())


def test_the_allocators_view_resizes_the_active_adapter_only():
    model = three_adapters()
    set_adapter(model, "c")
    others = {n: p.detach().clone() for n, p in model.named_parameters() if ".adapters.c." not in n}
    y = model(X)
    for _, layer in adapter_layers(model):
        layer.resize(4)
    torch.testing.assert_close(model(X), y, rtol=1e-5, atol=1e-6)
    assert model.q_proj.adapters["c"].rank == 4 and model.q_proj.adapters["a"].rank == 2
    for n, p in model.named_parameters():
        if n in others:
            assert torch.equal(p, others[n])


def test_disable_adapters_gives_the_base_inside_and_the_adapters_after_even_on_errors():
    for model in (three_adapters(), alone("a", 1)):
        base = base_net()(X)
        y = model(X)
        with disable_adapters(model):
            assert torch.equal(model(X), base)
        assert torch.equal(model(X), y)
        before = snapshot(model)
        with pytest.raises(KeyError):
            with disable_adapters(model):
                raise KeyError("inside")
        assert_unchanged(before, model)
        assert torch.equal(model(X), y)


def test_delete_back_to_one_gives_plain_layers_then_the_base():
    model = three_adapters()
    delete_adapter(model, "a")
    assert active_adapter(model) == "b" and list_adapters(model) == ["b", "c"]
    delete_adapter(model, "c")
    torch.testing.assert_close(model(X), alone("b", 2)(X), rtol=1e-5, atol=1e-6)
    assert list(model.state_dict()) == list(alone("b", 2).state_dict())
    assert not any(isinstance(m, MultiAdapterLinear) for m in model.modules())
    delete_adapter(model, "b")
    assert list_adapters(model) == [] and type(model.v_proj) is nn.Linear
    assert torch.equal(model(X), base_net()(X))


def test_unload_and_merge_and_unload_return_plain_layers():
    model = three_adapters()
    set_adapter(model, "c")
    y = model(X)
    merged = merge_lora_weights(copy.deepcopy(model))
    assert all(type(m) in (Net, nn.Linear) for m in merged.modules())
    torch.testing.assert_close(merged(X), y, rtol=1e-5, atol=1e-6)
    merge_adapters(model)
    unload(model)                                        # unmerges first: the base comes back exactly
    assert all(type(m) in (Net, nn.Linear) for m in model.modules())
    assert torch.equal(model(X), base_net()(X))


def test_merged_adapters_refuse_switching():
    model = three_adapters()
    merge_adapters(model)
    for call in (lambda: set_adapter(model, "b"), lambda: add_adapter(model, "z", CONFIGS["a"]),
                 lambda: delete_adapter(model, "b"), lambda: disable_adapters(model).__enter__()):
        with pytest.raises(RuntimeError, match="unmerge first"):
            call()
    unmerge_lora_weights(model)


def test_bad_names_are_refused_by_name():
    model = three_adapters()
    for bad in ("a", "", "x.y", "__base__", 3):
        with pytest.raises(ValueError, match="add_adapter"):
            add_adapter(model, bad, CONFIGS["a"])
    with pytest.raises(ValueError, match="no adapter named 'zz'"):
        set_adapter(model, "zz")
    with pytest.raises(ValueError, match="unknown adapter names"):
        mixed_batch(model, ["a", "zz"]).__enter__()


# --- files ------------------------------------------------------------------------------------
def test_save_adapter_of_a_named_adapter_is_its_single_adapter_file(tmp_path):
    model = three_adapters()
    save_adapter(model, tmp_path / "named", adapter="c")
    save_adapter(alone("c", 3), tmp_path / "single")
    assert (tmp_path / "named" / CONFIG_NAME).read_text() == (tmp_path / "single" / CONFIG_NAME).read_text()
    named, single = (load_file(str(tmp_path / f / WEIGHTS_NAME)) for f in ("named", "single"))
    assert list(named) == list(single) and all(torch.equal(named[k], single[k]) for k in named)


def test_save_adapters_lays_out_folders_as_peft_and_loads_back(tmp_path):
    model = three_adapters()
    add_adapter(model, "default", CONFIGS["a"])
    save_adapters(model, tmp_path)
    assert (tmp_path / "adapter_config.json").exists()
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_dir()) == ["a", "b", "c"]
    loaded = load_adapters(base_net(), tmp_path)
    assert sorted(list_adapters(loaded)) == ["a", "b", "c", "default"]
    for name in list_adapters(model):
        set_adapter(model, name)
        set_adapter(loaded, name)
        assert torch.equal(loaded(X), model(X))


def test_load_adapter_adds_a_named_adapter_beside_the_others(tmp_path):
    save_adapter(alone("c", 3), tmp_path)
    model = add_adapter(base_net(), "a", CONFIGS["a"])
    load_adapter(model, tmp_path, adapter="c")
    assert list_adapters(model) == ["a", "c"] and active_adapter(model) == "a"
    set_adapter(model, "c")
    assert torch.equal(model(X), alone("c", 3)(X))


def test_a_failing_save_adapters_leaves_the_folders(tmp_path, monkeypatch):
    import lora.adapter_save as adapter_save
    model = three_adapters()
    save_adapters(model, tmp_path)
    before = snapshot_files(tmp_path)
    set_adapter(model, "b")
    perturb(model, seed=9)
    calls = []
    real = adapter_save._write_config

    def write_config(text, tmp):
        calls.append(tmp)
        if len(calls) == 3:
            raise OSError("disk full")
        real(text, tmp)
    monkeypatch.setattr(adapter_save, "_write_config", write_config)
    with pytest.raises(OSError, match="disk full"):
        save_adapters(model, tmp_path)
    assert_files_unchanged(before, tmp_path)


# --- mixed batches ----------------------------------------------------------------------------
NAMES = ["a", "b", "c", "__base__"]


@settings(max_examples=25, deadline=None)
@given(st.lists(st.sampled_from(NAMES), min_size=1, max_size=6))
def test_a_mixed_batch_equals_each_example_through_its_own_adapter(names):
    model = MIXED
    x = torch.randn(len(names), 3, D)
    with torch.no_grad(), mixed_batch(model, names):
        y = model(x)
    for i, name in enumerate(names):
        if name == "__base__":
            with disable_adapters(model):
                want = model(x[i:i + 1])
        else:
            set_adapter(model, name)
            want = model(x[i:i + 1])
        torch.testing.assert_close(y[i:i + 1], want, rtol=1e-5, atol=1e-6)
    set_adapter(model, "a")


MIXED = three_adapters()


def test_a_mixed_batch_on_a_single_adapter_model_and_restores_it():
    model = alone("a", 1)
    before = snapshot(model)
    x = torch.randn(3, 2, D)
    with mixed_batch(model, ["__base__", "default", "__base__"]):
        y = model(x)
    assert_unchanged(before, model)
    torch.testing.assert_close(y[1], model(x)[1], rtol=1e-5, atol=1e-6)
    assert torch.equal(y[0], base_net()(x)[0])


def test_mixed_batch_of_the_wrong_size_is_refused():
    with pytest.raises(ValueError, match="3 adapter names"):
        with mixed_batch(three_adapters(), ["a", "b", "c"]) as model:
            model(torch.randn(2, D))


# --- combinations -----------------------------------------------------------------------------
def lora_pair():
    """Two LoRA adapters of the same rank on the same layers, active "c"."""
    model = base_net()
    add_adapter(model, "c", LoraConfig(r=3, lora_alpha=6, target_modules=["q_proj", "down_proj"]))
    add_adapter(model, "d", LoraConfig(r=3, lora_alpha=3, target_modules=["q_proj", "down_proj"]))
    for i, name in enumerate(["c", "d"]):
        set_adapter(model, name)
        perturb(model, seed=i + 1)
    return model


W = [0.7, -0.4]


def test_cat_is_exactly_the_weighted_sum_of_the_updates():
    model = lora_pair()
    add_weighted_adapter(model, ["c", "d"], W, "cat", combination="cat")
    for layer in (model.q_proj, model.down_proj):
        new, c, d = layer.adapters["cat"], layer.adapters["c"], layer.adapters["d"]
        assert new.rank == 6 and new.scaling == 1
        want = W[0] * c.get_delta_weight() + W[1] * d.get_delta_weight()
        torch.testing.assert_close(new.get_delta_weight(), want, rtol=1e-5, atol=1e-6)


def test_linear_is_the_weighted_sum_of_the_factors_not_of_the_updates():
    model = lora_pair()
    add_weighted_adapter(model, ["c", "d"], W, "lin", combination="linear")
    layer = model.q_proj
    new, c, d = layer.adapters["lin"], layer.adapters["c"], layer.adapters["d"]
    ca, cd = (abs(W[0] * c.scaling)) ** 0.5, (abs(W[1] * d.scaling)) ** 0.5
    A = ca * c.lora_A - cd * d.lora_A                     # the sign of w s goes on A
    B = ca * c.lora_B + cd * d.lora_B
    assert new.rank == 3
    torch.testing.assert_close(new.get_delta_weight(), B @ A, rtol=1e-5, atol=1e-6)
    weighted = W[0] * c.get_delta_weight() + W[1] * d.get_delta_weight()
    assert (new.get_delta_weight() - weighted).abs().max() > 1e-2     # the cross terms


@pytest.mark.parametrize("k", [1, 2, 4])
def test_svd_is_the_best_rank_k_approximation_of_the_weighted_sum(k):
    model = lora_pair()
    add_adapter(model, "e", LoraConfig(r=2, target_modules=["q_proj"], method="dora"))
    set_adapter(model, "e")
    perturb(model, seed=3)
    for sources, weights in ((["c", "d"], W), (["c", "e"], [0.5, 1.5])):   # low-rank, and with DoRA
        name = f"svd{len(list_adapters(model))}"
        add_weighted_adapter(model, sources, weights, name, combination="svd", svd_rank=k)
        layer = model.q_proj
        want = sum(w * layer.adapters[s].get_delta_weight() for s, w in zip(sources, weights))
        U, S, Vh = torch.linalg.svd(want.detach())
        best = U[:, :k] @ torch.diag(S[:k]) @ Vh[:k]
        torch.testing.assert_close(layer.adapters[name].get_delta_weight(), best, rtol=1e-4, atol=1e-5)


def test_linear_and_cat_refuse_what_they_cannot_combine():
    model = three_adapters()
    with pytest.raises(ValueError, match="needs low-rank adapters"):
        add_weighted_adapter(model, ["a", "b"], [1, 1], "x", combination="cat")
    with pytest.raises(ValueError, match="one rank"):
        add_weighted_adapter(lora_pair_with_ranks(), ["c", "d"], [1, 1], "x", combination="linear")


def lora_pair_with_ranks():
    model = base_net()
    add_adapter(model, "c", LoraConfig(r=3, target_modules=["q_proj"]))
    add_adapter(model, "d", LoraConfig(r=2, target_modules=["q_proj"]))
    return model


# --- all-or-nothing ---------------------------------------------------------------------------
def fail_on_last_swap(monkeypatch, predicate):
    real = lora_model._set_submodule

    def set_submodule(model, name, module):
        if predicate(name, module):
            raise RuntimeError("injected")
        real(model, name, module)
    monkeypatch.setattr(lora_model, "_set_submodule", set_submodule)


CALLS = {
    "add": lambda m: add_adapter(m, "z", LoraConfig(r=2, target_modules=["q_proj", "v_proj", "down_proj"])),
    "delete": lambda m: delete_adapter(m, "b"),
    "weighted": lambda m: add_weighted_adapter(m, ["a", "c"], [1.0, 0.5], "w", combination="cat"),
}


@pytest.mark.parametrize("what", ["add", "add_to_single", "delete", "delete_to_one", "weighted"])
def test_failing_on_the_last_swap_changes_nothing(monkeypatch, what):
    if what == "add_to_single":
        model, call = alone("a", 1), lambda m: add_adapter(m, "z", CONFIGS["c"])
    elif what == "delete_to_one":
        model = three_adapters()
        delete_adapter(model, "c")
        call = lambda m: delete_adapter(m, "b")   # noqa: E731
    else:
        model, call = three_adapters(), CALLS[what]
    names, active, y = list_adapters(model), active_adapter(model), model(X)
    before = snapshot(model)
    fail_on_last_swap(monkeypatch, lambda name, module: name == "down_proj")
    with pytest.raises(RuntimeError, match="injected"):
        call(model)
    assert_unchanged(before, model)
    assert list_adapters(model) == names and active_adapter(model) == active
    assert torch.equal(model(X), y)


def test_set_adapter_failing_while_setting_flags_changes_nothing(monkeypatch):
    import lora.named as named
    model = three_adapters()
    before = snapshot(model)

    def mark(*args, **kwargs):
        raise RuntimeError("injected")
    monkeypatch.setattr(named, "mark_trainable", mark)
    with pytest.raises(RuntimeError, match="injected"):
        set_adapter(model, "b")
    assert_unchanged(before, model)
    assert active_adapter(model) == "a" and model.q_proj.active == "a"


def test_mark_only_lora_as_trainable_trains_the_active_adapter_only():
    model = three_adapters()
    set_adapter(model, "b")
    model.requires_grad_(True)
    mark_only_lora_as_trainable(model)
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {
        n for n, _ in model.named_parameters() if ".adapters.b." in n}
    assert isinstance(model.v_proj.adapters["b"], nn.Module) and not isinstance(model.v_proj, LoRALinear)
