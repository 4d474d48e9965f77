"""The benchmark machinery: interleaved timing, ratios, targets, slope fits, and a complete table.

No timed asserts: the tests check the logic (with fake clocks and functions of known
cost ratios only through their bookkeeping) and that every section yields every row.
"""
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given, settings as hsettings, strategies as st

from trainers.bench import timing
from trainers.bench.timing import (Settings, Timing, fit_loglog, format_table, make_row, meets, paired_ratios,
                                   ratio, skip_row, time_interleaved)
from trainers.device import Runtime

ROOT = Path(__file__).resolve().parents[1]


def _settings(**kw):
    return Settings(Runtime.create("cpu", "float32"), **{"repeats": 3, "min_time": 0.0, **kw})


def test_interleaved_calls_and_rotation(monkeypatch):
    """Each candidate gets a cold call and `warmup` more, then is timed `repeats` times; the order
    rotates each round and runs backwards every other round."""
    calls = []
    fns = {name: (lambda name=name: calls.append(name)) for name in "abc"}
    out = time_interleaved(fns, _settings(warmup=2, repeats=3, max_number=1))
    assert calls[:9] == ["a"] * 3 + ["b"] * 3 + ["c"] * 3             # cold + warm-up, per candidate
    assert calls[9:] == ["a", "b", "c", "a", "c", "b", "c", "a", "b"]  # rotated, odd rounds reversed
    assert set(out) == {"a", "b", "c"} and all(len(t.times) == 3 for t in out.values())


def test_calls_per_sample_follow_min_time(monkeypatch):
    """With a fake clock where each call takes 1 ms (the cold first one 50 ms), min_time 10 ms
    gives 10 calls per sample and per-call times of 1 ms exactly."""
    now, calls = [0.0], [0]
    monkeypatch.setattr(timing.time, "perf_counter", lambda: now[0])

    def tick():
        calls[0] += 1
        now[0] += 0.05 if calls[0] == 1 else 1e-3
    out = time_interleaved({"f": tick}, _settings(min_time=0.01, repeats=4))
    assert out["f"].number == 10
    assert out["f"].times == pytest.approx([1e-3] * 4)


def test_ratio_is_median_of_paired_ratios():
    a = Timing("a", [2.0, 4.0, 30.0], 1)
    b = Timing("b", [1.0, 2.0, 3.0], 1)
    assert paired_ratios(a, b) == [2.0, 2.0, 10.0]
    assert ratio(a, b) == 2.0                           # one noisy round does not move the median
    with pytest.raises(ValueError):
        paired_ratios(a, Timing("c", [1.0], 1))


@hsettings(max_examples=30, deadline=None)
@given(p=st.floats(-3, 3), c=st.floats(0.01, 100), xs=st.lists(st.floats(1, 1e4), min_size=2, max_size=8,
                                                                  unique=True))
def test_fit_loglog_recovers_power(p, c, xs):
    if max(xs) / min(xs) < 1.5:
        return
    ys = [c * x ** p for x in xs]
    assert fit_loglog(xs, ys) == pytest.approx(p, abs=1e-6)


def test_targets_and_status():
    assert meets(1.05, "<= 1.10") and not meets(1.2, "<= 1.10")
    assert meets(0.5, ">= 0.5") and not meets(1.0, "> 1.0")
    with pytest.raises(ValueError):
        meets(1.0, "about 1")
    assert make_row("s", "w", 1.0, "<= 1.1").status == "pass"
    assert make_row("s", "w", 1.2, "<= 1.1").status == "miss"
    assert make_row("s", "w", 1.2).status == "info"
    assert skip_row("s", "w", "peft not installed").status == "skip"


def test_table_lists_every_row():
    rows = [make_row("layers", "LoRA / base", 1.04, "<= 1.10"), skip_row("quant", "vs bnb", "not installed")]
    text = format_table(rows)
    lines = text.splitlines()
    assert len(lines) == 4 and lines[0].split()[:5] == ["section", "what", "ratio", "target", "status"]
    assert "1.04" in lines[2] and "pass" in lines[2] and "skip" in lines[3] and "not installed" in lines[3]


def _run_bench(tmp_path, *args, timeout=900):
    out = tmp_path / "bench.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "trainers.bench", *args, "--json", str(out)], cwd=ROOT,
                          capture_output=True, text=True, env=env, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout, json.loads(out.read_text())


def _check_complete(result, sections):
    from trainers.bench.__main__ import SECTIONS
    got = {(r["section"], r["what"]) for r in result["rows"]}
    want = {(SECTIONS[s].SECTION, w) for s in sections for w in SECTIONS[s].ROWS}
    assert got == want
    for r in result["rows"]:
        assert r["status"] in timing.STATUSES
        if r["status"] == "skip":
            assert r["ratio"] is None and r["note"]          # a skipped row says why
        else:
            # a fitted exponent (time ~ size^p) is near 0 where time hardly depends on the size
            # (LoRA step ~ r^0.04), so noise can make it negative; ratios cannot be
            assert math.isfinite(r["ratio"]) and (r["ratio"] >= 0 or "^p" in r["what"])
        if r["target"] and r["status"] != "skip":
            assert r["status"] == ("pass" if meets(r["ratio"], r["target"]) else "miss")


def test_quick_subset_gives_complete_table(tmp_path):
    """A few seconds: the scaling section alone, one round, through the command line."""
    stdout, result = _run_bench(tmp_path, "--only", "scaling", "--quick", "--repeats", "1", timeout=300)
    _check_complete(result, ["scaling"])
    assert result["meta"]["quick"] and result["meta"]["sections"] == ["scaling"]
    for what in ("LoRA step time ~ d^p (r=8)", "NF4 dequant time ~ d^p (d x d)"):
        assert what in stdout


def test_unknown_section_is_refused(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "trainers.bench", "--only", "nope", "--json",
                           str(tmp_path / "x.json")], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode != 0 and "unknown section" in proc.stderr


@pytest.mark.slow
def test_quick_run_gives_complete_table(tmp_path):
    """The whole quick benchmark (about two minutes on two idle cores)."""
    from trainers.bench.__main__ import SECTIONS
    _, result = _run_bench(tmp_path, "--quick", timeout=1800)
    _check_complete(result, list(SECTIONS))
