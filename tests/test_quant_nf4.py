"""NF4 + double quantization: levels, nearest-level codes, error bounds, packing, bit counts,
the fast dequant against a slow one, and bitsandbytes as a reference when installed."""
import math

import pytest
import torch
from hypothesis import given, settings, strategies as st

from quantization.nf4 import (NF4Tensor, dequantize_dynamic8, dequantize_nf4, dynamic_map_signed, nearest_nf4_code,
                              nf4_bits_formula, nf4_levels, pack_nibbles, quantize_dynamic8, quantize_nf4,
                              unpack_nibbles)

# The table published with QLoRA (Dettmers et al. 2023, appendix E / bitsandbytes).
PUBLISHED_NF4 = [
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
]


def slow_dequant(q: NF4Tensor, dtype=None) -> torch.Tensor:
    """Reference: unpack every code, look the level up, multiply by the block's absmax."""
    codes = unpack_nibbles(q.packed, q.numel).long()
    per_elem = q.block_absmax().repeat_interleave(q.blocksize)[: q.numel]
    return (nf4_levels()[codes] * per_elem).to(dtype or q.dtype).view(q.shape)


def test_levels_equal_published_table():
    lv = nf4_levels()
    assert lv.dtype == torch.float32 and lv.shape == (16,)
    assert torch.equal(lv, torch.tensor(PUBLISHED_NF4, dtype=torch.float32))
    assert (lv > 0).sum() == 8 and (lv < 0).sum() == 7 and (lv == 0).sum() == 1
    assert lv[0] == -1 and lv[-1] == 1 and bool((lv[1:] > lv[:-1]).all())


def test_dynamic_map_shape():
    dm = dynamic_map_signed()
    assert dm.shape == (256,) and bool((dm[1:] >= dm[:-1]).all())
    assert dm.max() == 1.0 and dm.min() > -1.0 and (dm == 0).sum() == 1
    assert (dm > 0).sum() == 128 and (dm < 0).sum() == 127


def _tensor(shape, dtype, scale, zero_every, seed):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(shape, generator=g) * scale
    flat = w.view(-1)
    if zero_every:
        flat[::zero_every] = 0.0
    return w.to(dtype)


_SCALES = {torch.float32: [1e-40, 1e-30, 1e-3, 1.0, 1e30], torch.bfloat16: [1e-30, 1e-3, 1.0, 1e30],
           torch.float16: [1e-3, 1.0, 300.0]}


@settings(max_examples=40, deadline=None)
@given(shape=st.lists(st.integers(1, 24), min_size=1, max_size=3),
       blocksize=st.sampled_from([32, 64, 128, 4096]),
       dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float16]),
       scale_i=st.integers(0, 4), zero_block=st.booleans(), seed=st.integers(0, 2 ** 16))
def test_codes_nearest_and_error_bound(shape, blocksize, dtype, scale_i, zero_block, seed):
    scale = _SCALES[dtype][scale_i % len(_SCALES[dtype])]
    w = _tensor(shape, dtype, scale, 0, seed)
    n = w.numel()
    if zero_block and n > blocksize:
        w.view(-1)[:blocksize] = 0                           # one all-zero block
    q = quantize_nf4(w, blocksize, double_quant=False)
    codes = unpack_nibbles(q.packed, n).long()
    assert q.packed.numel() == (n + 1) // 2 and q.absmax.numel() == math.ceil(n / blocksize)
    absmax = q.absmax.double().repeat_interleave(blocksize)[:n]
    x = w.reshape(-1).double()
    assert torch.equal(q.absmax.double(), torch.nn.functional.pad(x.abs(), (0, q.absmax.numel() * blocksize - n))
                       .view(-1, blocksize).amax(1))
    # Brute force: distance to all 16 levels, in float64.
    lv = nf4_levels().double()
    s = torch.where(absmax > 0, x / torch.where(absmax > 0, absmax, 1), 0.0)
    dist = (s[:, None] - lv[None, :]).abs()                  # (n, 16)
    best, second = dist.topk(2, dim=1, largest=False).values.unbind(1)
    mine = dist.gather(1, codes[:, None]).squeeze(1)
    assert bool((mine <= best + 1e-6).all())                 # never worse than nearest (up to rounding)
    clear = (second - best) > 1e-6                           # not an (almost) exact tie
    assert torch.equal(codes[clear], dist.argmin(1)[clear])
    # |w - ŵ| <= half the local level gap * absmax (+ float rounding of the output dtype).
    gaps = torch.cat([torch.zeros(1), lv[1:] - lv[:-1], torch.zeros(1)]).double()
    half_gap = torch.maximum(gaps[codes], gaps[codes + 1]) / 2
    deq = dequantize_nf4(q).reshape(-1).double()
    eps, ulp0 = torch.finfo(dtype).eps, torch.finfo(dtype).smallest_normal * torch.finfo(dtype).eps
    ulp0 = max(ulp0, torch.finfo(torch.float32).smallest_normal * torch.finfo(torch.float32).eps)
    # slack: relative rounding of the output dtype, and its absolute step among subnormals
    bound = half_gap * absmax * (1 + 1e-5) + deq.abs() * eps + absmax * 1e-6 + ulp0
    assert bool(((x - deq).abs() <= bound).all())
    assert bool((deq[absmax == 0] == 0).all())               # zero blocks stay exactly zero


def test_exact_tie_goes_to_lower_level():
    lv = nf4_levels()
    mids = (lv[:-1] + lv[1:]) / 2
    w = torch.cat([torch.tensor([1.0]), mids])               # absmax 1: scaled == the midpoints exactly
    codes = unpack_nibbles(quantize_nf4(w, 32, double_quant=False).packed, w.numel())
    assert codes[0] == 15 and torch.equal(codes[1:].long(), torch.arange(15))


def test_compare_count_equals_bucketize():
    lv = nf4_levels()
    mids = (lv[:-1] + lv[1:]) / 2
    s = torch.cat([torch.rand(5000) * 2 - 1, mids, torch.nextafter(mids, torch.ones(15)),
                   torch.nextafter(mids, -torch.ones(15)), torch.tensor([-1.0, 0.0, 1.0])])
    assert torch.equal(nearest_nf4_code(s).int(), torch.bucketize(s, mids, out_int32=True))


def test_packing_order_high_nibble_first_and_odd_sizes():
    codes = torch.tensor([1, 2, 15, 0, 7], dtype=torch.uint8)
    packed = pack_nibbles(codes)
    assert packed.tolist() == [0x12, 0xF0, 0x70]
    assert torch.equal(unpack_nibbles(packed, 5), codes)
    # A 3-element tensor quantizes to 2 bytes; its last low nibble is the code of 0.0 (7).
    q = quantize_nf4(torch.tensor([1.0, -1.0, 0.0]), 32, double_quant=False)
    assert q.packed.tolist() == [0xF0, 0x77]


@pytest.mark.parametrize("n", [1, 63, 64, 65, 1001, 64 * 256 + 3])
@pytest.mark.parametrize("blocksize", [32, 64, 256])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_fast_dequant_equals_slow(n, blocksize, dtype):
    w = (torch.randn(n) * 0.05).to(dtype)
    for dq in (False, True):
        q = quantize_nf4(w, blocksize, double_quant=dq)
        for out_dtype in (None, torch.float32, torch.bfloat16):
            assert torch.equal(dequantize_nf4(q, out_dtype), slow_dequant(q, out_dtype))


def test_fast_dequant_chunked_equals_one_shot(monkeypatch):
    import quantization.nf4 as nf4
    w = torch.randn(96, 130)
    q = quantize_nf4(w, 64)
    whole = dequantize_nf4(q)
    monkeypatch.setattr(nf4, "DEQUANT_CHUNK", 128)            # many chunks + a partial last block
    assert torch.equal(dequantize_nf4(q), whole)
    out = torch.empty(96, 130)
    assert dequantize_nf4(q, out=out) is out and torch.equal(out, whole)


def test_double_quant_absmax_close_and_bits():
    w = torch.randn(256, 1024) * 0.02
    q, q0 = quantize_nf4(w, 64, double_quant=True), quantize_nf4(w, 64, double_quant=False)
    assert q.absmax_codes.dtype == torch.uint8 and q.absmax_codes.numel() == 4096
    assert q.absmax_scales.dtype == torch.float32 and q.absmax_scales.numel() == 16
    rel = ((q.block_absmax() - q0.absmax).abs() / q0.absmax).max()
    assert rel < 0.02                                         # 8-bit dynamic codes of the centred constants
    # measured bits = formula + the one float32 mean (a per-tensor constant)
    assert q.bits_per_param() == pytest.approx(nf4_bits_formula(64, True) + 32 / w.numel(), abs=1e-12)
    assert q0.bits_per_param() == pytest.approx(nf4_bits_formula(64, False), abs=1e-12)
    assert nf4_bits_formula(64, True) == pytest.approx(4.127, abs=1e-3)
    assert nf4_bits_formula(64, False) == 4.5
    assert (dequantize_nf4(q) - w).abs().max() < (dequantize_nf4(q0) - w).abs().max() * 1.1 + 1e-4


@pytest.mark.parametrize("n", [100, 64 * 7 + 5, 64 * 256 * 3])
def test_measured_bits_match_counts(n):
    w = torch.randn(n)
    q = quantize_nf4(w, 64, double_quant=True)
    nb = math.ceil(n / 64)
    bits = 8 * ((n + 1) // 2) + 8 * nb + 32 * math.ceil(nb / 256) + 32
    assert q.bits_per_param() == pytest.approx(bits / n, abs=1e-12)


def test_dynamic8_roundtrip_bound():
    x = torch.randn(1000) * 0.01
    codes, scales = quantize_dynamic8(x)
    y = dequantize_dynamic8(codes, scales)
    dm = dynamic_map_signed()
    # each value is the nearest map entry (scaled): error <= half the widest local gap * scale
    gap = (dm[1:] - dm[:-1]).max().item()
    per = scales.repeat_interleave(256)[:1000]
    assert bool(((x - y).abs() <= per * gap / 2 + 1e-9).all())


@pytest.mark.parametrize("bad, err", [
    (torch.tensor([1.0, float("nan")]), ValueError),
    (torch.tensor([1.0, float("inf")]), ValueError),
    (torch.tensor([1, 2, 3]), TypeError),
    (torch.zeros(0), ValueError),
])
def test_bad_input(bad, err):
    with pytest.raises(err, match="quantize_nf4"):
        quantize_nf4(bad)


def test_bad_dequant_arguments():
    q = quantize_nf4(torch.randn(10, 64))
    with pytest.raises(TypeError, match="dequantize_nf4: dtype"):
        dequantize_nf4(q, torch.int32)
    with pytest.raises(ValueError, match="dequantize_nf4: out"):
        dequantize_nf4(q, out=torch.empty(64, 10))


@pytest.mark.parametrize("blocksize", [16, 48, 8192, 0])
def test_bad_blocksize(blocksize):
    with pytest.raises(ValueError, match="blocksize"):
        quantize_nf4(torch.randn(100), blocksize)


# ---------------------------------------------------------------------------------------------
# bitsandbytes as the reference (same bytes, same constants, each dequantizes the other's).


def _bnb():
    pytest.importorskip("bitsandbytes")
    import bitsandbytes.functional as BF
    return BF


def _bnb_state(BF, q: NF4Tensor):
    if not q.double_quant:
        return BF.QuantState(absmax=q.absmax, shape=q.shape, code=BF.get_4bit_type("nf4", device="cpu"),
                             blocksize=q.blocksize, quant_type="nf4", dtype=q.dtype)
    state2 = BF.QuantState(absmax=q.absmax_scales, code=BF.create_dynamic_map(), blocksize=256,
                           dtype=torch.float32)
    return BF.QuantState(absmax=q.absmax_codes, shape=q.shape, code=BF.get_4bit_type("nf4", device="cpu"),
                         blocksize=q.blocksize, quant_type="nf4", dtype=q.dtype, offset=q.absmax_mean,
                         state2=state2)


@pytest.mark.ref
def test_tables_equal_bitsandbytes():
    BF = _bnb()
    assert torch.equal(nf4_levels(), BF.get_4bit_type("nf4", device="cpu"))
    assert torch.equal(dynamic_map_signed(), BF.create_dynamic_map())


@pytest.mark.ref
@pytest.mark.parametrize("shape, blocksize, dtype", [
    ((64, 96), 64, torch.float32), ((64, 96), 32, torch.bfloat16), ((33, 77), 64, torch.float32),
    ((5, 3), 32, torch.float32), ((1000,), 256, torch.bfloat16), ((16, 4096), 1024, torch.float32),
    ((16, 4096), 64, torch.float16), ((128, 256), 128, torch.float32)])
def test_same_bytes_as_bitsandbytes(shape, blocksize, dtype):
    BF = _bnb()
    w = (torch.randn(shape) * 0.03).to(dtype)
    q = quantize_nf4(w, blocksize, double_quant=False)
    packed, state = BF.quantize_4bit(w, blocksize=blocksize, quant_type="nf4")
    assert torch.equal(packed.view(-1), q.packed)
    assert torch.equal(state.absmax, q.absmax)
    # Each library dequantizes the other's tensors to the same numbers -- where bitsandbytes'
    # C++ CPU kernel is right: it restarts blocks at each row, which disagrees with its own
    # (row-major, flat) quantizer when an even row length is not a multiple of the block size.
    if len(shape) > 1 and shape[-1] % 2 == 0 and shape[-1] % blocksize:
        return
    theirs = BF.dequantize_4bit(packed, state).reshape(shape)   # bnb returns 1-D shapes as (1, n)
    assert torch.equal(dequantize_nf4(q), theirs)
    assert torch.equal(BF.dequantize_4bit(q.packed.view(-1, 1), _bnb_state(BF, q)).reshape(shape), dequantize_nf4(q))


@pytest.mark.ref
@pytest.mark.parametrize("shape", [(256, 512), (100, 320)])
def test_double_quant_matches_bitsandbytes(shape):
    BF = _bnb()
    w = torch.randn(shape) * 0.02
    q = quantize_nf4(w, 64, double_quant=True)
    packed, state = BF.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=True)
    assert torch.equal(packed.view(-1), q.packed)
    assert torch.equal(state.offset, q.absmax_mean)
    assert torch.equal(state.state2.absmax, q.absmax_scales)
    # bitsandbytes' C++ CPU kernel does not always pick the nearest 8-bit code when a value
    # sits very close to a midpoint; where the codes differ they are neighbours.
    diff = (state.absmax.long() - q.absmax_codes.long()).abs()
    assert diff.max() <= 1 and (diff == 0).float().mean() > 0.95
    # Cross dequantization with the other side's constants gives identical numbers.
    ours = dequantize_nf4(q)
    assert torch.equal(BF.dequantize_4bit(q.packed.view(-1, 1), _bnb_state(BF, q)), ours)
    theirs = NF4Tensor(packed.view(-1), w.shape, w.dtype, 64, absmax_codes=state.absmax,
                       absmax_scales=state.state2.absmax, absmax_mean=state.offset)
    assert torch.equal(dequantize_nf4(theirs), BF.dequantize_4bit(packed, state))
