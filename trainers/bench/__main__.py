"""python -m trainers.bench [--only layers,quant] [--quick] [--json PATH] [--device cpu] [--repeats N]

Runs the benchmark sections, prints one table (section, what, ratio, target,
pass/miss) and writes it with the raw timings to a JSON file. Every figure is a
ratio of things timed side by side in this process (see trainers/bench/timing.py).
"""
from __future__ import annotations

import argparse
import datetime
import json
import platform
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch

from trainers.bench import alloc, inference, layers, load, multi_adapter, quant, scaling, train_step, vs_hf
from trainers.bench.timing import Row, Settings, format_table
from trainers.device import Runtime
from trainers.results import atomic_write_text, check_writable

# Section name -> its module (each has SECTION, ROWS and run(settings) -> list[Row]), in run order.
SECTIONS = {"layers": layers, "quant": quant, "train_step": train_step, "vs_hf": vs_hf, "inference": inference,
            "alloc": alloc, "scaling": scaling, "multi_adapter": multi_adapter,
            "load": load}
DEFAULT_JSON = Path("bench_results") / "bench.json"


def parse_only(text: str | None) -> list[str]:
    if not text:
        return list(SECTIONS)
    names = [s.strip() for s in text.split(",") if s.strip()]
    unknown = [n for n in names if n not in SECTIONS]
    if unknown or not names:
        raise ValueError(f"--only: unknown section(s) {unknown or text!r}; choose from {', '.join(SECTIONS)}")
    return names


def library_versions() -> dict:
    versions = {"torch": torch.__version__, "python": platform.python_version()}
    for name in ("transformers", "peft", "bitsandbytes"):
        try:
            versions[name] = __import__(name).__version__
        except Exception:
            versions[name] = None
    return versions


def run(names: list[str], settings: Settings, log=print) -> list[Row]:
    rows: list[Row] = []
    for name in names:
        start = time.perf_counter()
        module = SECTIONS[name]
        got = module.run(settings)
        missing = [w for w in module.ROWS if w not in {r.what for r in got}]
        if missing:
            raise RuntimeError(f"bench section {name}: rows missing from the table: {missing}")
        rows += got
        log(f"[bench] {name}: {len(got)} rows in {time.perf_counter() - start:.1f} s", file=sys.stderr)
    return rows


def main(argv=None) -> int:
    """Every option is checked before the (minutes of) timing starts; a bad one, or a JSON path
    that cannot be written, is one `error:` line and exit 2."""
    try:
        return _main(argv)
    except (ValueError, OSError) as err:
        print(f"error: {' '.join(str(err).split())}", file=sys.stderr)
        return 2


def _main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m trainers.bench", description=__doc__.split("\n\n")[1])
    parser.add_argument("--only", default=None, help=f"comma-separated sections: {', '.join(SECTIONS)}")
    parser.add_argument("--quick", action="store_true", help="smaller sizes and fewer repeats (under ~2 min)")
    parser.add_argument("--json", default=str(DEFAULT_JSON), help=f"where to write results ({DEFAULT_JSON})")
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1, mps (default: the best present)")
    parser.add_argument("--repeats", type=int, default=None, help="timed rounds per comparison (5; quick 3)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    args = parser.parse_args(argv)
    names = parse_only(args.only)
    for flag, value in (("--repeats", args.repeats), ("--threads", args.threads)):
        if value is not None and value < 1:
            raise ValueError(f"{flag}: expected an integer >= 1, got {value}")
    path = Path(args.json)
    if path.is_dir():
        raise ValueError(f"--json: {str(path)!r} is a folder; give a file name")
    check_writable(path.parent)                   # fail now, not after the timings
    if args.threads:
        torch.set_num_threads(args.threads)
    repeats = args.repeats or (3 if args.quick else 5)
    settings = Settings(Runtime.create(args.device, "float32"), quick=args.quick, repeats=repeats,
                        min_time=0.02 if args.quick else 0.05)
    started = time.perf_counter()
    rows = run(names, settings, log=print)
    elapsed = time.perf_counter() - started
    print(format_table(rows))
    misses = [r for r in rows if r.status == "miss"]
    print(f"\n{len(rows)} rows, {sum(r.status == 'pass' for r in rows)} pass, {len(misses)} miss, "
          f"{sum(r.status == 'skip' for r in rows)} skipped; {elapsed:.0f} s on {settings.device} "
          f"({torch.get_num_threads()} threads)")
    meta = {"date": datetime.datetime.now().isoformat(timespec="seconds"), "device": str(settings.device),
            "threads": torch.get_num_threads(), "quick": args.quick, "repeats": repeats,
            "sections": names, "seconds": round(elapsed, 1), "versions": library_versions()}
    atomic_write_text(path, json.dumps({"meta": meta, "rows": [asdict(r) for r in rows]}, indent=2, default=str))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
