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

The code books: codebooks.py; checks, blocking, nibble packing and the 8-bit
quantization of the constants: blockwise.py (re-exported here).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .blockwise import (BLOCKSIZES, DQ_BLOCKSIZE, FLOAT_DTYPES, blockwise_absmax, check_blocksize,  # noqa: F401
                        check_float_tensor, check_shape, check_storage, dequantize_dynamic8, pack_nibbles,
                        quantize_dynamic8, unpack_nibbles)
from .codebooks import _table, dynamic_map_signed, is_compiling, nf4_levels  # noqa: F401

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
    devices it is one shot.  No device-specific code otherwise.  While torch.compile traces it
    (a compiled model holding a Linear4bit; quantization/compiled.py) it computes
    `dequantize_nf4_expression` instead: the same values, in a form that traces whole.
    """
    dtype = dtype or q.dtype
    if dtype not in FLOAT_DTYPES:
        raise TypeError(f"dequantize_nf4: dtype must be float32/float16/bfloat16, got {dtype}")
    n, bs = q.numel, q.blocksize
    device = q.packed.device
    if out is not None and (out.shape != torch.Size(q.shape) or out.dtype != dtype or not out.is_contiguous()):
        raise ValueError(f"dequantize_nf4: out must be a contiguous {dtype} tensor of shape "
                         f"{tuple(q.shape)}, got {out.dtype} {tuple(out.shape)}")
    if is_compiling():
        # Under torch.compile (a compiled model holding a Linear4bit, or compiled_dequantize_nf4):
        # the loop below reads storage_offset() and writes through out=, which are graph breaks
        # (5 per Linear4bit call, forward and backward); the one-expression form traces whole.
        w = dequantize_nf4_expression(q, dtype)
        return w if out is None else out.copy_(w)
    if out is None:
        out = torch.empty(q.shape, dtype=dtype, device=device)
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


def dequantize_nf4_expression(q: NF4Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """The same values as `dequantize_nf4`, as one expression with no loop, `out=` or views of
    raw storage: what torch.compile traces (dequantize_nf4 switches to it while compiling).

    byte -> pair of levels (the 256-entry table), padded to whole blocks, times each block's
    absmax, cut to n, cast.  Run eagerly this materialises every intermediate (several passes
    over memory); compiled, inductor fuses gather, multiply and cast into one kernel that
    reads n/2 bytes and writes n values once (quantization/compiled.py; measured against a
    plain copy in trainers/bench/quant.py).
    """
    dtype = dtype or q.dtype
    if dtype not in FLOAT_DTYPES:
        raise TypeError(f"dequantize_nf4_expression: dtype must be float32/float16/bfloat16, got {dtype}")
    n, bs = q.numel, q.blocksize
    nblocks = -(-n // bs)
    pairs = _table("nf4_pairs", q.packed.device)                           # (256, 2) float32
    levels = pairs[q.packed.long()].reshape(-1)                            # (2 ceil(n/2),) element order
    levels = torch.nn.functional.pad(levels, (0, nblocks * bs - levels.numel()))
    w = levels.view(nblocks, bs) * q.block_absmax()[:, None]               # (nblocks, bs) float32
    return w.reshape(-1)[:n].to(dtype).view(q.shape)
