"""Adapter files: PEFT layout, bit-exact round trips for every method, clear refusals that change nothing."""
import copy
import json
import tempfile

import pytest
import torch
import torch.nn as nn
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

from lora import LoraConfig, adapter_layers, add_lora_to_model, load_adapter, save_adapter
from lora.adapter_io import CONFIG_NAME, WEIGHTS_NAME
from lora.model import ADAPTER_CLASSES
from tests.adapters import randomize_adapters

D = 8


class Block(nn.Module):
    def __init__(self, d=D):
        super().__init__()
        self.q_proj = nn.Linear(d, d)
        self.v_proj = nn.Linear(d, d, bias=False)

    def forward(self, x):
        return x + self.v_proj(torch.tanh(self.q_proj(x)))


class Tiny(nn.Module):
    def __init__(self, d=D, n_layers=2):
        super().__init__()
        self.layers = nn.ModuleList([Block(d) for _ in range(n_layers)])
        self.head = nn.Linear(d, 3)

    def forward(self, x):
        for block in self.layers:
            x = block(x)
        return self.head(x)


def fresh(seed=1, **kwargs):
    torch.manual_seed(seed)          # the same "pretrained" base weights every time
    return Tiny(**kwargs)


def trained(method, seed=1, d=D, **config):
    """A model whose adapters hold random (non-initial) values in every tensor that trains."""
    config = LoraConfig(**{"target_modules": ["q_proj", "v_proj"], "r": 4, "method": method, **config})
    model = add_lora_to_model(fresh(seed, d=d), config)
    torch.manual_seed(123)
    randomize_adapters(model, 0.3)
    return model, config


def adapter_state(model):
    return {f"{n}.{k}": v.detach().clone() for n, layer in adapter_layers(model)
            for k, v in layer.state_dict().items() if not k.startswith("base_layer.")}


def model_state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_same_state(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k


METHODS = sorted(ADAPTER_CLASSES)


@pytest.mark.parametrize("method", METHODS)
def test_round_trip_onto_fresh_model_is_bit_exact(method, tmp_path):
    model, config = trained(method)
    if method == "sparse":
        for _, layer in adapter_layers(model):
            layer.prune_to(0.5)
    if method == "adalora":
        for _, layer in adapter_layers(model):
            layer.set_mask(torch.arange(layer.rank) % 2 == 0)          # prune half the triplets
    x = torch.randn(5, D)
    save_adapter(model, tmp_path, config)
    loaded = load_adapter(fresh(), tmp_path)
    assert_same_state(adapter_state(loaded), adapter_state(model))
    assert_same_state(model_state(loaded), model_state(model))
    assert torch.equal(loaded(x), model(x))
    assert not any(p.requires_grad for p in loaded.parameters())      # frozen, as PEFT's is_trainable=False
    loaded = load_adapter(fresh(), tmp_path, is_trainable=True)
    trainable = {n for n, p in loaded.named_parameters() if p.requires_grad}
    assert trainable == {n for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("method", METHODS)
def test_round_trip_into_model_with_adapters(method, tmp_path):
    model, config = trained(method)
    save_adapter(model, tmp_path, config)
    target = add_lora_to_model(fresh(), config)
    load_adapter(target, tmp_path)
    assert_same_state(model_state(target), model_state(model))


def test_file_layout_is_peft_lora(tmp_path):
    model, config = trained("lora", rank_pattern={r"1\.v_proj": 2}, lora_alpha=8)
    save_adapter(model, tmp_path, config, base_model_name_or_path="tiny")
    meta = json.loads((tmp_path / CONFIG_NAME).read_text())
    assert meta["peft_type"] == "LORA" and meta["r"] == 4 and meta["lora_alpha"] == 8
    assert meta["target_modules"] == ["q_proj", "v_proj"] and meta["fan_in_fan_out"] is False
    assert meta["rank_pattern"] == {"layers.1.v_proj": 2} and meta["use_dora"] is False
    assert meta["base_model_name_or_path"] == "tiny" and meta["bias"] == "none"
    tensors = load_file(str(tmp_path / WEIGHTS_NAME))
    assert tensors["base_model.model.layers.0.q_proj.lora_A.weight"].shape == (4, D)
    assert tensors["base_model.model.layers.1.v_proj.lora_B.weight"].shape == (D, 2)
    assert len(tensors) == 8
    assert not [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")]   # no temp files left


def test_dora_magnitude_uses_peft_key(tmp_path):
    model, config = trained("dora")
    save_adapter(model, tmp_path, config)
    tensors = load_file(str(tmp_path / WEIGHTS_NAME))
    assert tensors["base_model.model.layers.0.q_proj.lora_magnitude_vector"].shape == (D,)
    assert json.loads((tmp_path / CONFIG_NAME).read_text())["use_dora"] is True


@pytest.mark.parametrize("method", METHODS)
def test_resized_ranks_are_saved_per_layer(tmp_path, method):
    model, config = trained(method)
    layers = dict(adapter_layers(model))
    layers["layers.0.q_proj"].resize(2)
    layers["layers.1.v_proj"].resize(6)
    x = torch.randn(3, D)
    save_adapter(model, tmp_path, config)
    loaded = load_adapter(fresh(), tmp_path)
    assert {n: l.rank for n, l in adapter_layers(loaded)} == {n: l.rank for n, l in adapter_layers(model)}
    assert torch.equal(loaded(x), model(x))
    assert_same_state(model_state(loaded), model_state(model))


def test_sparse_factors_are_saved_masked(tmp_path):
    model, config = trained("sparse")
    layer = adapter_layers(model)[0][1]
    layer.prune_to(0.5)
    with torch.no_grad():
        layer.lora_A.add_(1.0)                                         # pruned entries drift (no apply_masks_)
    x = torch.randn(3, D)
    save_adapter(model, tmp_path, config)
    tensors = load_file(str(tmp_path / WEIGHTS_NAME))
    saved_A = tensors["base_model.model.layers.0.q_proj.lora_A.weight"]
    assert (saved_A[~layer.mask_A] == 0).all() and (~layer.mask_A).any()
    loaded = load_adapter(fresh(), tmp_path)
    torch.testing.assert_close(loaded(x), model(x), rtol=1e-5, atol=1e-6)


def test_save_without_config_infers_it(tmp_path):
    model, _ = trained("hira", r=3)
    save_adapter(model, tmp_path)
    meta = json.loads((tmp_path / CONFIG_NAME).read_text())
    assert meta["method"] == "hira" and meta["r"] == 3 and meta["peft_type"] == "NANOPEFT_HIRA"
    assert_same_state(model_state(load_adapter(fresh(), tmp_path)), model_state(model))


def test_save_refuses_config_of_another_method(tmp_path):
    model, config = trained("dora")
    with pytest.raises(ValueError, match="'lora'.*'dora'"):
        save_adapter(model, tmp_path, LoraConfig(target_modules=["q_proj", "v_proj"], r=4))


def test_saving_over_an_existing_adapter_replaces_it(tmp_path):
    first, config = trained("lora", seed=1)
    save_adapter(first, tmp_path, config)
    second, _ = trained("lora", seed=1)
    with torch.no_grad():
        adapter_layers(second)[0][1].lora_B.add_(1.0)
    save_adapter(second, tmp_path, config)
    assert_same_state(model_state(load_adapter(fresh(), tmp_path)), model_state(second))


# --- refusals leave the model untouched -----------------------------------------------------
def check_untouched(model, before, grads):
    assert_same_state(model_state(model), before)
    assert {n for n, p in model.named_parameters() if p.requires_grad} == grads


def snapshot(model):
    return model_state(model), {n for n, p in model.named_parameters() if p.requires_grad}


def test_rank_mismatch_names_the_key(tmp_path):
    model, config = trained("lora")                                    # r = 4
    save_adapter(model, tmp_path, config)
    target = add_lora_to_model(fresh(), target_modules=["q_proj", "v_proj"], r=8)
    before = snapshot(target)
    with pytest.raises(ValueError, match=r"base_model\.model\.layers\.0\.q_proj\.lora_A\.weight.*\(4, 8\).*\(8, 8\)"):
        load_adapter(target, tmp_path)
    check_untouched(target, *before)


def test_width_mismatch_on_fresh_model_names_the_key(tmp_path):
    model, config = trained("lora")
    save_adapter(model, tmp_path, config)
    target = fresh(d=6)
    before = snapshot(target)
    with pytest.raises(ValueError, match=r"layers\.0\.q_proj\.lora_A\.weight"):
        load_adapter(target, tmp_path)
    check_untouched(target, *before)
    assert adapter_layers(target) == []


def test_target_mismatch_names_the_key(tmp_path):
    model, config = trained("lora")
    save_adapter(model, tmp_path, config)
    target = add_lora_to_model(fresh(), target_modules=["q_proj"], r=4)   # no v_proj adapters
    before = snapshot(target)
    with pytest.raises(ValueError, match=r"layers\.0\.v_proj\.lora_A\.weight"):
        load_adapter(target, tmp_path)
    check_untouched(target, *before)
    fewer_layers = fresh(n_layers=1)                                    # the file has layers.1.*
    before = snapshot(fewer_layers)
    with pytest.raises(ValueError, match=r"layers\.1\.q_proj\.lora_A\.weight"):
        load_adapter(fewer_layers, tmp_path)
    check_untouched(fewer_layers, *before)


def test_method_mismatch_is_refused(tmp_path):
    model, config = trained("hira")
    save_adapter(model, tmp_path, config)
    target = add_lora_to_model(fresh(), target_modules=["q_proj", "v_proj"], r=4)
    before = snapshot(target)
    with pytest.raises(ValueError, match="hira.*LoRALinear"):
        load_adapter(target, tmp_path)
    check_untouched(target, *before)


def test_missing_tensor_names_the_key(tmp_path):
    model, config = trained("dora")
    save_adapter(model, tmp_path, config)
    tensors = load_file(str(tmp_path / WEIGHTS_NAME))
    del tensors["base_model.model.layers.1.q_proj.lora_magnitude_vector"]
    save_file(tensors, str(tmp_path / WEIGHTS_NAME))
    target = fresh()
    before = snapshot(target)
    with pytest.raises(ValueError, match=r"layers\.1\.q_proj\.lora_magnitude_vector"):
        load_adapter(target, tmp_path)
    check_untouched(target, *before)


@pytest.mark.parametrize("keep", [0, 10, 0.5, -10])
def test_truncated_weights_fail_clearly_and_change_nothing(tmp_path, keep):
    model, config = trained("lora")
    save_adapter(model, tmp_path, config)
    file = tmp_path / WEIGHTS_NAME
    data = file.read_bytes()
    cut = int(len(data) * keep) if isinstance(keep, float) else keep % len(data)
    file.write_bytes(data[:cut])
    for target in (fresh(), add_lora_to_model(fresh(), config)):
        before = snapshot(target)
        with pytest.raises(ValueError, match="truncated or corrupt"):
            load_adapter(target, tmp_path)
        check_untouched(target, *before)


def test_corrupt_config_fails_clearly(tmp_path):
    model, config = trained("lora")
    save_adapter(model, tmp_path, config)
    (tmp_path / CONFIG_NAME).write_text('{"peft_type": "LORA", "r": 4,')
    with pytest.raises(ValueError, match="not valid JSON"):
        load_adapter(fresh(), tmp_path)
    (tmp_path / CONFIG_NAME).write_text(json.dumps({"peft_type": "LORA", "r": 0, "lora_alpha": 8,
                                                    "target_modules": ["q_proj"]}))
    with pytest.raises(ValueError, match="rank"):
        load_adapter(fresh(), tmp_path)
    (tmp_path / CONFIG_NAME).write_text(json.dumps({"peft_type": "LOHA", "target_modules": ["q_proj"]}))
    with pytest.raises(ValueError, match="peft_type 'LOHA'"):
        load_adapter(fresh(), tmp_path)
    with pytest.raises(FileNotFoundError, match=CONFIG_NAME):
        load_adapter(fresh(), tmp_path / "nowhere")


def test_loading_into_merged_adapters_is_refused(tmp_path):
    model, config = trained("lora")
    save_adapter(model, tmp_path, config)
    target = add_lora_to_model(fresh(), config)
    adapter_layers(target)[0][1].merge()
    with pytest.raises(ValueError, match="unmerge"):
        load_adapter(target, tmp_path)


def test_modules_to_save_round_trip(tmp_path):
    model, config = trained("lora", modules_to_save=["head"])
    with torch.no_grad():
        model.head.weight.add_(1.0)
    save_adapter(model, tmp_path, config)
    assert "base_model.model.head.weight" in load_file(str(tmp_path / WEIGHTS_NAME))
    loaded = load_adapter(fresh(), tmp_path, is_trainable=True)
    assert_same_state(model_state(loaded), model_state(model))
    assert loaded.head.weight.requires_grad


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("method", ["lora", "dora"])
def test_round_trip_keeps_half_precision_bit_exact(tmp_path, dtype, method):
    model = add_lora_to_model(fresh().to(dtype), target_modules=["q_proj", "v_proj"], r=4, method=method)
    with torch.no_grad():
        for _, layer in adapter_layers(model):
            layer.lora_B.normal_()
    save_adapter(model, tmp_path)
    assert load_file(str(tmp_path / WEIGHTS_NAME))["base_model.model.layers.0.q_proj.lora_B.weight"].dtype == dtype
    loaded = load_adapter(fresh().to(dtype), tmp_path)
    assert_same_state(model_state(loaded), model_state(model))


class Int8Rows(nn.Module):
    """A duck-typed quantized base (quantization/ is not imported by lora)."""

    def __init__(self, linear):
        super().__init__()
        W = linear.weight.detach()
        self.register_buffer("scale", W.abs().amax(dim=1, keepdim=True) / 127)
        self.register_buffer("qweight", torch.round(W / self.scale).to(torch.int8))
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().clone(), requires_grad=False)
        self.in_features, self.out_features = linear.in_features, linear.out_features

    def dequantize(self, dtype=None):
        return (self.qweight.float() * self.scale).to(dtype or torch.float32)

    def forward(self, x):
        return nn.functional.linear(x, self.dequantize(x.dtype), self.bias)


def quantized_fresh():
    model = fresh()
    for block in model.layers:
        block.q_proj, block.v_proj = Int8Rows(block.q_proj), Int8Rows(block.v_proj)
    return model


@pytest.mark.parametrize("method", METHODS)
def test_round_trip_over_quantized_bases(tmp_path, method):
    config = LoraConfig(target_modules=["q_proj", "v_proj"], r=2, method=method)
    model = add_lora_to_model(quantized_fresh(), config)
    randomize_adapters(model, 0.3)
    save_adapter(model, tmp_path, config)
    loaded = load_adapter(quantized_fresh(), tmp_path)
    assert isinstance(adapter_layers(loaded)[0][1].base_layer, Int8Rows)
    x = torch.randn(3, D)
    assert_same_state(model_state(loaded), model_state(model))
    assert torch.equal(loaded(x), model(x))


@pytest.mark.parametrize("options", [dict(init="pissa"), dict(init="gaussian", use_rslora=True),
                                     dict(lora_dropout=0.1, bias="lora_only")])
def test_round_trip_keeps_options(tmp_path, options):
    model, config = trained("lora", **options)          # pissa also rewrote the base weights
    save_adapter(model, tmp_path, config)
    loaded = load_adapter(fresh(), tmp_path, is_trainable=True)
    assert_same_state(model_state(loaded), model_state(model))
    layer = adapter_layers(loaded)[0][1]
    assert layer.scaling == adapter_layers(model)[0][1].scaling and layer.dropout_p == config.lora_dropout
    trainable = {n for n, p in loaded.named_parameters() if p.requires_grad}
    assert trainable == {n for n, p in model.named_parameters() if p.requires_grad}


@settings(max_examples=10, deadline=None)
@given(method=st.sampled_from(METHODS), d=st.integers(2, 9), r=st.integers(1, 5), r2=st.integers(1, 5),
       alpha=st.floats(0.5, 64))
def test_round_trip_property(method, d, r, r2, alpha):
    model, config = trained(method, r=r, lora_alpha=alpha, rank_pattern={"v_proj": r2}, d=d)
    with tempfile.TemporaryDirectory() as folder:
        save_adapter(model, folder, config)
        loaded = load_adapter(fresh(d=d), folder)
    assert_same_state(model_state(loaded), model_state(model))


@pytest.mark.parametrize("bias", ["lora_only", "all"])
def test_trained_biases_are_saved_under_peft_names(tmp_path, bias):
    model, config = trained("lora", bias=bias)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.5)
    save_adapter(model, tmp_path, config)
    keys = set(load_file(str(tmp_path / WEIGHTS_NAME)))
    assert "base_model.model.layers.0.q_proj.base_layer.bias" in keys
    assert ("base_model.model.head.bias" in keys) == (bias == "all")
    loaded = load_adapter(fresh(), tmp_path)
    assert_same_state(model_state(loaded), model_state(model))


def test_save_without_config_infers_heads_and_biases(tmp_path):
    model, config = trained("dora", modules_to_save=["head"], bias="lora_only", r=3)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.5)
    del model.nanopeft_config                                          # a model that remembers no config
    save_adapter(model, tmp_path)
    meta = json.loads((tmp_path / CONFIG_NAME).read_text())
    assert meta["modules_to_save"] == ["head"] and meta["bias"] == "lora_only" and meta["r"] == 3
    loaded = load_adapter(fresh(), tmp_path, is_trainable=True)
    assert_same_state(model_state(loaded), model_state(model))
    assert {n for n, p in loaded.named_parameters() if p.requires_grad} == \
        {n for n, p in model.named_parameters() if p.requires_grad}


# --- QLoRA files, the remembered config, frozen loading --------------------------------------
def tiny_llama():
    from trainers.models.llama import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig.tiny(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=64))


def quantized_llama():
    """A 4-bit LLaMA: its attention wrappers hold no parameters once the bases are buffers."""
    from quantization import quantize_model
    with pytest.warns(UserWarning, match="left in float: lm_head"):
        return quantize_model(tiny_llama(), bits=4)


@pytest.mark.parametrize("remembered", [True, False])
def test_qlora_file_holds_adapters_only_and_loads(tmp_path, remembered):
    """Saved without a config from a 4-bit base: no wrapper module (self_attn, whose only parameters
    are the adapters) is taken for a module to save, each factor is written once, and it loads."""
    model = add_lora_to_model(quantized_llama(), target_modules=["q_proj", "v_proj"], r=4)
    with torch.no_grad():
        for _, layer in adapter_layers(model):
            layer.lora_B.normal_()
    if not remembered:
        del model.nanopeft_config                                       # the requires_grad fallback
    save_adapter(model, tmp_path)
    meta = json.loads((tmp_path / CONFIG_NAME).read_text())
    assert meta["modules_to_save"] is None and meta["bias"] == "none"
    keys = set(load_file(str(tmp_path / WEIGHTS_NAME)))
    assert len(keys) == 2 * 2 * 2 and all(k.endswith(("lora_A.weight", "lora_B.weight")) for k in keys)
    loaded = load_adapter(quantized_llama(), tmp_path)
    idx = torch.randint(0, 32, (2, 6))
    assert torch.equal(loaded(idx)[0], model(idx)[0])


def test_frozen_load_then_save_writes_the_same_file(tmp_path):
    """A frozen load (the default) would make the requires_grad flags say "no head, no bias";
    the remembered config still says what the file holds, through deepcopy too."""
    model, config = trained("lora", modules_to_save=["head"], bias="lora_only", lora_dropout=0.1)
    save_adapter(model, tmp_path / "a", config)
    loaded = load_adapter(fresh(), tmp_path / "a")
    assert not any(p.requires_grad for p in loaded.parameters())
    save_adapter(copy.deepcopy(loaded), tmp_path / "b")
    assert json.loads((tmp_path / "a" / CONFIG_NAME).read_text()) == \
        json.loads((tmp_path / "b" / CONFIG_NAME).read_text())
    assert_same_state(load_file(str(tmp_path / "a" / WEIGHTS_NAME)), load_file(str(tmp_path / "b" / WEIGHTS_NAME)))
    again = load_adapter(loaded, tmp_path / "a", is_trainable=True)    # into its own adapters: trainable again
    trainable = {n for n, p in again.named_parameters() if p.requires_grad}
    assert trainable == {n for n, p in model.named_parameters() if p.requires_grad}


def test_save_warns_about_trainable_parameters_it_leaves_out(tmp_path):
    model = add_lora_to_model(fresh(), target_modules=["q_proj"], r=2)
    model.head.weight.requires_grad_(True)                              # by hand, not in modules_to_save
    with pytest.warns(UserWarning, match=r"1 trainable parameters are not in the adapter file.*'head.weight'"):
        save_adapter(model, tmp_path)


class Classifier(nn.Module):
    """DistilBERT's head names: `classifier` selects `pre_classifier` too under PEFT's rule."""

    def __init__(self, d=D):
        super().__init__()
        self.layers = nn.ModuleList([Block(d)])
        self.pre_classifier = nn.Linear(d, d)
        self.classifier = nn.Linear(d, 2)

    def forward(self, x):
        return self.classifier(torch.relu(self.pre_classifier(self.layers[0](x))))


def test_modules_to_save_match_as_in_peft(tmp_path):
    torch.manual_seed(0)
    model = add_lora_to_model(Classifier(), target_modules=["q_proj"], modules_to_save=["classifier"], r=2)
    assert model.pre_classifier.weight.requires_grad and model.classifier.weight.requires_grad
    with torch.no_grad():
        model.pre_classifier.weight.add_(1.0)
    save_adapter(model, tmp_path)
    keys = set(load_file(str(tmp_path / WEIGHTS_NAME)))
    assert {"base_model.model.pre_classifier.weight", "base_model.model.classifier.bias"} <= keys
    meta = json.loads((tmp_path / CONFIG_NAME).read_text())
    meta["modules_to_save"] = ["classifier", "score"]                  # as PEFT's SEQ_CLS configs write it
    (tmp_path / CONFIG_NAME).write_text(json.dumps(meta))
    torch.manual_seed(0)
    loaded = load_adapter(Classifier(), tmp_path, is_trainable=True)  # "score" selects nothing: ignored
    assert_same_state(model_state(loaded), model_state(model))
    assert loaded.pre_classifier.weight.requires_grad
    with pytest.raises(ValueError, match="modules_to_save: 'score' matches no module"):
        add_lora_to_model(Classifier(), target_modules=["q_proj"], modules_to_save=["score"])


def test_modules_to_save_holding_an_adapter_is_refused():
    model = fresh()
    before = snapshot(model)
    with pytest.raises(ValueError, match=r"modules_to_save: 'layers.0' holds the adapter \(or target\) "
                                         r"'layers.0.q_proj'"):
        add_lora_to_model(model, target_modules=["q_proj"], modules_to_save=["layers.0"])
    check_untouched(model, *before)
    assert adapter_layers(model) == []


# --- PEFT LoraConfig objects, duck-typed (the real one: tests/test_peft_interop.py) ---------------
class PeftLikeConfig:
    """What add_lora_to_model sees of a peft.LoraConfig: to_dict() with PEFT's field names."""

    def __init__(self, **fields):
        self.fields = {"peft_type": "LORA", "task_type": None, "r": 8, "lora_alpha": 8, "lora_dropout": 0.0,
                       "target_modules": None, "use_dora": False, "init_lora_weights": True, "bias": "none",
                       "modules_to_save": None, "rank_pattern": {}, "alpha_pattern": {}, "use_rslora": False,
                       "layers_to_transform": None, "lora_bias": False, "qalora_group_size": 16, **fields}

    def to_dict(self):
        return dict(self.fields)


def test_peft_style_config_objects_convert_field_by_field():
    config = PeftLikeConfig(r=2, lora_alpha=4, target_modules={"v_proj", "q_proj"}, use_dora=True,
                            rank_pattern={"v_proj": 3}, modules_to_save=["head"])
    model = add_lora_to_model(fresh(), config)
    layers = dict(adapter_layers(model))
    assert type(layers["layers.0.q_proj"]).__name__ == "DoRALinear" and layers["layers.0.q_proj"].rank == 2
    assert layers["layers.1.v_proj"].rank == 3 and layers["layers.1.v_proj"].alpha == 4
    assert model.head.weight.requires_grad
    assert add_lora_to_model(fresh(), config, r=5).layers[0].q_proj.rank == 5   # overrides still apply
    for fields, message in [(dict(layers_to_transform=[0]), r"field layers_to_transform=\[0\] is not supported "
                                                            r"\(only its default, None\)"),
                            (dict(qalora_group_size=32), "field qalora_group_size=32 is not supported"),
                            (dict(init_lora_weights=False), "init_lora_weights=False is not supported"),
                            (dict(peft_type="ADALORA"), "peft_type 'ADALORA'"),
                            (dict(target_modules=None), "target_modules=None")]:
        model = fresh()
        before = snapshot(model)
        with pytest.raises(ValueError, match=message):
            add_lora_to_model(model, PeftLikeConfig(**{"target_modules": ["q_proj"], **fields}))
        check_untouched(model, *before)
    with pytest.raises(TypeError, match=r"config must be a lora.LoraConfig or a PEFT LoraConfig \(an object "
                                        r"with to_dict\(\)\), got builtins.dict"):
        add_lora_to_model(fresh(), {"r": 4})


def test_adapter_files_get_umask_permissions_and_clear_a_dead_writers_temporaries(tmp_path):
    import os
    import subprocess
    import sys
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()                                                        # a pid that no longer runs
    stale = tmp_path / f".{WEIGHTS_NAME}.{proc.pid}.0123abcd.tmp"
    stale.write_bytes(b"half")
    old = os.umask(0o022)
    try:
        save_adapter(add_lora_to_model(fresh(), target_modules=["q_proj"], r=2), tmp_path)
    finally:
        os.umask(old)
    for name in (WEIGHTS_NAME, CONFIG_NAME):
        assert (tmp_path / name).stat().st_mode & 0o777 == 0o644, name
    assert not stale.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([WEIGHTS_NAME, CONFIG_NAME])
