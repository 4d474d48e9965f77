"""The planted-rank benchmark's scores and report: Spearman's rho, the table, planted.json.

`score` adds to each method's row how well its final ranks order the layers as the planted
ranks do (Spearman's rank correlation, for the adaptive methods), its loss as a fraction of
the un-tuned base's and its excess over the oracle's; `format_table` prints the rows and,
for the adaptive methods, the rank each layer ended with beside its planted rank.
"""
from __future__ import annotations

import math
import sys
from pathlib import Path

from trainers.planted_problem import ADAPTIVE, ORACLE


# --- scoring ----------------------------------------------------------------------------------
def _average_ranks(values: list[float]) -> list[float]:
    """1-based ranks with ties given their average rank (what Spearman's rho needs)."""
    order = sorted(range(len(values)), key=lambda i: values[i])
    ranks = [0.0] * len(values)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
            j += 1
        for t in range(i, j + 1):
            ranks[order[t]] = (i + j) / 2 + 1
        i = j + 1
    return ranks


def spearman(a: list[float], b: list[float]) -> float:
    """Spearman's rank correlation: Pearson's r of the tie-averaged ranks; NaN if either is constant."""
    if len(a) != len(b) or len(a) < 2:
        raise ValueError(f"spearman: need two equally long lists of >= 2 values, got {len(a)} and {len(b)}")
    ra, rb = _average_ranks(list(a)), _average_ranks(list(b))
    ma, mb = sum(ra) / len(ra), sum(rb) / len(rb)
    cov = sum((x - ma) * (y - mb) for x, y in zip(ra, rb))
    va, vb = sum((x - ma) ** 2 for x in ra), sum((y - mb) ** 2 for y in rb)
    if va == 0 or vb == 0:
        return float("nan")
    return cov / math.sqrt(va * vb)



def score(report: dict) -> None:
    """Add to each row: Spearman's rho of its final ranks with the planted ranks (adaptive methods),
    its loss as a fraction of the base model's, and its excess over the oracle's loss."""
    planted = report["planted_ranks"]
    names = list(planted)
    oracle = next((r["eval_mse"] for r in report["rows"] if r["method"] == ORACLE), None)
    for row in report["rows"]:
        row["spearman"] = (spearman([row["ranks"][n] for n in names], [planted[n] for n in names])
                           if row["method"] in ADAPTIVE else float("nan"))
        row["of_base"] = row["eval_mse"] / report["base_mse"]
        row["over_oracle"] = row["eval_mse"] - oracle if oracle is not None else float("nan")


def write_report(report: dict, out: Path) -> None:
    """planted.json, planted_table.txt, the run summary and (with matplotlib) the plots, into `out`."""
    from trainers import results
    results.atomic_write_json(out / "planted.json", report)
    results.atomic_write_text(out / "planted_table.txt", format_table(report) + "\n")
    results.write_summary(out)
    try:
        from trainers.plots import redraw
        report["plots"] = [str(p) for p in redraw(out)]
    except ImportError as err:                       # matplotlib is an optional extra
        report["plots"] = []
        print(f"(no plots: {err})", file=sys.stderr)


def _fmt(value: float, spec: str) -> str:
    try:
        value = float(value)                         # planted.json holds NaN as the string "nan"
    except (TypeError, ValueError):
        return "-"
    return "-" if math.isnan(value) else format(value, spec)


def format_table(report: dict) -> str:
    lines = [f"planted-rank benchmark: base model MSE {report['base_mse']:.4g} (before fine-tuning)",
             f"{'method':<9} {'eval MSE':>10} {'% of base':>9} {'- oracle':>10} {'trainable':>10} "
             f"{'adapter B':>10} {'ranks':>6} {'time s':>7} {'rho':>6}"]
    for r in report["rows"]:
        lines.append(f"{r['method']:<9} {r['eval_mse']:>10.3e} {100 * r['of_base']:>9.2f} "
                     f"{_fmt(r['over_oracle'], '.2e'):>10} {r['trainable_params']:>10,} {r['adapter_bytes']:>10,} "
                     f"{r['rank_budget']:>6} {r['time_s']:>7.1f} {_fmt(r['spearman'], '.2f'):>6}")
    planted = report["planted_ranks"]
    adaptive = [r for r in report["rows"] if r["method"] in ADAPTIVE]
    if adaptive:
        lines.append("")
        lines.append(f"{'layer':<14} {'planted':>7} " + " ".join(f"{r['method']:>8}" for r in adaptive))
        for name, k in planted.items():
            lines.append(f"{name:<14} {k:>7} " + " ".join(f"{r['ranks'][name]:>8}" for r in adaptive))
    budget = report["config"]["budget_rank"] * len(planted)
    for r in adaptive:
        if len(set(r["ranks"].values())) == 1:
            lines.append(f"note: {r['method']} ended with rank {next(iter(r['ranks'].values()))} in every layer, "
                         f"so it ranks no layer above another (rho undefined)")
        if r["rank_budget"] < budget:
            lines.append(f"note: {r['method']} ended using {r['rank_budget']} of the {budget} rank units "
                         f"of the budget")
    lines.append("")
    lines.append("% of base: eval MSE as a percentage of the un-tuned base model's. - oracle: eval MSE minus "
                 "the oracle's (LoRA given the planted ranks).\nranks: total final rank over the layers (the "
                 "budget is uniform r=8: 8 per layer). rho: Spearman rank correlation of the final ranks with "
                 "the planted ranks (1 = same order).")
    return "\n".join(lines)
