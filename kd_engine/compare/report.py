"""The comparison's report: ``compare.json``, ``compare.md`` and ``compare.png`` in the spec's output folder.

Per row: the score's mean ± std over its evaluated seeds, and the paired bootstrap 95 % interval of the row minus
the baseline row (``stats.paired_interval``; the direction that is better comes from the evaluator). Cells that
did not finish are listed as missing, never silently left out of a mean.
"""
from __future__ import annotations

import json
import os
import sys

from ..io import atomic_file
from .run import cell_result
from .spec import Spec, row_names
from .stats import mean_std, paired_interval


def build_report(spec: Spec) -> dict:
    kind = spec.evaluator["kind"]
    results = {r: {} for r in row_names(spec)}
    missing = []
    for cell in spec.cells:
        res = cell_result(cell)
        if res is None:
            missing.append(cell.name)
        else:
            results[cell.row][cell.seed] = res
    rows = []
    for name in row_names(spec):
        got = results[name]
        entry = {"row": name, "method": next(r.get("method") for r in spec.rows if r["name"] == name) or "kd",
                 "seeds": sorted(got), "values": [got[s]["value"] for s in sorted(got)]}
        if got:
            entry["mean"], entry["std"] = mean_std(entry["values"])
            entry["seconds_per_cell"] = round(sum(got[s]["seconds"] for s in got) / len(got), 1)
        if name != spec.baseline and got and results[spec.baseline]:
            iv = paired_interval(got, results[spec.baseline], kind, spec.bootstrap)
            if iv is not None:
                entry["diff_vs_baseline"] = entry["mean"] - mean_std(
                    [results[spec.baseline][s]["value"] for s in sorted(results[spec.baseline])])[0]
                entry["interval_95"], entry["interval_how"] = [iv[0], iv[1]], iv[2]
        rows.append(entry)
    return {"spec": os.path.abspath(spec.path), "metric": kind, "higher_is_better": spec.evaluator["higher_is_better"],
            "baseline": spec.baseline, "seeds": spec.seeds, "rows": rows, "missing_cells": missing}


def write_report(spec: Spec) -> dict:
    rep = build_report(spec)
    out = spec.output_dir
    with atomic_file(os.path.join(out, "compare.json")) as fh:
        json.dump(rep, fh, indent=2)
    better = "higher" if rep["higher_is_better"] else "lower"
    lines = [f"# Comparison: {rep['metric']} ({better} is better), baseline {rep['baseline']}", "",
             f"Spec: `{spec.path}`; seeds {', '.join(map(str, spec.seeds))}.", "",
             f"| row | method | {rep['metric']} mean ± std | seeds | vs {rep['baseline']} (95 % interval) | "
             "s / cell |", "|---|---|---|---|---|---|"]
    for r in rep["rows"]:
        score = f"{r['mean']:.4f} ± {r['std']:.4f}" if "mean" in r else "missing"
        vs = "baseline" if r["row"] == rep["baseline"] else (
            f"{r['diff_vs_baseline']:+.4f} [{r['interval_95'][0]:+.4f}, {r['interval_95'][1]:+.4f}]"
            if "interval_95" in r else "n/a")
        lines.append(f"| {r['row']} | {r['method']} | {score} | {len(r['seeds'])} | {vs} | "
                     f"{r.get('seconds_per_cell', '')} |")
    hows = sorted({r["interval_how"] for r in rep["rows"] if "interval_how" in r})
    if hows:
        lines += ["", "Intervals: " + "; ".join(hows) + "."]
    if rep["missing_cells"]:
        lines += ["", f"Missing (not finished): {', '.join(rep['missing_cells'])}."]
    with atomic_file(os.path.join(out, "compare.md")) as fh:
        fh.write("\n".join(lines) + "\n")
    _plot(rep, os.path.join(out, "compare.png"))
    return rep


def _plot(rep: dict, path: str) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("note: matplotlib is not installed (pip install kd_engine[plots]): no compare.png", file=sys.stderr)
        return False
    rows = [r for r in rep["rows"] if "mean" in r]
    fig, ax = plt.subplots(figsize=(max(4, 1.2 * len(rows)), 3.2))
    ax.bar([r["row"] for r in rows], [r["mean"] for r in rows], yerr=[r["std"] for r in rows], capsize=4,
           color=["#888" if r["row"] == rep["baseline"] else "#3b7dd8" for r in rows])
    for i, r in enumerate(rows):
        ax.scatter([i] * len(r["values"]), r["values"], color="black", s=10, zorder=3)
    ax.set_ylabel(rep["metric"])
    ax.set_title(f"mean ± std over seeds; grey: baseline ({'higher' if rep['higher_is_better'] else 'lower'} "
                 "is better)", fontsize=9)
    fig.tight_layout()
    tmp = path + ".tmp.png"
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, path)
    return True
