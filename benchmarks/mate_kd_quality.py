"""MATE-KD vs KD vs SFT, isolated (issue 25 part 3): same teacher, student, data, steps, temperature and total
distillation weight; the only difference between ``kd`` and ``mate_kd`` is the adversarial term. Driven through
``python -m kd_engine.compare`` (the tool users get), 3 seeds, paired bootstrap intervals against ``sft``.

Tasks (the teacher and every student see only the train rows; nothing is tuned on anything but the dev rows):

- ``sst2``: dev = the last 2,000 data rows of ``../shared/data/sst2/train.tsv``; the teacher learns the first 20,000
  rows, the students (and their distillation) the first 4,000 of those: a teacher trained on more labels than the
  student has, the setting KD is for.
- ``mnli``: ``../shared/data/mnli/dev_matched.jsonl`` (3 classes; MNLI train is not in ../shared): dev = the 2,000
  rows with ``idx >= 7815``, never trained on; teacher and students train on the other 7,815 rows.

Teacher: all-MiniLM-L6-v2 + a fresh head, ``--method sft`` on its train rows (trained once, seed 0; SST-2 must reach
>= 85 % dev accuracy). Students: 3 of its 6 layers (copies of layers 0, 2, 5) under its head, batch 32, lr 1e-4,
``--steps`` student optimizer steps each. Rows:

- ``sft``: labels only;
- ``kd``: ``--method kd --alpha 2/3``: 1/3 CE + 2/3 T^2 KL(teacher || student) on the original text;
- ``mate_kd``: 1/3 CE + 1/3 T^2 KL on generator-perturbed text + 1/3 T^2 KL on the original (distillation weight 2/3
  as ``kd``), cycles of 10 generator : 100 student steps (global steps = student steps + generator steps; each
  model's LR schedule counts only its own steps);
- ``mate_kd_no_adv``: the same mate_kd run with ``--w_adv 0 --w_kd 2/3``: the same code, batches, generator
  schedule and masks, only the adversarial term removed (the tightest isolation of it).

Generator: the teacher's first 2 layers + a tied masked-LM head, 60 masked-LM warm-up steps on WikiText-2 valid at
lr 3e-4, then adversarial at lr 5e-5 (no MLM weights exist offline).

    nice -n 5 python benchmarks/mate_kd_quality.py --task sst2            # 4 rows x 3 seeds
    python benchmarks/mate_kd_quality.py --task mnli --seeds 0 --steps 400

Writes ``benchmarks/results/quality_mate_kd[_mnli].{json,md}``; last line: JSON of each row's dev accuracy.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

from _common import RESULTS, ROOT

SHARED = os.path.join(os.path.dirname(ROOT), "shared", "data")
SST2 = os.path.join(SHARED, "sst2", "train.tsv")
MNLI = os.path.join(SHARED, "mnli", "dev_matched.jsonl")
CORPUS = os.path.join(SHARED, "wikitext-2-raw", "wiki.valid.raw")
ROWS = ("sft", "kd", "mate_kd", "mate_kd_no_adv")
TASKS = {"sst2": {"source": SST2, "labels": 2, "columns": {"text_column": "sentence", "label_column": "label"},
                  "max_length": 64, "teacher_epochs": 1, "min_teacher": 0.85},
         "mnli": {"source": MNLI, "labels": 3, "max_length": 128, "teacher_epochs": 3, "min_teacher": 0.0,
                  "columns": {"text_column": "premise", "text_pair_column": "hypothesis", "label_column": "label"}}}


def _split(task: str, work: str) -> tuple[str, str, str, int]:
    """Write the teacher's train, the students' train and the dev file of ``task`` under ``work``; (paths..., dev
    rows)."""
    if task == "sst2":
        with open(SST2, encoding="utf-8") as f:
            lines = f.read().splitlines()
        head, rows = lines[0], [x for x in lines[1:] if x.strip()]
        parts = {"teacher_train": rows[:20000], "train": rows[:4000], "dev": rows[-2000:]}
        ext, render = "tsv", (lambda rs: head + "\n" + "".join(r + "\n" for r in rs))
    else:
        with open(MNLI, encoding="utf-8") as f:
            recs = [json.loads(x) for x in f if x.strip()]
        keep = ("premise", "hypothesis", "label")
        recs = [{k: r[k] for k in keep} | {"idx": r["idx"]} for r in recs]
        train = [r for r in recs if r["idx"] < 7815]
        parts = {"teacher_train": train, "train": train, "dev": [r for r in recs if r["idx"] >= 7815]}
        ext, render = "jsonl", (lambda rs: "".join(json.dumps({k: r[k] for k in keep}) + "\n" for r in rs))
    paths = {}
    for name, rs in parts.items():
        paths[name] = os.path.join(work, f"{name}.{ext}")
        with open(paths[name], "w", encoding="utf-8") as f:
            f.write(render(rs))
    return paths["teacher_train"], paths["train"], paths["dev"], len(parts["dev"])


def _common(task: str, train: str, dev: str) -> dict:
    t = TASKS[task]
    return {"train_file": train, "eval_file": dev, **t["columns"], "max_length": t["max_length"],
            "per_device_train_batch_size": 32, "learning_rate": 1e-4, "report_to": "none", "disable_tqdm": True}


def _teacher(task: str, work: str, train: str, dev: str) -> tuple[str, float, float]:
    """Fine-tune the teacher once (skipped when its export exists); (path, dev accuracy, seconds)."""
    out = os.path.join(work, "teacher")
    final = os.path.join(out, "final")
    t0 = time.time()
    if not os.path.isfile(os.path.join(final, "config.json")):
        sys.path.insert(0, ROOT)
        from kd_engine.compare.spec import _argv  # the compare tool's options -> CLI arguments

        t = TASKS[task]
        opts = {**_common(task, train, dev), "method": "sft", "student": "offline:all-minilm-l6-v2",
                "num_labels": t["labels"], "num_train_epochs": t["teacher_epochs"], "warmup_steps": 30,
                "logging_steps": 50, "eval_steps": 100, "seed": 0, "output_dir": out, "overwrite_output_dir": True}
        with open(os.path.join(work, "teacher.log"), "w") as log:
            r = subprocess.run([sys.executable, "launch/train.py", *_argv(opts)], cwd=ROOT, stdout=log,
                               stderr=subprocess.STDOUT, env=_env())
        if r.returncode:
            sys.exit(f"error: teacher training failed (exit {r.returncode}), see {work}/teacher.log")
    return final, _last_eval(out)["accuracy"], round(time.time() - t0, 1)


def _env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2"), "DS_ACCELERATOR": "cpu",
            "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}


def _spec(task: str, work: str, rows: list[str], seeds: list[int], steps: int, temperature: float,
          teacher: str, train: str, dev: str) -> str:
    gen_steps = 10 * ((steps + 99) // 100)  # the 10 generator steps that open every 100-student-step cycle
    mate = {"generator": {"layers": 2}, "generator_warmup_steps": 60, "generator_warmup_lr": 3e-4,
            "generator_corpus": CORPUS, "generator_lr": 5e-5, "temperature": temperature,
            "max_steps": steps + gen_steps}
    third = round(1 / 3, 6)
    options = {"sft": {}, "kd": {"alpha": round(2 / 3, 6), "temperature": temperature},
               "mate_kd": {**mate, "w_ce": third, "w_adv": third, "w_kd": third},
               "mate_kd_no_adv": {**mate, "w_ce": third, "w_adv": 0.0, "w_kd": round(2 / 3, 6)}}
    cols = TASKS[task]["columns"]
    spec = {"output_dir": os.path.join(work, "compare"),
            "base": {**_common(task, train, dev), "teacher": teacher, "student": {"layers": 3}, "max_steps": steps,
                     "warmup_steps": steps // 10, "logging_steps": 50, "eval_steps": steps},
            "rows": [{"name": r, "method": "mate_kd" if r.startswith("mate_kd") else r, "options": options[r]}
                     for r in rows],
            "seeds": seeds, "baseline": rows[0],
            "evaluator": {"kind": "accuracy", "file": dev, **cols, "max_length": TASKS[task]["max_length"]}}
    path = os.path.join(work, "compare.yaml")
    with open(path, "w", encoding="utf-8") as f:
        json.dump(spec, f, indent=1)  # JSON is YAML
    return path


PAIRS = (("mate_kd", "kd"), ("mate_kd", "mate_kd_no_adv"), ("mate_kd_no_adv", "kd"))


def _pairs(cells: str, rows: list[str], seeds: list[int]) -> list[dict]:
    """The paired bootstrap interval (the compare tool's own) of the comparisons that isolate the adversarial term."""
    sys.path.insert(0, ROOT)
    from kd_engine.compare.stats import paired_interval

    def evals(row):
        out = {}
        for s in seeds:
            path = os.path.join(cells, f"{row}-seed{s}", "compare_eval.json")
            if os.path.isfile(path):
                out[s] = json.load(open(path))
        return out

    res = []
    for a, b in PAIRS:
        if a in rows and b in rows:
            ea, eb = evals(a), evals(b)
            iv = paired_interval(ea, eb, "accuracy")
            common = sorted(set(ea) & set(eb))
            if iv and common:
                diff = sum(ea[s]["value"] - eb[s]["value"] for s in common) / len(common)
                res.append({"row": a, "minus": b, "diff": diff, "interval_95": iv[:2], "how": iv[2]})
    return res


def _last_eval(cell: str) -> dict:
    log = os.path.join(cell, "train_log.jsonl")
    evals = [json.loads(x) for x in open(log)] if os.path.isfile(log) else []
    evals = [e for e in evals if e.get("split") == "eval"]
    return evals[-1] if evals else {}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--task", choices=sorted(TASKS), default="sst2", help="sst2 (2 classes) or mnli (3 classes)")
    ap.add_argument("--work", default=None, help="work folder (default runs/mate_kd_quality_<task>)")
    ap.add_argument("--rows", default=",".join(ROWS), help=f"rows, baseline first (of {', '.join(ROWS)})")
    ap.add_argument("--seeds", default="0,1,2", help="student seeds (the teacher and the split are the same for all)")
    ap.add_argument("--steps", type=int, default=600, help="student optimizer steps of every row")
    ap.add_argument("--temperature", type=float, default=1.0, help="T of every distillation term (kd and mate_kd)")
    ap.add_argument("--teacher_only", action="store_true", help="fine-tune (or find) the teacher, print it, stop")
    a = ap.parse_args()
    t = TASKS[a.task]
    for path in (t["source"], CORPUS):
        if not os.path.isfile(path):
            sys.exit(f"error: {path} not found (../shared data): nothing to measure")
    rows = [r for r in a.rows.split(",") if r]
    if not rows or any(r not in ROWS for r in rows) or len(set(rows)) != len(rows):
        sys.exit(f"error: --rows must name distinct rows of {', '.join(ROWS)}; got {a.rows}")
    if a.steps < 1:
        sys.exit(f"error: --steps must be >= 1; got {a.steps}")
    seeds = [int(s) for s in a.seeds.split(",")]
    work = a.work or os.path.join(ROOT, "runs", f"mate_kd_quality_{a.task}")
    os.makedirs(work, exist_ok=True)
    teacher_train, train, dev, n_dev = _split(a.task, work)
    teacher, teacher_acc, teacher_s = _teacher(a.task, work, teacher_train, dev)
    if teacher_acc < t["min_teacher"]:
        sys.exit(f"error: the teacher reached {teacher_acc:.4f} dev accuracy, below the {t['min_teacher']} this "
                 "comparison asks for; train it longer")
    if a.teacher_only:
        print(json.dumps({"teacher": teacher, "dev_accuracy": teacher_acc, "seconds": teacher_s}))
        return
    spec = _spec(a.task, work, rows, seeds, a.steps, a.temperature, teacher, train, dev)
    t0 = time.time()
    r = subprocess.run([sys.executable, "-m", "kd_engine.compare", spec], cwd=ROOT, env=_env())
    rep = json.load(open(os.path.join(work, "compare", "compare.json")))
    result = {"task": a.task, "dev_rows": n_dev, "train_rows": sum(1 for _ in open(train)) - (a.task == "sst2"),
              "teacher_train_rows": sum(1 for _ in open(teacher_train)) - (a.task == "sst2"),
              "teacher_dev_accuracy": teacher_acc, "teacher_seconds": teacher_s, "student_steps": a.steps,
              "temperature": a.temperature, "seeds": seeds, "wall_seconds": round(time.time() - t0, 1),
              "compare_exit": r.returncode, "rows": []}
    for entry in rep["rows"]:
        ev = [_last_eval(os.path.join(work, "compare", "cells", f"{entry['row']}-seed{s}")) for s in seeds]
        result["rows"].append({**{k: entry.get(k) for k in ("row", "mean", "std", "values", "diff_vs_baseline",
                                                           "interval_95", "seconds_per_cell")},
                               "teacher_agreement": [e.get("teacher_agreement") for e in ev]})
    done = [x for x in result["rows"] if x["mean"] is not None]
    result["cell_seconds_total"] = round(sum(x["seconds_per_cell"] * len(x["values"]) for x in done), 1)
    result["pairs"] = _pairs(os.path.join(work, "compare", "cells"), rows, seeds)
    name = "quality_mate_kd" + ("" if a.task == "sst2" else f"_{a.task}")
    os.makedirs(RESULTS, exist_ok=True)
    with open(os.path.join(RESULTS, f"{name}.json"), "w") as f:
        json.dump(result, f, indent=1)
    cmd = f"--task {a.task}" + ("" if rows == list(ROWS) else f" --rows {','.join(rows)}") + \
        ("" if seeds == [0, 1, 2] else f" --seeds {','.join(map(str, seeds))}") + ("" if a.steps == 600 else
                                                                                f" --steps {a.steps}")
    lines = [f"# MATE-KD vs KD vs SFT on {a.task.upper()} (`python benchmarks/mate_kd_quality.py {cmd}`)", "",
             f"Dev: {n_dev} held-out rows; students' train: {result['train_rows']} rows. Teacher all-MiniLM-L6-v2 + "
             f"head (sft on {result['teacher_train_rows']} rows): {100 * teacher_acc:.2f} % dev accuracy. Students: 3 "
             f"layers, {a.steps} student steps of 32, "
             f"lr 1e-4, T = {a.temperature:g}, distillation weight 2/3 in kd and mate_kd; seeds "
             f"{', '.join(map(str, seeds))}; {result['cell_seconds_total']:.0f} s of cell wall time (training + "
             "evaluation, 2 CPU cores).", "",
             f"| row | dev accuracy mean ± std | vs {rows[0]} (95 % paired bootstrap) | teacher agreement "
             "| s / cell |",
             "|---|---|---|---|---|"]
    for x in result["rows"]:
        score = "missing" if x["mean"] is None else f"{100 * x['mean']:.2f} ± {100 * x['std']:.2f}"
        iv = x.get("interval_95")
        vs = "baseline" if x["row"] == rows[0] else (f"{100 * x['diff_vs_baseline']:+.2f} [{100 * iv[0]:+.2f}, "
                                                    f"{100 * iv[1]:+.2f}]" if iv else "n/a")
        agr = [v for v in x["teacher_agreement"] if v is not None]
        agr = f"{100 * sum(agr) / len(agr):.1f} %" if agr else "n/a"
        lines.append(f"| {x['row']} | {score} | {vs} | {agr} | {x['seconds_per_cell']} |")
    lines += ["", "The adversarial term in isolation (same paired bootstrap):", ""]
    lines += [f"- {p['row']} - {p['minus']}: {100 * p['diff']:+.2f} points [{100 * p['interval_95'][0]:+.2f}, "
              f"{100 * p['interval_95'][1]:+.2f}] ({p['how']})" for p in result["pairs"]]
    with open(os.path.join(RESULTS, f"{name}.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))
    print(json.dumps({"dev_accuracy": {x["row"]: [x["mean"], x["std"]] for x in result["rows"]},
                      "teacher_dev_accuracy": teacher_acc}))


if __name__ == "__main__":
    main()
