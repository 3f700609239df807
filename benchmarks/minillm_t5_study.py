"""Report of ``scripts/minillm_t5_study.sh`` (issue 25 part 4): minillm variants vs kd on the on-policy T5 task.

Per model: mean ± sd over the seeds of the held-out metrics of ``benchmarks/onpolicy_t5.py eval`` (precision,
coverage, reverse KL, teacher log p), and for each minillm variant the paired difference from kd of the same seed
(same student_init) with a 95 % t interval over the seeds (t quantile for n - 1 degrees of freedom).

    python benchmarks/minillm_t5_study.py OUT/seed*/study_eval.json --out benchmarks/results/quality_minillm_t5
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics

# two-sided 95 % t quantiles by degrees of freedom (1..10)
T95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228}
METRICS = ("precision", "coverage", "rev_kl", "teacher_logp")
VARIANTS = {"kd": "kd alpha 0.5, T 1, lr {lr}, linear decay",
            "minillm": "demo settings: lr {lr}, linear decay, no PT term",
            "minillm_pt": "+ PT term (task text, prefix LM, lm_coef 1, kd_ratio 0.5)",
            "minillm_lr": "no PT term; constant lr {lr_paper} after 100 warmup steps, AdamW betas (0.9, 0.95), "
                          "weight decay 1e-6",
            "minillm_paper": "+ PT term, constant lr {lr_paper} after 100 warmup steps, AdamW betas (0.9, 0.95), "
                             "weight decay 1e-6"}


def paired(a: list[float], b: list[float]) -> tuple[float, float, float]:
    d = [x - y for x, y in zip(a, b)]
    m = statistics.mean(d)
    if len(d) < 2:
        return m, float("nan"), float("nan")
    h = T95.get(len(d) - 1, 1.96) * statistics.stdev(d) / math.sqrt(len(d))
    return m, m - h, m + h


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("runs", nargs="+", help="study_eval.json of each seed")
    ap.add_argument("--out", required=True, help="report path without extension")
    ap.add_argument("--lr", default="1e-3")
    ap.add_argument("--lr_paper", default="1e-4")
    ap.add_argument("--steps", default="1000")
    a = ap.parse_args()
    runs = [json.load(open(p)) for p in a.runs]
    seeds = [r["seed"] for r in runs]
    names = [n for n in runs[0]["metrics"]]
    table = {}
    for n in names:
        vals = {k: [r["metrics"][n][k] for r in runs] for k in METRICS}
        secs = []
        for p in a.runs:
            f = os.path.join(os.path.dirname(p), f"{n}.seconds")
            if os.path.isfile(f):
                secs.append(float(open(f).read()))
        table[n] = {"values": vals, "mean": {k: statistics.mean(v) for k, v in vals.items()},
                    "sd": {k: statistics.stdev(v) if len(v) > 1 else 0.0 for k, v in vals.items()},
                    "train_seconds": statistics.mean(secs) if secs else None}
        if n.startswith("minillm") and "kd" in table:
            table[n]["vs_kd"] = {k: paired(vals[k], table["kd"]["values"][k]) for k in METRICS}
    out = {"seeds": seeds, "steps": a.steps, "models": table,
           "settings": {k: v.format(lr=a.lr, lr_paper=a.lr_paper) for k, v in VARIANTS.items()}}
    with open(a.out + ".json", "w") as f:
        json.dump(out, f, indent=1)
    lines = ["# MiniLLM vs KD on the on-policy T5 task (`bash scripts/minillm_t5_study.sh`)", "",
             f"Seeds {', '.join(map(str, seeds))}; every run {a.steps} steps x 32 from the seed's student_init; "
             f"{runs[0]['inputs']} held-out inputs x {runs[0]['samples_per_input']} samples. Paired intervals: "
             "difference from kd of the same seed, 95 % t interval over the seeds.", ""]
    for k, v in out["settings"].items():
        lines.append(f"- `{k}`: {v}")
    lines += ["", "| model | precision | coverage | reverse KL (nats/seq) | teacher log p | precision vs kd "
              "[95 %] | rev KL vs kd [95 %] | s / run |", "|---|---|---|---|---|---|---|---|"]
    for n, t in table.items():
        m, s = t["mean"], t["sd"]
        vs = t.get("vs_kd")
        p = f"{vs['precision'][0]:+.3f} [{vs['precision'][1]:+.3f}, {vs['precision'][2]:+.3f}]" if vs else ""
        r = f"{vs['rev_kl'][0]:+.3f} [{vs['rev_kl'][1]:+.3f}, {vs['rev_kl'][2]:+.3f}]" if vs else ""
        secs = f"{t['train_seconds']:.0f}" if t["train_seconds"] is not None else ""
        lines.append(f"| {n} | {m['precision']:.3f} ± {s['precision']:.3f} | "
                     f"{m['coverage']:.3f} ± {s['coverage']:.3f} | {m['rev_kl']:.3f} ± {s['rev_kl']:.3f} | "
                     f"{m['teacher_logp']:.2f} ± {s['teacher_logp']:.2f} | {p} | {r} | {secs} |")
    with open(a.out + ".md", "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))
    print(json.dumps({n: round(t["mean"]["precision"], 4) for n, t in table.items()}))


if __name__ == "__main__":
    main()
