"""Quantized files and packed tensors refuse bad input where it enters, and a failed load
changes nothing: load_quantized checks the whole file first and swaps layers in last."""
import json

import pytest
import torch
import torch.nn as nn
from safetensors.torch import load_file, save_file

import quantization.io as qio
from quantization import (Int8Tensor, Linear4bit, NF4Tensor, dequantize_int8, dequantize_nf4, load_quantized,
                          quantize_int8, quantize_model, quantize_nf4, save_quantized)
from tests.snapshot import assert_unchanged, snapshot


class Tiny(nn.Module):
    def __init__(self, head_out=10):
        super().__init__()
        self.emb = nn.Embedding(20, 64)
        self.a = nn.Linear(64, 64)
        self.b = nn.Linear(64, 128, bias=False)
        self.head = nn.Linear(128, head_out)


@pytest.fixture
def qfile(tmp_path):
    torch.manual_seed(0)
    path = tmp_path / "q.safetensors"
    save_quantized(quantize_model(Tiny(), bits={"a": 4, "b": 8, "head": 4}), path)
    return path


def _rewrite(path, out, *, tensors=None, meta=None):
    """A copy of a quantized file with some tensors / the metadata changed."""
    t = load_file(str(path))
    t.update(tensors or {})
    from safetensors import safe_open
    with safe_open(str(path), "pt") as f:
        m = f.metadata()
    if meta is not None:
        m = {qio.METADATA_KEY: meta}
    save_file({k: v.contiguous() for k, v in t.items() if v is not None}, str(out), metadata=m)
    return out


def test_mismatch_in_the_last_layer_leaves_the_model_untouched(qfile):
    model = Tiny(head_out=11)                      # a, b fit the file; head does not
    before = snapshot(model)
    with pytest.raises(ValueError, match=r"head is 128->11 in the model, 128->10 in .*q\.safetensors"):
        load_quantized(model, qfile)
    assert_unchanged(before, model)                # a and b are still the pretrained float layers


def test_failure_at_the_last_swap_is_undone(qfile, monkeypatch):
    model = Tiny()
    before = snapshot(model)
    real, calls = qio.replace_module, []

    def flaky(m, name, new):
        calls.append(name)
        if len(calls) == 3:                        # the third and last swap
            raise RuntimeError("injected")
        real(m, name, new)
    monkeypatch.setattr(qio, "replace_module", flaky)
    with pytest.raises(RuntimeError, match="injected"):
        load_quantized(model, qfile)
    assert_unchanged(before, model)
    monkeypatch.setattr(qio, "replace_module", real)
    load_quantized(model, qfile)                   # and the same call then succeeds
    assert isinstance(model.head, Linear4bit)


def test_model_with_an_extra_tensor_is_refused_before_any_change(qfile):
    model = Tiny()
    model.extra = nn.Linear(2, 2)
    before = snapshot(model)
    with pytest.raises(ValueError, match=r"missing from the file: extra\.weight"):
        load_quantized(model, qfile)
    assert_unchanged(before, model)


def test_file_naming_a_layer_the_model_lacks(qfile, tmp_path):
    model = Tiny()
    del model.head
    model.top = nn.Linear(128, 10)
    before = snapshot(model)
    with pytest.raises(ValueError, match=r"quantized layer 'head', the model has no module"):
        load_quantized(model, qfile)
    assert_unchanged(before, model)


@pytest.mark.parametrize("damage", ["empty", "truncated", "garbage"])
def test_damaged_files_name_the_file(qfile, tmp_path, damage):
    bad = tmp_path / f"{damage}.safetensors"
    raw = qfile.read_bytes()
    bad.write_bytes({"empty": b"", "truncated": raw[: len(raw) - 100],
                     "garbage": b"not a safetensors file" * 9}[damage])
    model = Tiny()
    before = snapshot(model)
    with pytest.raises(ValueError, match=f"{damage}.safetensors"):
        load_quantized(model, bad)
    assert_unchanged(before, model)


def test_damaged_metadata_names_the_key_and_layer(qfile, tmp_path):
    with pytest.raises(ValueError, match="is not valid JSON"):
        load_quantized(Tiny(), _rewrite(qfile, tmp_path / "j.safetensors", meta="{not json"))
    from safetensors import safe_open
    with safe_open(str(qfile), "pt") as f:
        specs = json.loads(f.metadata()[qio.METADATA_KEY])
    specs["b"]["bits"] = 5
    with pytest.raises(ValueError, match=r"layer 'b': bits must be 4 or 8, got 5"):
        load_quantized(Tiny(), _rewrite(qfile, tmp_path / "s.safetensors", meta=json.dumps(specs)))
    specs["b"]["bits"], specs["a"]["compute_dtype"] = 8, "float8"
    with pytest.raises(ValueError, match=r"layer 'a': dtype must be one of"):
        load_quantized(Tiny(), _rewrite(qfile, tmp_path / "d.safetensors", meta=json.dumps(specs)))


def test_packed_tensor_disagreeing_with_the_metadata_is_refused(qfile, tmp_path):
    t = load_file(str(qfile))
    short = _rewrite(qfile, tmp_path / "short.safetensors", tensors={"a.weight_packed": t["a.weight_packed"][:-2]})
    model = Tiny()
    before = snapshot(model)
    with pytest.raises(ValueError, match=r"a\.weight_packed is torch.uint8 \(2046,\).*expected torch.uint8 \(2048,\)"):
        load_quantized(model, short)
    assert_unchanged(before, model)
    nan = t["head.absmax_scales"].clone()
    nan[0] = float("nan")
    with pytest.raises(ValueError, match=r"layer 'head': absmax_scales holds NaN"):
        load_quantized(model, _rewrite(qfile, tmp_path / "nan.safetensors", tensors={"head.absmax_scales": nan}))
    assert_unchanged(before, model)


# ----------------------------------------------------------------------------- packed tensors

def test_nf4_tensor_checks_its_storage_against_its_shape():
    q = quantize_nf4(torch.randn(10, 13), blocksize=64, double_quant=False)     # 130 elements: 65 bytes, 3 blocks
    with pytest.raises(ValueError, match=r"NF4Tensor.packed: expected 65 element\(s\).*got 64"):
        NF4Tensor(q.packed[:-1], q.shape, q.dtype, 64, absmax=q.absmax)
    with pytest.raises(ValueError, match=r"NF4Tensor.absmax: expected 3 element\(s\).*got 2"):
        NF4Tensor(q.packed, q.shape, q.dtype, 64, absmax=q.absmax[:2])
    with pytest.raises(ValueError, match=r"NF4Tensor.absmax: expected 5 element\(s\)"):
        NF4Tensor(q.packed, q.shape, q.dtype, 32, absmax=q.absmax)               # block size disagrees
    with pytest.raises(TypeError, match=r"NF4Tensor.packed: expected dtype uint8, got torch.int8"):
        NF4Tensor(q.packed.to(torch.int8), q.shape, q.dtype, 64, absmax=q.absmax)
    with pytest.raises(ValueError, match="absmax_scales, absmax_mean missing"):
        NF4Tensor(q.packed, q.shape, q.dtype, 64, absmax_codes=torch.zeros(3, dtype=torch.uint8))
    dq = quantize_nf4(torch.randn(10, 13), blocksize=64)
    with pytest.raises(ValueError, match=r"NF4Tensor.absmax_codes: expected 3"):
        NF4Tensor(dq.packed, dq.shape, dq.dtype, 64, absmax_codes=dq.absmax_codes[:1],
                  absmax_scales=dq.absmax_scales, absmax_mean=dq.absmax_mean)
    assert torch.equal(dequantize_nf4(NF4Tensor(q.packed, q.shape, q.dtype, 64, absmax=q.absmax)),
                       dequantize_nf4(q))


def test_int8_tensor_checks_its_storage_against_its_shape():
    q = quantize_int8(torch.randn(6, 10))
    with pytest.raises(ValueError, match=r"Int8Tensor.scale: expected 6 element\(s\).*got 5"):
        Int8Tensor(q.data, q.scale[:5], q.shape, q.dtype)
    with pytest.raises(ValueError, match=r"Int8Tensor.data: row-wise codes must have shape \(6, 10\)"):
        Int8Tensor(q.data.reshape(10, 6), q.scale, q.shape, q.dtype)
    with pytest.raises(ValueError, match=r"Int8Tensor.data: expected 60 element\(s\)"):
        Int8Tensor(q.data[:5], q.scale[:5], q.shape, q.dtype)
    b = quantize_int8(torch.randn(6, 10), blocksize=32)
    with pytest.raises(ValueError, match=r"Int8Tensor.scale: expected 2 element\(s\)"):
        Int8Tensor(b.data, b.scale[:1], b.shape, b.dtype, 32)
    w = torch.randn(4, 8)
    w[:, 3] *= 50
    o = quantize_int8(w, outlier_threshold=10.0)
    with pytest.raises(ValueError, match=r"outlier_cols: indices must be in \[0, 8\)"):
        Int8Tensor(o.data, o.scale, o.shape, o.dtype, None, torch.tensor([8]), o.outlier_weight)
    with pytest.raises(ValueError, match="both or neither"):
        Int8Tensor(o.data, o.scale, o.shape, o.dtype, None, o.outlier_cols, None)
    assert torch.equal(dequantize_int8(Int8Tensor(q.data, q.scale, q.shape, q.dtype)), dequantize_int8(q))


def test_quantized_layers_refuse_bad_sizes():
    with pytest.raises(ValueError, match="in_features must be a positive int, got 0"):
        Linear4bit(0, 8)
    with pytest.raises(TypeError, match="compute_dtype must be None or float32"):
        Linear4bit(8, 8, compute_dtype=torch.int8)
    from quantization import Linear8bit
    with pytest.raises(ValueError, match="n_outlier_cols must be an int in"):
        Linear8bit(8, 8, n_outlier_cols=9)


def test_save_killed_mid_write_keeps_the_old_file(qfile, monkeypatch):
    old = qfile.read_bytes()

    def dies(model, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"partial")
        raise KeyboardInterrupt
    monkeypatch.setattr(qio, "save_model", dies)
    with pytest.raises(KeyboardInterrupt):
        save_quantized(quantize_model(Tiny(), bits=4), qfile)
    assert qfile.read_bytes() == old
    assert sorted(p.name for p in qfile.parent.iterdir()) == ["q.safetensors"]


@pytest.mark.parametrize("shape", [(7, 10), (3, 7), (64, 1)])
def test_shapes_that_do_not_fill_the_last_block_save_and_load(tmp_path, shape):
    # The packed codes of a weight whose size is not a multiple of the block size used to be a
    # slice of the padded buffer, which safetensors refuses to save ("None is covering the entire storage").
    torch.manual_seed(0)
    out_f, in_f = shape
    make = lambda: nn.Sequential(nn.Linear(in_f, out_f), nn.ReLU(), nn.Linear(out_f, 3))   # noqa: E731
    model = quantize_model(make(), bits=4)
    q = model[0].nf4()
    assert q.packed.untyped_storage().nbytes() == q.packed.numel()
    save_quantized(model, tmp_path / "q.safetensors")
    loaded = load_quantized(make(), tmp_path / "q.safetensors")
    x = torch.randn(5, in_f)
    assert torch.equal(loaded(x), model(x))
