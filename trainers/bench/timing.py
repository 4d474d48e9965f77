"""Side-by-side timing: every figure the benchmark prints is a ratio of two things
timed in the same process, interleaved, so that a noisy shared machine slows both alike.

    for each repeat k = 1..R (after warm-up):
        for each candidate f, in an order rotated by k and reversed when k is odd
        (nobody is always first, or always right after the same candidate):
            t_f[k] = time of `number_f` calls of f / number_f
    ratio(a, b) = median_k  t_a[k] / t_b[k]             (paired: a and b ran in the same round)

The median of paired ratios is robust to a burst of load that hits one round; the
spread (quartiles of the paired ratios) is kept in the JSON so a reader can see
how noisy a figure was. On CUDA and MPS the clock is read only after
`Runtime.synchronize()`, since kernels run asynchronously there.

Also here: a `Row` of the result table, its pass/miss rule against a target such
as "<= 1.10", the table printer, and the log-log slope fit used by the scaling section.
"""
from __future__ import annotations

import gc
import math
import statistics
import time
from dataclasses import dataclass, field
from typing import Callable, Mapping

from trainers.device import Runtime

STATUSES = ("pass", "miss", "info", "skip")


@dataclass
class Settings:
    """How hard to time: shared by every section of one run."""
    runtime: Runtime
    quick: bool = False
    repeats: int = 5          # timed rounds after warm-up (the median is over these)
    warmup: int = 1           # calls after the first (cold) one, before the timed rounds
    min_time: float = 0.05    # seconds one timed sample should last (calls are batched up to it)
    max_number: int = 200     # at most this many calls per sample

    @property
    def device(self):
        return self.runtime.device


@dataclass
class Timing:
    """Seconds per call of one candidate, one entry per repeat round."""
    name: str
    times: list[float]
    number: int                # calls per timed sample

    @property
    def median(self) -> float:
        return statistics.median(self.times)


def time_interleaved(fns: Mapping[str, Callable[[], object]], settings: Settings,
                     repeats: int | None = None) -> dict[str, Timing]:
    """Time each candidate `repeats` times, interleaved, after one cold call and `settings.warmup` more.

    Each candidate gets its own number of calls per sample (enough to last
    `settings.min_time`, judged from its fastest warm-up call, never the cold one),
    so a 1 ms and a 1 s function are both timed with a clock resolution that does
    not matter. Returns per-call times.
    """
    if not fns:
        raise ValueError("time_interleaved: no candidates given")
    repeats = settings.repeats if repeats is None else repeats
    if repeats < 1:
        raise ValueError(f"time_interleaved: repeats must be >= 1, got {repeats}")
    sync = settings.runtime.synchronize
    names = list(fns)
    number = {}
    for name in names:
        _clocked(fns[name], 1, sync)                 # a cold call (allocations, lazy init): not a guide
        t = min(_clocked(fns[name], 1, sync) for _ in range(max(1, settings.warmup)))
        number[name] = max(1, min(settings.max_number, math.ceil(settings.min_time / max(t, 1e-9))))
    times: dict[str, list[float]] = {name: [] for name in names}
    for k in range(repeats):
        order = names[k % len(names):] + names[:k % len(names)]
        if k % 2:
            order.reverse()                          # so nobody always runs right after the same one
        gc.collect()
        gc.disable()
        try:
            for name in order:
                times[name].append(_clocked(fns[name], number[name], sync) / number[name])
        finally:
            gc.enable()
    return {name: Timing(name, times[name], number[name]) for name in names}


def _clocked(fn: Callable[[], object], number: int, sync: Callable[[], None]) -> float:
    sync()
    start = time.perf_counter()
    for _ in range(number):
        fn()
    sync()
    return time.perf_counter() - start


def paired_ratios(a: Timing, b: Timing) -> list[float]:
    """t_a[k] / t_b[k] for each round k (both timed in the same interleaved round)."""
    if len(a.times) != len(b.times):
        raise ValueError(f"paired_ratios: {a.name} has {len(a.times)} rounds, {b.name} has {len(b.times)}")
    return [x / y for x, y in zip(a.times, b.times)]


def ratio(a: Timing, b: Timing) -> float:
    """Median over rounds of t_a / t_b: how many times longer a takes than b."""
    return statistics.median(paired_ratios(a, b))


def spread(values: list[float]) -> tuple[float, float]:
    """(lower, upper) quartile of a list (both equal the value for one element)."""
    if len(values) < 2:
        return values[0], values[0]
    q = statistics.quantiles(values, n=4, method="inclusive")
    return q[0], q[2]


def fit_loglog(xs: list[float], ys: list[float]) -> float:
    """Least-squares slope p of log y = p log x + c: y grows like x^p."""
    if len(xs) != len(ys) or len(xs) < 2:
        raise ValueError(f"fit_loglog: need two or more (x, y) pairs of equal length, got {len(xs)}, {len(ys)}")
    if min(xs) <= 0 or min(ys) <= 0:
        raise ValueError("fit_loglog: x and y must be positive")
    lx, ly = [math.log(x) for x in xs], [math.log(y) for y in ys]
    mx, my = sum(lx) / len(lx), sum(ly) / len(ly)
    sxx = sum((x - mx) ** 2 for x in lx)
    if sxx == 0:
        raise ValueError("fit_loglog: all x are equal; no slope to fit")
    return sum((x - mx) * (y - my) for x, y in zip(lx, ly)) / sxx


# ------------------------------------------------------------------------- the result table

@dataclass
class Row:
    """One line of the table: `ratio` against `target` ("<= 1.10", ">= 0.5", or None: information)."""
    section: str
    what: str
    ratio: float | None
    target: str | None = None
    status: str = "info"
    note: str = ""
    details: dict = field(default_factory=dict)


def meets(value: float, target: str) -> bool:
    """Whether `value` satisfies a target written "<= x", ">= x", "< x" or "> x"."""
    op, _, number = target.strip().partition(" ")
    bound = float(number)
    checks = {"<=": value <= bound, ">=": value >= bound, "<": value < bound, ">": value > bound}
    if op not in checks:
        raise ValueError(f"target: expected '<= x', '>= x', '< x' or '> x', got {target!r}")
    return checks[op]


def make_row(section: str, what: str, value: float | None, target: str | None = None, note: str = "",
             **details) -> Row:
    """A row whose status follows from the target: pass/miss, info (no target) or skip (no value)."""
    if value is None:
        status = "skip"
    elif target is None:
        status = "info"
    else:
        status = "pass" if meets(value, target) else "miss"
    return Row(section, what, None if value is None else float(value), target, status, note, details)


def compare_row(section: str, what: str, a: Timing, b: Timing, target: str | None = None,
                note: str = "", **details) -> Row:
    """Row for ratio(a, b) = t_a / t_b, with the medians and the quartiles of the paired ratios."""
    pairs = paired_ratios(a, b)
    lo, hi = spread(pairs)
    return make_row(section, what, statistics.median(pairs), target, note,
                    **{f"{a.name}_s": a.median, f"{b.name}_s": b.median, "ratio_q1": lo, "ratio_q3": hi,
                       "rounds": len(pairs)}, **details)


def skip_row(section: str, what: str, reason: str, target: str | None = None) -> Row:
    return Row(section, what, None, target, "skip", reason)


def format_table(rows: list[Row]) -> str:
    """Fixed-width text table: section, what, ratio, target, status, note."""
    head = ("section", "what", "ratio", "target", "status", "note")
    body = [(r.section, r.what, "-" if r.ratio is None else f"{r.ratio:.3g}", r.target or "",
             r.status, r.note) for r in rows]
    widths = [max(len(head[i]), *(len(line[i]) for line in body)) if body else len(head[i])
              for i in range(len(head))]
    widths[-1] = len(head[-1])                      # the note runs on, unpadded

    def fmt(cells):
        return "  ".join(c.ljust(w) if i != 2 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths))
                         ).rstrip()
    lines = [fmt(head), fmt(tuple("-" * w for w in widths))]
    lines += [fmt(line) for line in body]
    return "\n".join(lines)
