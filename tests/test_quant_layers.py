"""Linear4bit / Linear8bit: same numbers as F.linear on the dequantized weight, input
gradients without saving a dequantized weight, frozen, dtype handling, state dicts."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from quantization.layers import Linear4bit, Linear8bit

LAYERS = [
    ("nf4", lambda lin, **kw: Linear4bit.from_linear(lin, **kw)),
    ("nf4-noDQ-32", lambda lin, **kw: Linear4bit.from_linear(lin, blocksize=32, double_quant=False, **kw)),
    ("int8", lambda lin, **kw: Linear8bit.from_linear(lin, **kw)),
    ("int8-block", lambda lin, **kw: Linear8bit.from_linear(lin, blocksize=64, **kw)),
    ("int8-outliers", lambda lin, **kw: Linear8bit.from_linear(lin, outlier_threshold=0.15, **kw)),
]


def _saved_tensor_sizes(fn):
    """numel of every tensor autograd saves for backward while running fn()."""
    sizes = []

    def pack(t):
        sizes.append(t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, sizes


@pytest.mark.parametrize("name, make", LAYERS)
@pytest.mark.parametrize("bias", [True, False])
def test_forward_equals_linear_on_dequantized_weight(name, make, bias):
    lin = nn.Linear(96, 40, bias=bias)
    q = make(lin)
    x = torch.randn(3, 5, 96)
    W = q.dequantize()
    assert W.shape == (40, 96) and W.dtype == torch.float32
    assert torch.equal(q(x), F.linear(x, W, q.bias))
    assert (W - lin.weight).abs().max() <= 0.16 * lin.weight.abs().max()   # half the widest NF4 gap
    assert q.in_features == 96 and q.out_features == 40
    assert q.true_param_count() == 96 * 40 + (40 if bias else 0)
    assert q.storage_bytes() < 96 * 40 * 4


@pytest.mark.parametrize("name, make", LAYERS)
def test_input_gradients_flow_without_saving_the_weight(name, make):
    lin = nn.Linear(64, 48)
    q = make(lin)
    x = torch.randn(4, 7, 64, requires_grad=True)
    y, sizes = _saved_tensor_sizes(lambda: q(x))
    assert all(s != 64 * 48 for s in sizes), sizes           # no (out, in) tensor kept alive
    gy = torch.randn_like(y)
    y.backward(gy)
    assert torch.allclose(x.grad, gy @ q.dequantize(), atol=1e-6, rtol=1e-5)
    assert all(not p.requires_grad for p in q.parameters())
    assert q.bias.grad is None
    # The control: autograd through F.linear does keep the weight.
    W = q.dequantize().requires_grad_()
    _, ref_sizes = _saved_tensor_sizes(lambda: F.linear(x, W))
    assert 64 * 48 in ref_sizes


def test_unfrozen_bias_gets_its_gradient():
    q = Linear4bit.from_linear(nn.Linear(32, 16))
    q.bias.requires_grad_(True)
    x = torch.randn(5, 32)
    q(x).sum().backward()
    assert torch.allclose(q.bias.grad, torch.full((16,), 5.0))


@pytest.mark.parametrize("name, make", LAYERS[:3])
@pytest.mark.parametrize("cdt", [torch.bfloat16, torch.float16])
def test_compute_dtype(name, make, cdt):
    q = make(nn.Linear(64, 32), compute_dtype=cdt)
    x = torch.randn(6, 64, requires_grad=True)
    y = q(x)
    assert y.dtype == torch.float32 and q.dequantize().dtype == cdt
    ref = F.linear(x.to(cdt), q.dequantize(cdt), q.bias.to(cdt)).float()
    assert torch.equal(y, ref)
    y.sum().backward()
    assert x.grad is not None and x.grad.dtype == torch.float32


def test_bf16_linear_and_half_keep_constants_float32():
    lin = nn.Linear(64, 32).to(torch.bfloat16)
    q = Linear4bit.from_linear(lin)
    assert q.weight_dtype == torch.bfloat16 and q.dequantize().dtype == torch.bfloat16
    before = q.dequantize(torch.float32)
    q.half()
    assert q.absmax_scales.dtype == torch.float32 and q.absmax_mean.dtype == torch.float32
    assert q.bias.dtype == torch.float16 and q.weight_packed.dtype == torch.uint8
    assert torch.equal(q.dequantize(torch.float32), before)
    q8 = Linear8bit.from_linear(nn.Linear(16, 8)).to(torch.bfloat16)
    assert q8.weight_scale.dtype == torch.float32


@pytest.mark.parametrize("name, make", LAYERS)
def test_state_dict_into_empty_layer(name, make):
    q = make(nn.Linear(80, 24))
    if isinstance(q, Linear4bit):
        empty = Linear4bit(80, 24, blocksize=q.blocksize, double_quant=q.double_quant)
    else:
        k = 0 if q.outlier_cols is None else q.outlier_cols.numel()
        empty = Linear8bit(80, 24, blocksize=q.blocksize, n_outlier_cols=k)
    empty.load_state_dict(q.state_dict())
    x = torch.randn(3, 80)
    assert torch.equal(empty(x), q(x))


def test_bad_layers():
    lin = nn.Linear(8, 8)
    with torch.no_grad():
        lin.weight[0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN/inf"):
        Linear4bit.from_linear(lin)
    with pytest.raises(ValueError, match="NaN/inf"):
        Linear8bit.from_linear(lin)
    with pytest.raises(ValueError, match="blocksize"):
        Linear4bit(8, 8, blocksize=100)


@pytest.mark.parametrize("name, make", LAYERS[::2])
def test_autocast_forward_and_backward(name, make):
    q = make(nn.Linear(64, 32))
    x = torch.randn(5, 64, requires_grad=True)
    with torch.autocast(x.device.type, dtype=torch.bfloat16):
        y = q(x)                                            # the matmul runs in bf16 under autocast
    y.sum().backward()
    assert x.grad.dtype == torch.float32
    ref = torch.ones(5, 32) @ q.dequantize(torch.float32)
    assert torch.allclose(x.grad, ref, rtol=2e-2, atol=2e-2)
