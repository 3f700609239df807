"""Packing: real tokens per second of ``--packing true`` vs padded batches, same model, same data.

SmolLM2-135M teacher (``offline:smollm2-135m``) -> 10-layer student, ``--method kd`` (fused loss), the demo corpus
(news paragraphs of varied length, ``python -m kd_engine.demo_data``), ``--batch`` rows of up to ``--max_length``
tokens a step. Three variants, each a fresh process through the real engine, run ``--repeats`` times in alternating
order so that machine load falls on all of them alike:

- ``padded_grouped``: padded batches, examples of similar length batched together (the default,
  ``--group_by_length true``);
- ``padded_random``: padded batches in random order (``--group_by_length false``; what packing is usually compared
  with);
- ``packed``: ``--packing true``: whole examples concatenated into rows of ``--max_length``.

The engine logs ``tokens_per_s`` from the real tokens of each window (attention mask, or the packed rows' token mask);
the figure per variant is the median over the logged windows after the first of every repeat.

    nice -n 5 python benchmarks/packing.py                  # 8 x 128, 12 steps, 2 repeats (~10 min)
    python benchmarks/packing.py --steps 4 --repeats 1      # quick

Last line: JSON with ``packing_tokens_per_s_gain`` (packed / padded_grouped; target >= 1.3),
``packing_gain_vs_random`` (packed / padded_random), ``real_token_share`` per variant; also
``benchmarks/results/NAME.{json,md}`` (``--name``, default packing).

The demo corpus's "paragraphs" are mostly whole articles (median 584 SmolLM2 tokens, 10 % under 188, 10 % over
1,390): at ``--max_length 128`` 98 % of every padded row is already real text, so packing can only gain where the
rows are long enough for the lengths to vary (``--max_length 1024``: 0.59 of a row's tokens are real on average in
random order, 0.34 at 2048).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile

from _common import RESULTS, ROOT, single_rank_env

TEACHER = "offline:smollm2-135m"
VARIANTS = {"padded_grouped": ["--group_by_length", "true"], "padded_random": ["--group_by_length", "false"],
            "packed": ["--packing", "true"]}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=8, help="rows per step")
    ap.add_argument("--max_length", type=int, default=128, help="tokens per row")
    ap.add_argument("--steps", type=int, default=12, help="steps per run")
    ap.add_argument("--repeats", type=int, default=2, help="runs per variant, alternating")
    ap.add_argument("--examples", type=int, default=4000, help="demo paragraphs read")
    ap.add_argument("--name", default="packing", help="results file name under benchmarks/results/")
    args = ap.parse_args()
    sys.path.insert(0, ROOT)
    from kd_engine.demo_data import news_corpus

    train, _ = news_corpus()
    rates: dict[str, list[float]] = {v: [] for v in VARIANTS}
    step_ms: dict[str, list[float]] = {v: [] for v in VARIANTS}
    with tempfile.TemporaryDirectory() as tmp:
        for rep in range(args.repeats):
            order = list(VARIANTS) if rep % 2 == 0 else list(reversed(VARIANTS))
            for name in order:
                out = os.path.join(tmp, f"{name}-{rep}")
                env = single_rank_env(29700 + rep * 10 + list(VARIANTS).index(name), DS_ACCELERATOR="cpu")
                cmd = [sys.executable, "launch/train.py", "--method", "kd", "--teacher", TEACHER, "--student.layers",
                       "10", "--train_file", train, "--max_train_samples", str(args.examples), "--max_length",
                       str(args.max_length), "--per_device_train_batch_size", str(args.batch), "--max_steps",
                       str(args.steps), "--temperature", "1", "--alpha", "0.5", "--learning_rate", "1e-4",
                       "--logging_steps", "1", "--output_dir", out, "--export", "false", "--disable_tqdm", "true",
                       "--report_to", "none", *VARIANTS[name]]
                p = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=ROOT)
                if p.returncode != 0:
                    print(p.stdout[-2000:], p.stderr[-3000:], file=sys.stderr)
                    return 1
                rows = [json.loads(x) for x in open(os.path.join(out, "train_log.jsonl"))]
                train_rows = [r for r in rows if r["split"] == "train"][1:]
                rates[name] += [r["tokens_per_s"] for r in train_rows]
                step_ms[name] += [r["teacher_ms"] + r["student_ms"] for r in train_rows]
                print(f"repeat {rep} {name}: median {statistics.median(r['tokens_per_s'] for r in train_rows):.0f} "
                      f"real tokens/s", flush=True)
    med = {k: statistics.median(v) for k, v in rates.items()}
    ms = {k: statistics.median(v) for k, v in step_ms.items()}
    # real tokens a step = tokens/s x step time; their share of the rows' capacity
    share = {k: round(med[k] * ms[k] / 1000 / (args.batch * args.max_length), 3) for k in med}
    summary = {"benchmark": "packing", "batch": args.batch, "max_length": args.max_length, "steps": args.steps,
               "repeats": args.repeats, "tokens_per_s": {k: round(v, 1) for k, v in med.items()},
               "step_ms": {k: round(v, 1) for k, v in ms.items()}, "real_token_share": share,
               "packing_tokens_per_s_gain": round(med["packed"] / med["padded_grouped"], 3),
               "packing_gain_vs_random": round(med["packed"] / med["padded_random"], 3),
               "target": {"packing_tokens_per_s_gain": 1.3},
               "command": "python benchmarks/packing.py " + " ".join(sys.argv[1:])}
    os.makedirs(RESULTS, exist_ok=True)
    with open(os.path.join(RESULTS, f"{args.name}.json"), "w") as f:
        json.dump(summary, f, indent=2)
    with open(os.path.join(RESULTS, f"{args.name}.md"), "w") as f:
        f.write(f"# Packing vs padding ({args.batch} rows x {args.max_length} tokens, SmolLM2-135M -> 10-layer "
                f"student, kd, CPU, {args.repeats} alternating repeats)\n\n| variant | real tokens/s (median) | step "
                "(ms) | real "
                "share of row tokens |\n|---|---|---|---|\n")
        for k in med:
            f.write(f"| {k} | {med[k]:.0f} | {ms[k]:.0f} | {share[k]:.2f} |\n")
        f.write(f"\npacking_tokens_per_s_gain {summary['packing_tokens_per_s_gain']} (packed / padded_grouped, target "
                f">= 1.3); vs padded_random {summary['packing_gain_vs_random']}\n")
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
