"""All-or-nothing in lora/: every public call that changes a model, a layer or a folder either
completes or leaves everything as it was (tests.snapshot), with failures injected as late as
possible; and bad values are refused where they enter, by name."""
import math

import pytest
import torch
import torch.nn as nn
from hypothesis import given, settings
from hypothesis import strategies as st

import lora.adapter_io as adapter_io
import lora.adapter_load as adapter_load
import lora.adapter_save as adapter_save
import lora.files as lora_files
import lora.base as lora_base
import lora.model as lora_model
from lora import (AdapterLayer, DoRALinear, HiRALinear, LoraConfig, LoRALinear, SparseLoRALinear, SVDLoRALinear,
                  adapter_layers, add_lora_to_model, load_adapter, mark_only_lora_as_trainable, merge_adapters,
                  merge_lora_weights, save_adapter, unmerge_lora_weights)
from lora.adapter_io import CONFIG_NAME, WEIGHTS_NAME
from tests.adapters import randomize_adapters
from tests.snapshot import assert_files_unchanged, assert_unchanged, snapshot, snapshot_files
from tests.test_lora_layers import FakeQuantLinear

D = 8
CLASSES = [LoRALinear, SparseLoRALinear, HiRALinear, DoRALinear, SVDLoRALinear]
TARGETS = ["q_proj", "v_proj", "head"]
LAST = "head"                                   # the last target in module order, tied to the embedding
# (method, init): every adapter class, and the inits that read or rewrite W0
SETUPS = [("lora", "kaiming"), ("lora", "pissa"), ("lora", "gaussian"), ("sparse", "pissa"), ("hira", "kaiming"),
          ("dora", "kaiming"), ("adalora", "kaiming")]


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.q_proj = nn.Linear(D, D)
        self.v_proj = nn.Linear(D, D, bias=False)

    def forward(self, x):
        return x + self.v_proj(torch.tanh(self.q_proj(x)))


class Net(nn.Module):
    def __init__(self, vocab=11):
        super().__init__()
        self.emb = nn.Embedding(vocab, D)
        self.blocks = nn.ModuleList([Block(), Block()])
        self.norm = nn.BatchNorm1d(D)              # buffers (running stats) and a training flag
        self.head = nn.Linear(D, vocab, bias=False)
        self.head.weight = self.emb.weight          # tied, as GPT-2

    def forward(self, idx):
        x = self.emb(idx)
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x))


def net(seed=0):
    torch.manual_seed(seed)
    model = Net()
    model.blocks[0].q_proj.weight.requires_grad_(False)   # a flag of the user's that must survive
    model.norm.eval()
    return model


def with_adapters(method="lora", init="kaiming", seed=0):
    model = add_lora_to_model(net(seed), r=2, target_modules=TARGETS, method=method, init=init)
    torch.manual_seed(seed + 1)
    randomize_adapters(model, 0.1)
    return model


def fail_on_last(real, is_last, message="injected failure"):
    """`real` wrapped so the call for which is_last(args) holds first runs `real`, then raises."""
    def wrapper(*args, **kwargs):
        result = real(*args, **kwargs)
        if is_last(*args, **kwargs):
            raise RuntimeError(message)
        return result
    return wrapper


# --- constructors ------------------------------------------------------------------------------
def _init_args(cls):
    return dict(init_std=0.02) if cls is SVDLoRALinear else {}


BAD_ARGS = [
    (dict(rank=0), "rank must be a positive int, got 0"),
    (dict(rank=2.0), "rank must be a positive int, got 2.0"),
    (dict(alpha=0), "alpha must be a finite number > 0, got 0"),
    (dict(alpha=-4.0), "alpha must be a finite number > 0, got -4.0"),
    (dict(alpha=float("nan")), "alpha must be a finite number > 0, got nan"),
    (dict(alpha=float("inf")), "alpha must be a finite number > 0, got inf"),
    (dict(alpha="16"), "alpha must be a finite number > 0, got '16'"),
    (dict(dropout=1.0), r"dropout must be in \[0, 1\), got 1.0"),
    (dict(dropout=float("nan")), r"dropout must be in \[0, 1\), got nan"),
    (dict(dropout="0.1"), r"dropout must be in \[0, 1\), got '0.1'"),
    (dict(use_rslora="yes"), "use_rslora must be True or False, got 'yes'"),
    (dict(dtype=torch.int8), "dtype must be None or a floating-point torch.dtype, got torch.int8"),
]


@pytest.mark.parametrize("cls", CLASSES)
@pytest.mark.parametrize("bad, message", BAD_ARGS)
def test_rejected_constructor_leaves_the_base_untouched(cls, bad, message):
    base = nn.Linear(D, 6)
    base.bias.requires_grad_(False)
    before = snapshot(base)
    with pytest.raises((ValueError, TypeError), match=f"{cls.__name__}: {message}"):
        cls(base, **{"rank": 2, **bad})
    assert_unchanged(before, base)


@settings(max_examples=40, deadline=None)
@given(cls=st.sampled_from(CLASSES),
       alpha=st.one_of(st.floats(max_value=0.0), st.sampled_from([math.inf, -math.inf, math.nan]),
                       st.integers(max_value=0)))
def test_bad_alphas_are_refused_everywhere(cls, alpha):
    base = nn.Linear(4, 3)
    before = snapshot(base)
    with pytest.raises(ValueError, match=f"{cls.__name__}: alpha must be a finite number > 0"):
        cls(base, rank=2, alpha=alpha)
    assert_unchanged(before, base)
    with pytest.raises(ValueError, match="LoraConfig.lora_alpha must be a finite number > 0"):
        LoraConfig(lora_alpha=alpha)
    with pytest.raises(ValueError, match=r"LoraConfig.alpha_pattern\['q'\] must be a finite number > 0"):
        LoraConfig(alpha_pattern={"q": alpha})


@pytest.mark.parametrize("cls, kwargs, message", [
    (LoRALinear, dict(init="pissa", rank=7), r"LoRALinear: init='pissa' needs rank <= min\(out, in\) = 6, got 7"),
    (LoRALinear, dict(init="pissa", alpha=float("nan")), "alpha must be a finite number > 0, got nan"),
    (SparseLoRALinear, dict(init="xavier"), "SparseLoRALinear: init must be one of"),
    (SVDLoRALinear, dict(init_std=0.0), "SVDLoRALinear: init_std must be a finite number > 0, got 0.0"),
    (SVDLoRALinear, dict(init_std=float("nan")), "SVDLoRALinear: init_std must be a finite number > 0, got nan"),
])
def test_method_specific_arguments_are_checked_before_anything_changes(cls, kwargs, message):
    base = nn.Linear(D, 6)
    before = snapshot(base)
    with pytest.raises(ValueError, match=message):
        cls(base, **{"rank": 2, **kwargs})
    assert_unchanged(before, base)


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("cls, kwargs, what", [
    (LoRALinear, dict(init="pissa"), r"LoRALinear: init='pissa' takes the SVD of the base weight W0"),
    (SparseLoRALinear, dict(init="pissa"), r"SparseLoRALinear: init='pissa' takes the SVD"),
    (DoRALinear, {}, r"DoRALinear: the base weight W0 \(in torch.float32; DoRA's magnitude"),
    (HiRALinear, {}, r"HiRALinear: the base weight W0 \(HiRA's update"),
])
def test_non_finite_w0_is_refused_where_the_method_reads_it(cls, kwargs, what, value):
    base = nn.Linear(D, 6)
    with torch.no_grad():
        base.weight[4, 2] = value
    before = snapshot(base)
    with pytest.raises(ValueError, match=what + r".* has 1 non-finite entries of 48 \(first at index \(4, 2\)"):
        cls(base, rank=2, **kwargs)
    assert_unchanged(before, base)


def test_dora_refuses_a_zero_row_and_a_half_precision_overflow():
    base = nn.Linear(D, 6)
    with torch.no_grad():
        base.weight[3] = 0
    with pytest.raises(ValueError, match=r"DoRALinear: W0 has 1 all-zero rows \(first: row 3\)"):
        DoRALinear(base, rank=2)
    base = nn.Linear(D, 6)
    with torch.no_grad():
        base.weight[1, 1] = 1e6                   # fine in float32, inf in the float16 adapter
    before = snapshot(base)
    with pytest.raises(ValueError, match=r"W0 \(in torch.float16.*first at index \(1, 1\): inf"):
        DoRALinear(base, rank=2, dtype=torch.float16)
    assert_unchanged(before, base)


# --- add_lora_to_model -------------------------------------------------------------------------
@pytest.mark.parametrize("method, init", SETUPS)
def test_add_lora_failing_on_the_last_adapter_changes_nothing(monkeypatch, method, init):
    model = net()
    before = snapshot(model)
    real = lora_model.ADAPTER_CLASSES[method]
    # built for the last target (the real constructor has run: froze its base, wrote PiSSA's residual)
    monkeypatch.setitem(lora_model.ADAPTER_CLASSES, method,
                        fail_on_last(real, lambda base, **kw: base.out_features == 11))
    with pytest.raises(RuntimeError, match="injected"):
        add_lora_to_model(model, r=2, target_modules=TARGETS, method=method, init=init)
    assert_unchanged(before, model)


@pytest.mark.parametrize("method, init, message", [
    ("lora", "pissa", "LoRALinear: init='pissa' takes the SVD"),
    ("sparse", "pissa", "SparseLoRALinear: init='pissa' takes the SVD"),
    ("dora", "kaiming", "DoRALinear: the base weight W0"),
    ("hira", "kaiming", "HiRALinear: the base weight W0"),
])
def test_non_finite_weight_in_the_last_target_changes_nothing(method, init, message):
    model = net()
    with torch.no_grad():
        model.head.weight[5, 0] = float("nan")
    before = snapshot(model)
    with pytest.raises(ValueError, match=f"target 'head': {message}"):
        add_lora_to_model(model, r=2, target_modules=TARGETS, method=method, init=init)
    assert_unchanged(before, model)


@pytest.mark.parametrize("method, init", SETUPS)
def test_add_lora_failing_while_installing_changes_nothing(monkeypatch, method, init):
    model = net()
    before = snapshot(model)
    monkeypatch.setattr(lora_model, "_set_submodule", fail_on_last(
        lora_model._set_submodule, lambda m, name, module: name == LAST and isinstance(module, AdapterLayer)))
    with pytest.raises(RuntimeError, match="injected"):
        add_lora_to_model(model, r=2, target_modules=TARGETS, method=method, init=init)
    assert_unchanged(before, model)


def test_add_lora_failing_while_setting_flags_changes_nothing(monkeypatch):
    model = net()
    before = snapshot(model)
    monkeypatch.setattr(lora_model, "mark_only_lora_as_trainable",
                        fail_on_last(lora_model.mark_only_lora_as_trainable, lambda *a, **k: True))
    with pytest.raises(RuntimeError, match="injected"):
        add_lora_to_model(model, r=2, target_modules=TARGETS, modules_to_save=["norm"])
    assert_unchanged(before, model)


def test_pissa_leaves_a_tied_weight_at_w0():
    model = net()
    emb = model.emb.weight.detach().clone()
    add_lora_to_model(model, r=2, target_modules=TARGETS, init="pissa")
    assert torch.equal(model.emb.weight, emb)                 # the embedding still holds W0
    layer = model.head
    assert torch.allclose(layer.base_layer.weight + layer.get_delta_weight(), emb, atol=1e-5)


@pytest.mark.parametrize("targets", [["q_proj"], ["v_proj"], "all-linear", ".*"])
def test_second_add_lora_is_refused_whatever_the_targets_and_changes_nothing(targets):
    model = add_lora_to_model(net(), r=2, target_modules=["q_proj"])
    before = snapshot(model)
    with pytest.raises(ValueError, match=r"Net already has adapters \(2 adapter layers.*load_adapter"):
        add_lora_to_model(model, r=2, target_modules=targets)
    assert_unchanged(before, model)


# --- merging -----------------------------------------------------------------------------------
@pytest.mark.parametrize("method, init", SETUPS)
def test_merge_lora_weights_with_a_non_finite_last_adapter_changes_nothing(method, init):
    model = with_adapters(method, init)
    with torch.no_grad():
        model.head.lora_B[0, 0] = float("inf")
    before = snapshot(model)
    with pytest.raises(ValueError, match="merge_lora_weights: the merged weight W0 \\+ delta W of head"):
        merge_lora_weights(model)
    assert_unchanged(before, model)


def test_merge_lora_weights_failing_on_the_last_swap_changes_nothing(monkeypatch):
    model = with_adapters()
    before = snapshot(model)
    monkeypatch.setattr(lora_model, "_set_submodule", fail_on_last(
        lora_model._set_submodule, lambda m, name, module: name == LAST and type(module) is nn.Linear))
    with pytest.raises(RuntimeError, match="injected"):
        merge_lora_weights(model)
    assert_unchanged(before, model)


@pytest.mark.parametrize("method, init", SETUPS)
def test_merge_adapters_failing_on_the_last_layer_changes_nothing(monkeypatch, method, init):
    model = with_adapters(method, init)
    before = snapshot(model)
    monkeypatch.setattr(AdapterLayer, "merge", fail_on_last(AdapterLayer.merge, lambda layer: layer is model.head))
    with pytest.raises(RuntimeError, match="injected"):
        merge_adapters(model)
    assert_unchanged(before, model)
    assert all(layer._original_weight is None for _, layer in adapter_layers(model))


def test_merge_adapters_refuses_a_quantized_last_base_before_merging_anything():
    model = with_adapters()
    model.blocks[1].v_proj.base_layer = FakeQuantLinear(nn.Linear(D, D, bias=True))
    before = snapshot(model)
    with pytest.raises(RuntimeError, match="merge_adapters: blocks.1.v_proj: merge into a quantized base"):
        merge_adapters(model)
    assert_unchanged(before, model)


def test_merge_adapters_with_a_non_finite_last_update_changes_nothing():
    model = with_adapters("dora")
    with torch.no_grad():
        model.head.lora_A[1, 1] = float("nan")
    before = snapshot(model)
    with pytest.raises(ValueError, match=r"merge_adapters: head: DoRALinear.merge: the merged weight"):
        merge_adapters(model)
    assert_unchanged(before, model)


@pytest.mark.parametrize("method, init", SETUPS)
def test_unmerge_failing_on_the_last_layer_changes_nothing(monkeypatch, method, init):
    model = merge_adapters(with_adapters(method, init))
    before = snapshot(model)
    monkeypatch.setattr(AdapterLayer, "unmerge",
                        fail_on_last(AdapterLayer.unmerge, lambda layer: layer is model.head))
    with pytest.raises(RuntimeError, match="injected"):
        unmerge_lora_weights(model)
    assert_unchanged(before, model)


def test_layer_merge_failing_at_its_last_step_changes_nothing(monkeypatch):
    layer = LoRALinear(nn.Linear(D, 6), rank=2)
    with torch.no_grad():
        layer.lora_B.normal_()
    before = snapshot(layer)
    monkeypatch.setattr(LoRALinear, "merged_weight", lambda self: torch.zeros(6, D + 1))   # copy_ fails
    with pytest.raises(RuntimeError):
        layer.merge()
    assert_unchanged(before, layer)
    assert layer._original_weight is None and not layer.merged


def test_mark_only_lora_as_trainable_refuses_a_model_without_adapters():
    model = net()
    before = snapshot(model)
    with pytest.raises(ValueError, match="Net has no adapter layers, so this would freeze every parameter"):
        mark_only_lora_as_trainable(model)
    assert_unchanged(before, model)


def test_mark_only_lora_as_trainable_failing_on_the_last_layer_changes_nothing(monkeypatch):
    model = with_adapters()
    model.blocks[0].q_proj.lora_A.requires_grad_(False)
    model.emb.weight.requires_grad_(True)
    before = snapshot(model)
    monkeypatch.setattr(AdapterLayer, "adapter_parameters", fail_on_last(
        AdapterLayer.adapter_parameters, lambda layer: layer is model.head))
    with pytest.raises(RuntimeError, match="injected"):
        mark_only_lora_as_trainable(model, bias="all")
    assert_unchanged(before, model)


# --- rank changes and sparsity -----------------------------------------------------------------
def _trained_layer(cls):
    torch.manual_seed(0)
    layer = cls(nn.Linear(D, 6), rank=4)
    with torch.no_grad():
        for p in layer.adapter_parameters():
            p.add_(torch.randn_like(p) * 0.3)
    layer(torch.randn(3, D)).square().sum().backward()   # gradients that a failed resize must keep
    return layer


@pytest.mark.parametrize("cls", CLASSES)
@pytest.mark.parametrize("new_rank", [2, 6])
def test_resize_failing_at_its_last_swap_changes_nothing(monkeypatch, cls, new_rank):
    layer = _trained_layer(cls)
    before = snapshot(layer)
    monkeypatch.setattr(lora_base, "_assign", fail_on_last(
        lora_base._assign, lambda param, data: param is layer.lora_B))
    with pytest.raises(RuntimeError, match="injected"):
        layer.resize(new_rank)
    assert_unchanged(before, layer)


@pytest.mark.parametrize("cls", CLASSES)
def test_resize_refuses_non_finite_factors(cls):
    layer = _trained_layer(cls)
    with torch.no_grad():
        layer.lora_B[2, 1] = float("nan")
    before = snapshot(layer)
    with pytest.raises(ValueError, match=rf"{cls.__name__}.resize: lora_B has 1 non-finite entries"):
        layer.resize(2)
    assert_unchanged(before, layer)


def test_prune_ranks_failing_at_its_last_swap_changes_nothing(monkeypatch):
    layer = _trained_layer(SparseLoRALinear)
    layer.prune_to(0.3)
    before = snapshot(layer)
    monkeypatch.setattr(lora_base, "_assign", fail_on_last(
        lora_base._assign, lambda param, data: param is layer.lora_B))
    with pytest.raises(RuntimeError, match="injected"):
        layer.prune_ranks(2)
    assert_unchanged(before, layer)


def test_prune_to_failing_on_the_second_factor_changes_nothing(monkeypatch):
    layer = _trained_layer(SparseLoRALinear)
    before = snapshot(layer)
    calls = []
    real_topk = torch.topk

    def topk(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:              # B's scores, after A's mask was computed
            raise RuntimeError("injected failure")
        return real_topk(*args, **kwargs)

    monkeypatch.setattr(torch, "topk", topk)
    with pytest.raises(RuntimeError, match="injected"):
        layer.prune_to(0.5)
    assert_unchanged(before, layer)


def test_apply_masks_refuses_a_mask_that_does_not_fit_before_changing_a():
    layer = _trained_layer(SparseLoRALinear)
    layer.mask_B = torch.ones(6, 3, dtype=torch.bool)
    before = snapshot(layer)
    with pytest.raises(ValueError, match=r"apply_masks_: mask_B must be a bool tensor of shape \(6, 4\)"):
        layer.apply_masks_()
    assert_unchanged(before, layer)


# --- adapter files -----------------------------------------------------------------------------
def _saved(tmp_path, method="lora", init="kaiming", seed=0):
    model = with_adapters(method, init, seed)
    folder = save_adapter(model, tmp_path / f"{method}-{init}-{seed}")
    return model, folder


def _rewrite_tensor(folder, key, change):
    from safetensors.torch import load_file, save_file
    state = load_file(str(folder / WEIGHTS_NAME))
    state[key] = change(state[key])
    save_file(state, str(folder / WEIGHTS_NAME))


@pytest.mark.parametrize("onto", ["fresh", "adapters"])
def test_load_refuses_non_finite_tensors_by_key_and_file(tmp_path, onto):
    _, folder = _saved(tmp_path)
    key = "base_model.model.head.lora_B.weight"
    _rewrite_tensor(folder, key, lambda t: t.index_fill(0, torch.tensor([3]), float("nan")))
    model = net() if onto == "fresh" else with_adapters(seed=5)
    before = snapshot(model)
    with pytest.raises(ValueError, match=rf"load_adapter: {folder}/{WEIGHTS_NAME}: {key} has 2 non-finite"):
        load_adapter(model, folder)
    assert_unchanged(before, model)


@pytest.mark.parametrize("field, value", [("lora_alpha", float("nan")), ("lora_alpha", -1),
                                          ("lora_alpha", float("inf")), ("lora_dropout", 1.5)])
def test_load_refuses_bad_config_values_naming_the_file(tmp_path, field, value):
    import json
    _, folder = _saved(tmp_path)
    meta = json.loads((folder / CONFIG_NAME).read_text())
    meta[field] = value
    (folder / CONFIG_NAME).write_text(json.dumps(meta))
    model = net()
    before = snapshot(model)
    with pytest.raises(ValueError, match=rf"load_adapter: {folder}/{CONFIG_NAME}: LoraConfig.{field} must be"):
        load_adapter(model, folder)
    assert_unchanged(before, model)


def test_load_refuses_a_tensor_of_the_wrong_kind(tmp_path):
    _, folder = _saved(tmp_path)
    key = "base_model.model.head.lora_A.weight"
    _rewrite_tensor(folder, key, lambda t: t.to(torch.int32))
    model = net()
    before = snapshot(model)
    with pytest.raises(ValueError, match=rf"{key} is torch.int32 in the file, the model holds torch.float32"):
        load_adapter(model, folder)
    assert_unchanged(before, model)


@pytest.mark.parametrize("method, init", SETUPS)
@pytest.mark.parametrize("onto", ["fresh", "adapters"])
def test_load_failing_on_the_last_copy_changes_nothing(tmp_path, monkeypatch, method, init, onto):
    _, folder = _saved(tmp_path, method, init)
    model = net() if onto == "fresh" else with_adapters(method, init, seed=5)
    before = snapshot(model)
    count = len(adapter_io.read_tensors(folder))
    calls = []

    def copy_into(dest, value):
        calls.append(1)
        adapter_io_copy(dest, value)
        if len(calls) == count:
            raise RuntimeError("injected failure")

    adapter_io_copy = adapter_load._copy_into
    monkeypatch.setattr(adapter_load, "_copy_into", copy_into)
    with pytest.raises(RuntimeError, match="injected"):
        load_adapter(model, folder)
    assert len(calls) == count
    assert_unchanged(before, model)


def test_load_failing_while_installing_changes_nothing(tmp_path, monkeypatch):
    _, folder = _saved(tmp_path, "lora", "pissa")
    model = net()
    before = snapshot(model)
    monkeypatch.setattr(lora_model, "_set_submodule", fail_on_last(
        lora_model._set_submodule, lambda m, name, module: name == LAST and isinstance(module, AdapterLayer)))
    with pytest.raises(RuntimeError, match="injected"):
        load_adapter(model, folder)
    assert_unchanged(before, model)


def test_save_failing_on_the_second_file_keeps_the_old_pair(tmp_path, monkeypatch):
    _, folder = _saved(tmp_path)
    before = snapshot_files(folder)
    newer = with_adapters(seed=7)
    monkeypatch.setattr(adapter_save, "_write_config", lambda text, tmp: (_ for _ in ()).throw(OSError("disk full")))
    with pytest.raises(OSError, match="disk full"):
        save_adapter(newer, folder)
    assert_files_unchanged(before, folder)          # no temporary left behind either


def test_save_failing_on_the_second_rename_puts_the_first_back(tmp_path, monkeypatch):
    _, folder = _saved(tmp_path)
    before = snapshot_files(folder)
    real_replace = lora_files.os.replace

    def replace(src, dst):
        if str(dst).endswith(CONFIG_NAME):
            raise OSError("rename failed")
        real_replace(src, dst)

    monkeypatch.setattr(lora_files.os, "replace", replace)
    with pytest.raises(OSError, match="rename failed"):
        save_adapter(with_adapters(seed=7), folder)
    assert_files_unchanged(before, folder)


def test_a_pair_from_two_saves_is_refused(tmp_path):
    """What a process killed between the two renames leaves: new weights beside the old config."""
    _, old = _saved(tmp_path)
    newer = add_lora_to_model(net(), r=2, lora_alpha=32, target_modules=TARGETS)
    new = save_adapter(newer, tmp_path / "new")
    (old / WEIGHTS_NAME).write_bytes((new / WEIGHTS_NAME).read_bytes())
    model = net()
    before = snapshot(model)
    with pytest.raises(ValueError, match=rf"{WEIGHTS_NAME} was written together with another {CONFIG_NAME}"):
        load_adapter(model, old)
    assert_unchanged(before, model)


def test_save_refuses_non_finite_adapters_and_leaves_no_folder(tmp_path):
    model = with_adapters()
    with torch.no_grad():
        model.blocks[1].q_proj.lora_A[0, 0] = float("nan")
    target = tmp_path / "a" / "b"
    with pytest.raises(ValueError, match=r"save_adapter: base_model.model.blocks.1.q_proj.lora_A.weight has 1"):
        save_adapter(model, target)
    assert not (tmp_path / "a").exists()


def test_a_failed_save_into_a_new_folder_removes_it(tmp_path, monkeypatch):
    monkeypatch.setattr(adapter_save, "_write_config", lambda text, tmp: (_ for _ in ()).throw(OSError("disk full")))
    with pytest.raises(OSError, match="disk full"):
        save_adapter(with_adapters(), tmp_path / "a" / "b")
    assert snapshot_files(tmp_path) == {} and not (tmp_path / "a").exists()


def test_save_onto_a_file_is_refused(tmp_path):
    (tmp_path / "x").write_text("not a folder")
    with pytest.raises(NotADirectoryError, match="exists and is not a folder"):
        save_adapter(with_adapters(), tmp_path / "x")


def test_sparse_lora_with_pissa_builds_and_keeps_the_output():
    """SparseLoRALinear(init="pissa") used to fail inside the constructor (its masks did not exist
    yet when PiSSA computed the residual), after the base had been frozen."""
    torch.manual_seed(0)
    base = nn.Linear(D, 6)
    x = torch.randn(5, D)
    expected = base(x)
    layer = SparseLoRALinear(base, rank=2, init="pissa")
    torch.testing.assert_close(layer(x), expected, atol=1e-5, rtol=1e-5)


def test_config_refuses_a_non_bool_use_rslora():
    with pytest.raises(TypeError, match="LoraConfig.use_rslora must be True or False, got 'yes'"):
        LoraConfig(use_rslora="yes")
