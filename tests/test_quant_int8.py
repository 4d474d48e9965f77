"""int8 absmax quantization: row-wise and blockwise error bounds, outlier columns, bad input."""
import pytest
import torch
from hypothesis import given, settings, strategies as st

from quantization.int8 import dequantize_int8, quantize_int8


@settings(max_examples=25, deadline=None)
@given(rows=st.integers(1, 40), cols=st.integers(1, 70),
       dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float16]),
       scale=st.sampled_from([1e-3, 1.0, 100.0]), seed=st.integers(0, 999))
def test_rowwise_error_at_most_half_step(rows, cols, dtype, scale, seed):
    g = torch.Generator().manual_seed(seed)
    w = (torch.randn(rows, cols, generator=g) * scale).to(dtype)
    w[0] = 0                                                    # an all-zero row
    q = quantize_int8(w)
    assert q.data.dtype == torch.int8 and q.data.shape == (rows, cols) and q.scale.shape == (rows,)
    assert torch.equal(q.scale, w.float().abs().amax(1) / 127)
    assert int(q.data.abs().max()) <= 127
    deq = dequantize_int8(q, torch.float32)
    step = q.scale[:, None]
    assert bool(((w.float() - deq).abs() <= step / 2 * (1 + 1e-4) + 1e-30).all())
    assert bool((deq[0] == 0).all())
    assert dequantize_int8(q).dtype == dtype


@settings(max_examples=25, deadline=None)
@given(n=st.integers(1, 3000), blocksize=st.sampled_from([32, 64, 256]), seed=st.integers(0, 999))
def test_blockwise_error_at_most_half_step(n, blocksize, seed):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, generator=g)
    q = quantize_int8(w, blocksize=blocksize)
    assert q.data.shape == (n,) and q.scale.numel() == -(-n // blocksize)
    per = q.scale.repeat_interleave(blocksize)[:n]
    assert bool(((w - dequantize_int8(q)).abs() <= per / 2 * (1 + 1e-4)).all())


def test_outlier_columns_kept_exactly_and_help_other_entries():
    torch.manual_seed(0)
    w = torch.randn(32, 64) * 0.02
    w[:, [5, 40]] *= 300                                       # two outlier input features
    plain = quantize_int8(w)
    split = quantize_int8(w, outlier_threshold=1.0)
    assert split.outlier_cols.tolist() == [5, 40]
    d_plain, d_split = dequantize_int8(plain), dequantize_int8(split)
    assert torch.equal(d_split[:, [5, 40]], w[:, [5, 40]])      # kept in float
    rest = torch.ones(64, dtype=torch.bool)
    rest[[5, 40]] = False
    err_plain = (d_plain - w)[:, rest].abs().mean()
    err_split = (d_split - w)[:, rest].abs().mean()
    assert err_split < err_plain / 20                           # the row scales are no longer inflated


def test_int8_bad_input():
    with pytest.raises(ValueError, match="NaN/inf"):
        quantize_int8(torch.tensor([[1.0, float("nan")]]))
    with pytest.raises(TypeError, match="float32/float16/bfloat16"):
        quantize_int8(torch.ones(2, 2, dtype=torch.int32))
    with pytest.raises(ValueError, match="blocksize"):
        quantize_int8(torch.ones(100), blocksize=100)
    with pytest.raises(ValueError, match="outlier_threshold"):
        quantize_int8(torch.ones(4, 4), outlier_threshold=-1.0)
    with pytest.raises(ValueError, match=r"row-wise scales only \(blocksize=None\), got blocksize=64"):
        quantize_int8(torch.ones(4, 16), blocksize=64, outlier_threshold=6.0)


def test_int8_matmul_integer_part_is_exact_and_outliers_help():
    from quantization.int8 import int8_matmul
    torch.manual_seed(0)
    w = torch.randn(48, 1500) * 0.02                          # > 1024 features: two exact chunks
    x = torch.randn(6, 1500)
    x[:, 7] = 40.0                                            # one large outlier feature
    q = quantize_int8(w)
    # the integer path by hand in float64 (exact for these sizes), no decomposition
    sx = x.abs().amax(1) / 127
    qx = torch.round(x / sx[:, None]).clamp(-127, 127)
    ref_int = (qx.double() @ q.data.double().t()) * sx.double()[:, None] * q.scale.double()[None, :]
    plain = int8_matmul(x, q, threshold=None)
    assert torch.allclose(plain.double(), ref_int, rtol=1e-6, atol=1e-6)
    exact = x @ dequantize_int8(q).t()                        # what a float matmul with Ŵ gives
    split = int8_matmul(x, q, threshold=6.0)
    assert (split - exact).abs().max() < (plain - exact).abs().max() / 10
    assert int8_matmul(x.view(2, 3, 1500), q).shape == (2, 3, 48)
    w2 = w.clone()
    w2[:, 100] = 5.0                                          # a weight-side outlier column joins the float part
    q2 = quantize_int8(w2, outlier_threshold=1.0)
    exact2 = x @ dequantize_int8(q2).t()
    assert (int8_matmul(x, q2) - exact2).abs().max() < 0.05 * exact2.abs().max()
    with pytest.raises(ValueError, match="row-wise"):
        int8_matmul(x, quantize_int8(w, blocksize=64))
