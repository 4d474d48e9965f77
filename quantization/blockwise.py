"""Blockwise absmax machinery shared by NF4 (nf4.py) and int8 (int8.py): checks, blocking, packing.

A tensor is flattened row-major and cut into blocks of B elements, each scaled into
[-1, 1] by its absmax (`blockwise_absmax`). NF4 stores two 4-bit codes per byte, the
FIRST element of each pair in the HIGH nibble (bitsandbytes' layout: `pack_nibbles`).
Double quantization stores the absmax constants themselves in 8 bits with the signed
dynamic map (codebooks.py), in blocks of DQ_BLOCKSIZE = 256 (`quantize_dynamic8`).
"""
from __future__ import annotations

import torch

from .codebooks import _table

BLOCKSIZES = tuple(2 ** k for k in range(5, 13))  # 32 .. 4096
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
DQ_BLOCKSIZE = 256  # QLoRA's block size for the second-level (absmax) quantization

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
