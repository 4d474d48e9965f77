"""NF4 (4-bit NormalFloat) blockwise quantization with double quantization.

From QLoRA (Dettmers, Pagnoni, Holtzman, Zettlemoyer 2023, "QLoRA: Efficient
Finetuning of Quantized LLMs", arXiv:2305.14314), section 3.

A weight W (any shape, n elements) is flattened row-major and cut into blocks of
B elements (B = 64 by default); the last block may be shorter.  Per block b:

    c_b   = max_i |w_i|                        absmax, one float32 per block
    q_i   = argmin_j | w_i / c_b - L_j |       nearest of the 16 NF4 levels L
    ŵ_i   = L[q_i] * c_b                       dequantized value

The levels L are quantiles of N(0, 1), normalised to [-1, 1], with an exact zero
and one more positive level than negative ones (8 positive, 7 negative).

Storage (the bitsandbytes layout, so tensors move between the two libraries):
two 4-bit codes per byte, the FIRST element of each pair in the HIGH nibble.

Double quantization (QLoRA §3, "Double Quantization") stores the absmax constants
themselves in 8 bits: subtract their mean, cut them into blocks of 256, quantize
each block with the signed dynamic 8-bit map (Dettmers 2015, "8-Bit
Approximations for Parallelism in Deep Learning", arXiv:1511.04561) and keep one
float32 scale per 256 constants plus the mean:

    bits / parameter = 4 + 8/B + 32/(256 B)   (≈ 4.127 for B = 64; 4 + 32/B = 4.5 without)
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

BLOCKSIZES = tuple(2 ** k for k in range(5, 13))  # 32 .. 4096
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
DQ_BLOCKSIZE = 256  # QLoRA's block size for the second-level (absmax) quantization

# ---------------------------------------------------------------------------------------------
# The two code books, derived here rather than typed in.


def nf4_levels() -> torch.Tensor:
    """The 16 NF4 levels, sorted, float32, on the CPU (QLoRA §3, "4-bit NormalFloat").

    Asymmetric construction: 8 positive quantiles of N(0,1) taken at evenly spaced
    probabilities from δ' to 1/2 (the 1/2 point itself, i.e. 0, dropped), 7 negative
    ones mirrored the same way with one fewer point, plus an exact 0; divide by the
    largest so the range is [-1, 1].  δ' = 0.9677083 ≈ 1 - ½(1/30 + 1/32) is the
    published offset.  The published table was computed with float32 probability
    points, float64 quantiles and a float32 normalisation; doing the same roundings
    reproduces it bit for bit.
    """
    offset = 0.9677083
    pos = torch.special.ndtri(torch.linspace(offset, 0.5, 9, dtype=torch.float32)[:-1].double())
    neg = -torch.special.ndtri(torch.linspace(offset, 0.5, 8, dtype=torch.float32)[:-1].double())
    levels = torch.cat([neg, torch.zeros(1, dtype=torch.float64), pos]).float().sort().values
    return levels / levels.max()                     # (16,) from -1 to 1


def dynamic_map_signed() -> torch.Tensor:
    """The signed dynamic 8-bit map (Dettmers 2015), 256 sorted float32 values in [-1, 1].

    For each decade e = 0..6 (magnitudes 10^(e-6) .. 10^(e-5)), 2^e values split the
    fraction range [0.1, 1] linearly (bin midpoints), once positive and once
    negative: 2·(1+2+...+64) = 254 values; plus 0 and 1.  Small magnitudes get few,
    widely spaced fractions; large ones get many.  Float32 roundings follow the
    bitsandbytes table so that codes agree.
    """
    values = []
    for e in range(7):
        edges = torch.linspace(0.1, 1.0, 2 ** e + 1, dtype=torch.float32)
        mids = (edges[:-1] + edges[1:]) / 2 * (10.0 ** (e - 6))   # float32 arithmetic
        values += [mids, -mids]
    values.append(torch.tensor([0.0, 1.0]))
    return torch.cat(values).sort().values               # (256,)


_TABLES: dict = {}


def _table(kind: str, device: torch.device) -> torch.Tensor:
    """Cached code books / lookup tables per device (built on the CPU, then moved)."""
    key = (kind, device)
    if key not in _TABLES:
        if kind == "nf4":
            t = nf4_levels()
        elif kind == "nf4_mid":                           # the 15 decision boundaries
            lv = nf4_levels()
            t = (lv[:-1] + lv[1:]) / 2
        elif kind == "nf4_pairs":                         # byte -> (level of high nibble, level of low)
            lv = nf4_levels()
            byte = torch.arange(256)
            t = torch.stack([lv[byte >> 4], lv[byte & 15]], dim=1)   # (256, 2)
        elif kind == "dyn8":
            t = dynamic_map_signed()
        elif kind == "dyn8_mid":
            dm = dynamic_map_signed()
            t = (dm[:-1] + dm[1:]) / 2
        else:
            raise KeyError(kind)
        _TABLES[key] = t.to(device)
    return _TABLES[key]


# ---------------------------------------------------------------------------------------------
# Checks, blocking, packing.


def check_float_tensor(x: torch.Tensor, what: str = "tensor") -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{what}: expected a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{what}: expected a float32/float16/bfloat16 tensor, got dtype {x.dtype}")
    if x.numel() == 0:
        raise ValueError(f"{what}: expected a non-empty tensor, got shape {tuple(x.shape)}")
    if not bool(torch.isfinite(x.abs().amax())):           # amax propagates NaN; one fast reduction
        bad = int((~torch.isfinite(x)).sum())
        raise ValueError(f"{what}: contains {bad} NaN/inf value(s); cannot quantize non-finite weights")


def check_blocksize(blocksize: int) -> None:
    if isinstance(blocksize, bool) or blocksize not in BLOCKSIZES:
        raise ValueError(f"blocksize: expected a power of two from 32 to 4096 {BLOCKSIZES}, got {blocksize!r}")


def check_shape(shape, what: str) -> torch.Size:
    """The original shape of a quantized tensor as a torch.Size of >= 1 element."""
    try:
        size = torch.Size(shape)
    except (TypeError, ValueError) as error:
        raise TypeError(f"{what}: shape must be a sequence of ints, got {shape!r}") from error
    if size.numel() == 0:
        raise ValueError(f"{what}: shape must hold at least one element, got {tuple(size)}")
    return size


def check_storage(what: str, t, dtypes: tuple, numel: int, why: str) -> None:
    """A stored tensor of the right kind and element count (any layout: it is read flat)."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{what}: expected a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in dtypes:
        names = "/".join(str(d).replace("torch.", "") for d in dtypes)
        raise TypeError(f"{what}: expected dtype {names}, got {t.dtype}")
    if t.numel() != numel:
        raise ValueError(f"{what}: expected {numel} element(s) ({why}), got {t.numel()} (shape {tuple(t.shape)})")


def blockwise_absmax(x: torch.Tensor, blocksize: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Row-major flatten, zero-pad to whole blocks, scale each block into [-1, 1].

    Returns (scaled (nblocks, blocksize) float32, absmax (nblocks,) float32).
    Zero padding never changes a block's absmax; padded entries are dropped later.
    """
    flat = x.reshape(-1).float()
    n = flat.numel()
    nblocks = -(-n // blocksize)
    blocks = torch.nn.functional.pad(flat, (0, nblocks * blocksize - n)).view(nblocks, blocksize)
    absmax = blocks.abs().amax(dim=1)                                   # (nblocks,)
    # Multiply by the reciprocal, as bitsandbytes does (same codes); an all-zero block
    # gets reciprocal 0 instead of inf.  Subnormal absmax would overflow 1/c: divide there.
    tiny = torch.finfo(torch.float32).tiny
    inv = torch.where(absmax >= tiny, 1.0 / absmax.clamp(min=tiny), torch.zeros_like(absmax))
    scaled = blocks * inv[:, None]
    sub = (absmax > 0) & (absmax < tiny)
    if bool(sub.any()):
        safe = torch.where(sub, absmax, torch.ones_like(absmax))
        scaled = torch.where(sub[:, None], blocks / safe[:, None], scaled)
    return scaled.clamp_(-1.0, 1.0), absmax


def pack_nibbles(codes: torch.Tensor) -> torch.Tensor:
    """(n,) codes 0..15 -> (ceil(n/2),) uint8; element 2k in the high nibble, 2k+1 in the low."""
    codes = codes.reshape(-1).to(torch.uint8)
    if codes.numel() % 2:
        codes = torch.cat([codes, codes.new_zeros(1)])
    return (codes[0::2] << 4) | codes[1::2]


def unpack_nibbles(packed: torch.Tensor, n: int) -> torch.Tensor:
    """Inverse of pack_nibbles: (ceil(n/2),) uint8 -> (n,) uint8 codes."""
    check_storage("unpack_nibbles packed", packed, (torch.uint8,), (n + 1) // 2, f"ceil({n} / 2) bytes")
    pairs = torch.stack([packed >> 4, packed & 15], dim=1)             # (nbytes, 2)
    return pairs.reshape(-1)[:n]


# ---------------------------------------------------------------------------------------------
# 8-bit dynamic blockwise quantization (used for the absmax constants).


def quantize_dynamic8(x: torch.Tensor, blocksize: int = DQ_BLOCKSIZE) -> tuple[torch.Tensor, torch.Tensor]:
    """x (n,) float -> (codes (n,) uint8 indices into dynamic_map_signed(), scales (ceil(n/B),) float32)."""
    scaled, scales = blockwise_absmax(x, blocksize)
    codes = torch.bucketize(scaled.reshape(-1), _table("dyn8_mid", x.device), out_int32=True)
    return codes[: x.numel()].to(torch.uint8), scales


def dequantize_dynamic8(codes: torch.Tensor, scales: torch.Tensor, blocksize: int = DQ_BLOCKSIZE) -> torch.Tensor:
    n = codes.numel()
    check_storage("dequantize_dynamic8 scales", scales, FLOAT_DTYPES, -(-n // blocksize),
                  f"one per block of {blocksize} of {n} codes")
    values = _table("dyn8", codes.device).index_select(0, codes.to(torch.int32))
    values = torch.nn.functional.pad(values, (0, scales.numel() * blocksize - n))
    return (values.view(-1, blocksize) * scales[:, None]).reshape(-1)[:n]


# ---------------------------------------------------------------------------------------------
# The quantized tensor.


@dataclass
class NF4Tensor:
    """A quantized tensor: packed codes plus the per-block scales (plain or double-quantized)."""
    packed: torch.Tensor                     # (ceil(n/2),) uint8, first element of a pair in the high nibble
    shape: torch.Size                        # original shape
    dtype: torch.dtype                       # original dtype
    blocksize: int = 64
    absmax: torch.Tensor | None = None       # (nblocks,) float32          -- without double quantization
    absmax_codes: torch.Tensor | None = None  # (nblocks,) uint8           -- with double quantization
    absmax_scales: torch.Tensor | None = None  # (ceil(nblocks/256),) float32
    absmax_mean: torch.Tensor | None = None   # () float32

    def __post_init__(self):
        """Refuse storage that disagrees with the metadata (shape, block size): a packed tensor
        of the wrong length would dequantize to wrong values or fail deep in a broadcast."""
        self.shape = check_shape(self.shape, "NF4Tensor")
        if self.dtype not in FLOAT_DTYPES:
            raise TypeError(f"NF4Tensor: dtype must be float32/float16/bfloat16, got {self.dtype}")
        check_blocksize(self.blocksize)
        n = self.numel
        nblocks = -(-n // self.blocksize)
        check_storage("NF4Tensor.packed", self.packed, (torch.uint8,), (n + 1) // 2,
                      f"ceil({n} / 2) bytes for shape {tuple(self.shape)}")
        dq = (self.absmax_codes, self.absmax_scales, self.absmax_mean)
        if self.absmax is not None:
            if any(t is not None for t in dq):
                raise ValueError("NF4Tensor: give either absmax (plain) or absmax_codes/absmax_scales/absmax_mean "
                                 "(double quantization), not both")
            check_storage("NF4Tensor.absmax", self.absmax, FLOAT_DTYPES, nblocks,
                          f"one per block of {self.blocksize} of {n} elements")
        elif any(t is None for t in dq):
            missing = [k for k, t in zip(("absmax_codes", "absmax_scales", "absmax_mean"), dq) if t is None]
            raise ValueError(f"NF4Tensor: needs absmax, or all of absmax_codes/absmax_scales/absmax_mean; "
                             f"{', '.join(missing)} missing")
        else:
            check_storage("NF4Tensor.absmax_codes", self.absmax_codes, (torch.uint8,), nblocks,
                          f"one per block of {self.blocksize} of {n} elements")
            check_storage("NF4Tensor.absmax_scales", self.absmax_scales, FLOAT_DTYPES, -(-nblocks // DQ_BLOCKSIZE),
                          f"one per {DQ_BLOCKSIZE} of {nblocks} blocks")
            check_storage("NF4Tensor.absmax_mean", self.absmax_mean, FLOAT_DTYPES, 1, "one per tensor")

    @property
    def numel(self) -> int:
        return int(torch.Size(self.shape).numel())

    @property
    def double_quant(self) -> bool:
        return self.absmax is None

    def block_absmax(self) -> torch.Tensor:
        """(nblocks,) float32 absmax constants (dequantized from 8 bits when double-quantized)."""
        if self.absmax is not None:
            return self.absmax.float()
        return dequantize_dynamic8(self.absmax_codes, self.absmax_scales.float()) + self.absmax_mean.float()

    def tensors(self) -> dict[str, torch.Tensor]:
        names = ("packed", "absmax", "absmax_codes", "absmax_scales", "absmax_mean")
        return {k: getattr(self, k) for k in names if getattr(self, k) is not None}

    def storage_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors().values())

    def bits_per_param(self) -> float:
        """Measured: every stored bit (codes, constants, per-tensor mean) over the element count."""
        return 8 * self.storage_bytes() / self.numel


def nf4_bits_formula(blocksize: int = 64, double_quant: bool = True, dq_blocksize: int = DQ_BLOCKSIZE) -> float:
    """QLoRA's count, without per-tensor constants: 4 + 8/B + 32/(256 B), or 4 + 32/B."""
    if double_quant:
        return 4 + 8 / blocksize + 32 / (dq_blocksize * blocksize)
    return 4 + 32 / blocksize


def nearest_nf4_code(scaled: torch.Tensor) -> torch.Tensor:
    """Code of the nearest NF4 level for values in [-1, 1]: the number of the 15 midpoints
    between neighbouring levels that lie strictly below the value, so an exact tie
    (value == midpoint) goes to the lower level.  Same result as torch.bucketize on the
    midpoints; 15 compare-and-add passes in uint8 are several times faster on the CPU."""
    codes = torch.zeros(scaled.shape, dtype=torch.uint8, device=scaled.device)
    for mid in _table("nf4_mid", torch.device("cpu")).tolist():
        codes += scaled > mid
    return codes


def quantize_nf4(w: torch.Tensor, blocksize: int = 64, double_quant: bool = True) -> NF4Tensor:
    """Blockwise NF4 quantization of any float tensor (see module docstring)."""
    check_float_tensor(w, "quantize_nf4 input")
    check_blocksize(blocksize)
    n = w.numel()
    scaled, absmax = blockwise_absmax(w.detach(), blocksize)
    # The zero padding of the last block gets the code of level 0.0 (7), as in bitsandbytes:
    # it shows up in the low nibble of the last byte when n is odd.
    codes = nearest_nf4_code(scaled.reshape(-1))
    packed = pack_nibbles(codes)
    if packed.numel() != (n + 1) // 2:   # drop the padding's bytes; a copy, so no hidden storage is kept
        packed = packed[: (n + 1) // 2].clone()
    if not double_quant:
        return NF4Tensor(packed=packed, shape=w.shape, dtype=w.dtype, blocksize=blocksize, absmax=absmax)
    mean = absmax.mean()
    codes, scales = quantize_dynamic8(absmax - mean, DQ_BLOCKSIZE)
    return NF4Tensor(packed=packed, shape=w.shape, dtype=w.dtype, blocksize=blocksize,
                     absmax_codes=codes, absmax_scales=scales, absmax_mean=mean)


# Elements per chunk in the CPU dequant loop: big enough that Python overhead is noise,
# small enough that a chunk of output stays in cache between the gather and the multiply.
DEQUANT_CHUNK = 1 << 19


def dequantize_nf4(q: NF4Tensor, dtype: torch.dtype | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
    """NF4Tensor -> dense tensor of q.shape in `dtype` (default: the original dtype).

    No separate unpacking pass.  A 256-entry table maps each byte to the PAIR of float32
    levels it encodes (high nibble first), stored as one 8-byte word, so a single 1-D
    gather (`index_select`) turns n/2 bytes into n levels already in element order,
    written straight into the output; then one in-place multiply by each block's absmax
    (output viewed as (nblocks, blocksize)).  Other dtypes gather into a float32 scratch
    chunk and the multiply writes the cast result into the output.  On the CPU the work is
    cut into chunks so the multiply reads what the gather just wrote from cache; on other
    devices it is one shot.  No device-specific code otherwise.
    """
    dtype = dtype or q.dtype
    if dtype not in FLOAT_DTYPES:
        raise TypeError(f"dequantize_nf4: dtype must be float32/float16/bfloat16, got {dtype}")
    n, bs = q.numel, q.blocksize
    device = q.packed.device
    if out is None:
        out = torch.empty(q.shape, dtype=dtype, device=device)
    elif out.shape != torch.Size(q.shape) or out.dtype != dtype or not out.is_contiguous():
        raise ValueError(f"dequantize_nf4: out must be a contiguous {dtype} tensor of shape "
                         f"{tuple(q.shape)}, got {out.dtype} {tuple(out.shape)}")
    flat = out.view(-1)                                     # (n,)
    absmax = q.block_absmax()                               # (nblocks,) float32
    # (256,) one 8-byte word = 2 float32 levels; int64 rather than float64 because MPS has no float64
    pairs = _table("nf4_pairs", device).view(torch.int64).view(-1)
    packed = q.packed
    full = n // bs                                          # number of whole blocks
    step = max(1, DEQUANT_CHUNK // bs) if device.type == "cpu" else max(full, 1)
    direct = dtype == torch.float32 and flat.storage_offset() % 2 == 0
    scratch = None if direct else torch.empty(min(step, full) * bs // 2, dtype=torch.int64, device=device)
    for b0 in range(0, full, step):
        b1 = min(full, b0 + step)
        idx = packed[b0 * bs // 2: b1 * bs // 2].to(torch.int32)          # (bytes,)
        dst = flat[b0 * bs: b1 * bs].view(b1 - b0, bs)                     # (blocks, bs)
        if direct:
            torch.index_select(pairs, 0, idx, out=dst.view(torch.int64).view(-1))
            dst.mul_(absmax[b0:b1, None])
        else:
            vals = torch.index_select(pairs, 0, idx, out=scratch[: idx.numel()])
            torch.mul(vals.view(torch.float32).view(b1 - b0, bs), absmax[b0:b1, None], out=dst)
    rem = n - full * bs
    if rem:                                                 # last partial block (maybe odd length)
        idx = packed[full * bs // 2:].to(torch.int32)
        vals = pairs.index_select(0, idx).view(torch.float32)[:rem]
        torch.mul(vals, absmax[full], out=flat[full * bs:])
    return out
