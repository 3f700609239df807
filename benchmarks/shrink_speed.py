"""Accuracy and inference speed of shrunk classifiers vs their teacher (issue 5's SST-2 real run).

    python benchmarks/shrink_speed.py --eval_file /tmp/sst2demo/eval.tsv \\
        --model teacher=outputs/sst2demo/teacher/final --model 3-sft=outputs/sst2demo/l3_sft/final ...

Every ``--model NAME=FOLDER`` is a saved sequence classifier (the first one is the reference, "teacher").
Accuracy: on every row of ``--eval_file`` (tsv/csv with ``--text_column`` / ``--label_column``; labels are class
ids, as in GLUE SST-2). Speed: forward passes (no grad, eval mode) of ``--batches`` batches of ``--batch_size``
held-out sentences padded to exactly ``--max_length`` tokens, all models in one process with ``--threads``
torch threads; the models take turns inside each of ``--repeats`` rounds (so load from other processes on a
shared machine hits them alike) and the median round counts. Speedups are ratios of process CPU seconds (robust
on a shared machine) and, for reference, of wall seconds. Prints a markdown table; writes ``OUT.json`` and
``OUT.md`` (default ``benchmarks/results/shrink_sst2``).
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import statistics
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def read_rows(path: str, text_column: str, label_column: str):
    delim = "\t" if path.endswith(".tsv") else ","
    with open(path, newline="", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh, delimiter=delim, quoting=csv.QUOTE_NONE if delim == "\t" else csv.QUOTE_MINIMAL))
    return [r[text_column] for r in rows], [int(r[label_column]) for r in rows]


@torch.no_grad()
def accuracy(model, tok, texts, labels, max_length: int, batch_size: int = 64) -> float:
    correct = 0
    for i in range(0, len(texts), batch_size):
        enc = tok(texts[i:i + batch_size], padding=True, truncation=True, max_length=max_length, return_tensors="pt")
        pred = model(**enc).logits.argmax(-1)
        correct += int((pred == torch.tensor(labels[i:i + batch_size])).sum())
    return correct / len(texts)


@torch.no_grad()
def timed_pass(model, batches) -> tuple[float, float]:
    c0, w0 = time.process_time(), time.perf_counter()
    for enc in batches:
        model(**enc)
    return time.process_time() - c0, time.perf_counter() - w0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", action="append", required=True, help="NAME=FOLDER (first = reference)")
    ap.add_argument("--eval_file", required=True)
    ap.add_argument("--text_column", default="sentence")
    ap.add_argument("--label_column", default="label")
    ap.add_argument("--batch_size", type=int, default=32)
    ap.add_argument("--max_length", type=int, default=64)
    ap.add_argument("--batches", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results", "shrink_sst2"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    if not os.path.isfile(args.eval_file):
        print(f"skipped: {args.eval_file} does not exist")
        return 0
    texts, labels = read_rows(args.eval_file, args.text_column, args.label_column)
    names, models, toks = [], [], []
    for spec in args.model:
        name, _, path = spec.partition("=")
        if not path:
            ap.error(f"--model wants NAME=FOLDER; got {spec!r}")
        names.append(name)
        models.append(AutoModelForSequenceClassification.from_pretrained(path).eval())
        toks.append(AutoTokenizer.from_pretrained(path))
    n_speed = args.batches * args.batch_size
    if len(texts) < n_speed:
        ap.error(f"--eval_file has {len(texts)} rows, the speed test needs {n_speed}")
    batches = [toks[0](texts[i:i + args.batch_size], padding="max_length", truncation=True,
                       max_length=args.max_length, return_tensors="pt") for i in range(0, n_speed, args.batch_size)]

    results = []
    for name, model, tok in zip(names, models, toks):
        results.append({"model": name, "layers": model.config.num_hidden_layers,
                        "params": sum(p.numel() for p in model.parameters()),
                        "accuracy": round(accuracy(model, tok, texts, labels, args.max_length), 4)})
    for model in models:  # warm-up
        timed_pass(model, batches[:1])
    cpu = [[] for _ in models]
    wall = [[] for _ in models]
    for _ in range(args.repeats):
        for i, model in enumerate(models):
            c, w = timed_pass(model, batches)
            cpu[i].append(c)
            wall[i].append(w)
    ref_cpu, ref_wall = statistics.median(cpu[0]), statistics.median(wall[0])
    for r, c, w in zip(results, cpu, wall):
        r["cpu_s_per_batch"] = round(statistics.median(c) / args.batches, 5)
        r["wall_s_per_batch"] = round(statistics.median(w) / args.batches, 5)
        r["speedup_cpu"] = round(ref_cpu / statistics.median(c), 2)
        r["speedup_wall"] = round(ref_wall / statistics.median(w), 2)

    cmd = " ".join(["python", os.path.relpath(sys.argv[0], ROOT)] + sys.argv[1:])
    info = {"eval_file": args.eval_file, "n_eval": len(texts), "batch_size": args.batch_size,
            "max_length": args.max_length, "speed_batches": args.batches, "repeats": args.repeats,
            "threads": args.threads, "load_avg_1min": round(os.getloadavg()[0], 2), "cpus": os.cpu_count(),
            "command": cmd, "results": results}
    lines = ["# Shrunk SST-2 classifiers vs the teacher", "", f"`{cmd}`", "",
             f"Accuracy on {len(texts)} held-out sentences; speed = forward passes of batch {args.batch_size} x "
             f"{args.max_length} tokens, {args.threads} thread(s), median of {args.repeats} rounds of "
             f"{args.batches} batches; speedup = teacher / model (process CPU seconds; wall clock in brackets). "
             f"1-minute load average at the end: {info['load_avg_1min']} on {info['cpus']} cpus.", "",
             "| model | layers | parameters | accuracy | ms / batch (CPU) | speedup |", "|---|---|---|---|---|---|"]
    for r in results:
        lines.append(f"| {r['model']} | {r['layers']} | {r['params'] / 1e6:.1f} M | {100 * r['accuracy']:.1f}% | "
                     f"{1000 * r['cpu_s_per_batch']:.0f} | {r['speedup_cpu']:.2f}x ({r['speedup_wall']:.2f}x) |")
    table = "\n".join(lines) + "\n"
    print(table)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out + ".json", "w") as fh:
        json.dump(info, fh, indent=1)
    with open(args.out + ".md", "w") as fh:
        fh.write(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
