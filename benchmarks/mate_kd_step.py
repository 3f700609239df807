"""MATE-KD step cost vs logit KD on the same models and batches, measured side by side in one run.

    python benchmarks/mate_kd_step.py [--steps 8] [--batch 32] [--seq 64] [--student_layers 3] [--generator_layers 2]

Teacher: all-MiniLM-L6-v2 (BERT, 6 layers, offline) with a 2-way classification head; student: 3 of its layers
(``--student.layers``); generator: its first 2 layers + a tied masked-LM head (``--generator.layers``). Batches: SST-2
sentences from ../shared/data when present (else generated text), padded per batch, ``--seq`` tokens at most. Two
engines are built in one process (``--method kd`` at T=1, alpha=0.5, and ``--method mate_kd`` with its defaults),
both DeepSpeed ZeRO-0 fp32; then, interleaved per round so load drift hits all alike: one kd step, one MATE-KD
student step, one MATE-KD generator step (each on its own next batch of the same stream). Medians after warm-up of
process CPU seconds (robust on a shared machine; ``--threads 1`` by default) and, for reference, wall seconds.

Last line printed: {"student_step_vs_kd": MATE-KD student step / kd step (target <= 2.2),
                    "cycle_overhead": (10 generator + 100 student steps) / (110 kd steps), from the medians
                    (target <= 2.4)}.
Also writes benchmarks/results/mate_kd_step.{json,md}.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
SST2 = os.path.join(ROOT, "..", "shared", "data", "sst2", "train.tsv")


def write_data(path: str, n: int) -> None:
    if os.path.isfile(SST2):
        lines = open(SST2, encoding="utf-8").read().splitlines()[:n + 1]
    else:
        import random

        rng = random.Random(0)
        words = "the a film movie good bad great boring fun slow plot actors story end".split()
        lines = ["sentence\tlabel"] + [" ".join(rng.choice(words) for _ in range(rng.randint(5, 30))) + f"\t{i % 2}"
                                       for i in range(n)]
    with open(path, "w", encoding="utf-8") as fh:
        fh.write("\n".join(lines) + "\n")


def make_teacher(path: str) -> None:
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from kd_engine.models.loading import offline_model_path

    src = offline_model_path("all-minilm-l6-v2")
    model = AutoModelForSequenceClassification.from_pretrained(src, num_labels=2)
    model.save_pretrained(path)
    AutoTokenizer.from_pretrained(src).save_pretrained(path)


def trainer(argv):
    from kd_engine.config import build_config
    from kd_engine.data.sampler import infinite_batches
    from kd_engine.engine.trainer import Trainer

    tr = Trainer(build_config(argv))
    tr._setup()
    tr._batch_iter = infinite_batches(tr.sampler)
    return tr


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=8, help="timed rounds (one step of each kind per round)")
    ap.add_argument("--warmup", type=int, default=2, help="untimed rounds first")
    ap.add_argument("--batch", type=int, default=32, help="sentences per step")
    ap.add_argument("--seq", type=int, default=64, help="max tokens per sentence")
    ap.add_argument("--student_layers", type=int, default=3)
    ap.add_argument("--generator_layers", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (0: all cores)")
    ap.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results", "mate_kd_step"))
    args = ap.parse_args()

    from kd_engine.dist import free_port, setup_environment

    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    setup_environment()
    import torch

    torch.set_num_threads(args.threads or os.cpu_count() or 1)
    tmp = tempfile.mkdtemp(prefix="mate-bench-")
    make_teacher(os.path.join(tmp, "teacher"))
    rounds = args.steps + args.warmup
    write_data(os.path.join(tmp, "train.tsv"), args.batch * rounds * 3)
    common = ["--teacher", os.path.join(tmp, "teacher"), "--student.layers", str(args.student_layers),
              "--train_file", os.path.join(tmp, "train.tsv"), "--text_column", "sentence", "--label_column", "label",
              "--max_length", str(args.seq), "--per_device_train_batch_size", str(args.batch), "--max_steps", "1000",
              "--learning_rate", "2e-5", "--report_to", "none", "--disable_tqdm", "true", "--group_by_length", "false"]
    kd = trainer(["--method", "kd", "--temperature", "1", "--alpha", "0.5", "--output_dir",
                  os.path.join(tmp, "kd"), *common])
    mate = trainer(["--method", "mate_kd", "--generator.layers", str(args.generator_layers), "--output_dir",
                    os.path.join(tmp, "mate"), *common])
    times = {"kd": [], "student": [], "generator": []}
    walls = {k: [] for k in times}
    for r in range(rounds):
        for name, fn in (("kd", lambda: kd.method.train_step(kd.ctx)),
                         ("student", lambda: mate.method.student_step(mate.ctx)),
                         ("generator", lambda: mate.method.generator_step(mate.ctx))):
            c, t = time.process_time(), time.perf_counter()
            fn()
            if r >= args.warmup:
                times[name].append(time.process_time() - c)
                walls[name].append(time.perf_counter() - t)
    med = {k: statistics.median(v) for k, v in times.items()}
    wall = {k: statistics.median(v) for k, v in walls.items()}
    result = {
        "student_step_vs_kd": round(med["student"] / med["kd"], 4),
        "cycle_overhead": round((10 * med["generator"] + 100 * med["student"]) / (110 * med["kd"]), 4),
        "generator_step_vs_kd": round(med["generator"] / med["kd"], 4),
        "median_cpu_s": {k: round(v, 4) for k, v in med.items()},
        "median_wall_s": {k: round(v, 4) for k, v in wall.items()},
        "wall_student_step_vs_kd": round(wall["student"] / wall["kd"], 4),
        "all_cpu_s": {k: [round(x, 4) for x in v] for k, v in times.items()},
        "all_wall_s": {k: [round(x, 4) for x in v] for k, v in walls.items()},
        "config": vars(args), "threads": torch.get_num_threads(),
        "load_avg_1min_end": os.getloadavg()[0], "cpus": os.cpu_count(),
    }
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out + ".json", "w") as fh:
        json.dump(result, fh, indent=2)
    cmd = "python benchmarks/mate_kd_step.py " + " ".join(sys.argv[1:])
    md = ["# MATE-KD step cost vs kd", "", f"`{cmd.strip()}`", "",
          f"Teacher all-MiniLM-L6-v2 + 2-way head (6 layers), student {args.student_layers} of its layers, generator "
          f"its first {args.generator_layers} layers + tied MLM head; batch {args.batch} SST-2 sentences, <= "
          f"{args.seq} tokens; ZeRO-0 fp32, {result['threads']} torch threads; medians of {args.steps} interleaved "
          f"rounds after {args.warmup} warm-up rounds. 1-minute load average at the end: "
          f"{result['load_avg_1min_end']:.2f} on {result['cpus']} cpus.", "",
          "| step | median CPU s | / kd step | median wall s |", "|---|---|---|---|",
          f"| kd (T=1, alpha 0.5) | {med['kd']:.3f} | 1.00 | {wall['kd']:.2f} |",
          f"| MATE-KD student step | {med['student']:.3f} | {result['student_step_vs_kd']:.2f} (target <= 2.2) | "
          f"{wall['student']:.2f} |",
          f"| MATE-KD generator step | {med['generator']:.3f} | {result['generator_step_vs_kd']:.2f} | "
          f"{wall['generator']:.2f} |", "",
          f"cycle_overhead = (10 x generator + 100 x student) / (110 x kd) = {result['cycle_overhead']:.2f} "
          "(target <= 2.4)."]
    with open(args.out + ".md", "w") as fh:
        fh.write("\n".join(md) + "\n")
    print("\n".join(md))
    print(f"results: {args.out}.json, {args.out}.md")
    print(json.dumps({"student_step_vs_kd": result["student_step_vs_kd"], "cycle_overhead": result["cycle_overhead"]}))


if __name__ == "__main__":
    main()
