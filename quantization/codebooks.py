"""The two code books, derived here rather than typed in: the 16 NF4 levels and the dynamic 8-bit map.

NF4 (QLoRA, Dettmers et al. 2023, arXiv:2305.14314, section 3): quantiles of N(0, 1),
normalised to [-1, 1], with an exact zero and one more positive level than negative
ones (8 positive, 7 negative). The signed dynamic 8-bit map (Dettmers 2015,
arXiv:1511.04561) quantizes the NF4 block constants under double quantization.
Both reproduce the bitsandbytes tables bit for bit, so codes agree between the two
libraries. `_table` caches them (and the lookup tables built from them) per device.
"""
from __future__ import annotations

import torch


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


def is_compiling() -> bool:
    """Whether torch.compile is tracing the caller (torch >= 2.3; older torch: False, and the eager
    code paths are traced, with graph breaks)."""
    check = getattr(torch.compiler, "is_compiling", None)
    return bool(check is not None and check())


def _table(kind: str, device: torch.device) -> torch.Tensor:
    """Cached code books / lookup tables per device (built on the CPU, then moved).

    Under torch.compile a table not cached for `device` yet is the CPU one (cached when this
    module is imported, below) moved inside the graph, and is not stored: writing this
    module-level cache from a traced function (e.g. Linear4bit's autograd.Function) is a side
    effect dynamo refuses, and building it there would put ndtri & co. in every compiled call.
    Eager calls fill the cache as before."""
    key = (kind, device)
    if key not in _TABLES and is_compiling():
        return _TABLES[(kind, torch.device("cpu"))].to(device)
    if key not in _TABLES:
        _TABLES[key] = _build_table(kind).to(device)
    return _TABLES[key]


def _build_table(kind: str) -> torch.Tensor:
    """One code book or lookup table, on the CPU."""
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
    return t


TABLE_KINDS = ("nf4", "nf4_mid", "nf4_pairs", "dyn8", "dyn8_mid")
for _kind in TABLE_KINDS:          # the CPU tables, ready before anything is compiled (about a millisecond)
    _table(_kind, torch.device("cpu"))
