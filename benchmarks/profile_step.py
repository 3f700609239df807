"""Where one kd_engine KD step spends its time: wall-clock phases (median over steps) and torch.profiler's top ops.

    python benchmarks/profile_step.py [--shapes peer|overhead] [--steps 4] [--threads 2]

``peer``: the shapes of benchmarks/peer_step.py (SmolLM2-135M teacher, 10-layer shrunk student, batch 8 x 64
tokens, forward KL T 1). ``overhead``: those of benchmarks/engine_overhead.py (random Llama 768-wide, teacher 6 /
student 3 layers, 30522 vocab, batch 8 x 256, alpha 0.5, T 2). Phases are timed by wrapping the engine's own
functions on the instance (nothing in kd_engine is changed). Writes benchmarks/results/profile_step_<shapes>.md.
"""
from __future__ import annotations

import argparse
import collections
import functools
import os
import statistics
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shapes", choices=("peer", "overhead"), default="peer")
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()

    from kd_engine.dist import free_port, setup_environment

    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    setup_environment()
    import torch

    import kd_engine.methods.kd as kd_mod
    from kd_engine.config import build_config
    from kd_engine.engine.trainer import Trainer
    from kd_engine.models.loading import offline_model_path

    torch.set_num_threads(args.threads)
    tmp = tempfile.mkdtemp(prefix="kd-prof-")
    n = args.steps + 4
    if args.shapes == "peer":
        import peer_step

        ns = argparse.Namespace(seq=64, batch=8)
        student = peer_step.build_student(tmp, 10)
        peer_step.write_corpus(os.path.join(tmp, "train.txt"), 8 * n, 64)
        argv = peer_step.kd_argv(tmp, offline_model_path("smollm2-135m"), student, ns, n)
    else:
        import engine_overhead as eo

        eo.build_models(tmp, 768, 30522, 6, 3)
        eo.corpus(os.path.join(tmp, "train.txt"), 8 * n, 256)
        argv = ["--method", "kd", "--teacher", os.path.join(tmp, "teacher"), "--student",
                os.path.join(tmp, "student"), "--tokenizer", offline_model_path("all-minilm-l6-v2"), "--train_file",
                os.path.join(tmp, "train.txt"), "--max_length", "256", "--per_device_train_batch_size", "8",
                "--max_steps", str(n), "--learning_rate", "1e-4", "--output_dir", os.path.join(tmp, "out"),
                "--report_to", "none", "--disable_tqdm", "true", "--temperature", "2.0", "--alpha", "0.5",
                "--group_by_length", "false", "--lr_scheduler_type", "constant", "--export", "false",
                "--save_steps", "0"]
    tr = Trainer(build_config(argv))
    acc: dict[str, float] = collections.defaultdict(float)
    per_step: list[dict[str, float]] = []

    def timed(name, fn):
        @functools.wraps(fn)
        def wrapper(*a, **k):
            with torch.profiler.record_function(f"## {name}"):
                t = time.perf_counter()
                try:
                    return fn(*a, **k)
                finally:
                    acc[name] += time.perf_counter() - t
        return wrapper

    step_fn = tr.method.train_step
    marks = {"last": None}

    def train_step(ctx):
        now = time.perf_counter()
        if marks["last"] is not None:
            acc["step (loop boundary to boundary)"] = now - marks["last"]
            per_step.append(dict(acc))
        acc.clear()
        marks["last"] = now
        return step_fn(ctx)

    orig_setup = tr.method.setup

    def setup(ctx):  # engines exist now: wrap their pieces (on the Trainer, which ctx forwards to)
        orig_setup(ctx)
        eng = tr.student
        eng.module.forward = timed("student forward (model)", eng.module.forward)
        eng.forward = timed("student forward (DeepSpeed engine, incl. model)", eng.forward)
        eng.backward = timed("backward (DeepSpeed engine, incl. autograd)", eng.backward)
        eng.optimizer.step = timed("optimizer.step", eng.optimizer.step)
        eng.step = timed("engine.step (incl. clipping, optimizer, scheduler)", eng.step)
        tr.student_step = timed("student_step (incl. grad-norm, engine.step)", tr.student_step)
        tr.teacher_forward = timed("teacher forward", tr.teacher_forward)
        tr.next_batch = timed("data: collate + to device", tr.next_batch)
    tr.method.setup = setup
    torch.Tensor.backward = timed("autograd backward (inside the engine's backward)", torch.Tensor.backward)
    kd_mod.logit_kd_loss = timed("KD loss forward (fp32 rows, log-softmax, KL)", kd_mod.logit_kd_loss)
    tr.method.train_step = train_step
    prof_box = {}

    step_counter = {"k": 0}
    inner = tr.method.train_step

    def profiled_step(ctx):
        step_counter["k"] += 1
        if step_counter["k"] == n - 1:  # profile one late step with torch.profiler (op table)
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
                out = inner(ctx)
            prof_box["p"] = prof
            return out
        return inner(ctx)
    tr.method.train_step = profiled_step
    tr.fit()

    rows = per_step[2:-1] if len(per_step) > 3 else per_step  # skip warm-up steps and the profiled one
    names = sorted({k for r in rows for k in r}, key=lambda k: -statistics.median([r.get(k, 0.0) for r in rows]))
    med = {k: statistics.median([r.get(k, 0.0) for r in rows]) for k in names}
    total = med["step (loop boundary to boundary)"]
    lines = [f"# profile_step ({args.shapes} shapes, {args.threads} threads, median of {len(rows)} steps)", "",
             "| phase | median s | share of step |", "|---|---|---|"]
    lines += [f"| {k} | {v:.3f} | {100 * v / total:.0f}% |" for k, v in med.items()]
    prof = prof_box.get("p")
    if prof is not None:
        lines += ["", "torch.profiler, one step, top ops by self CPU time:", "", "```",
                  prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=30, max_name_column_width=60),
                  "```"]
    out = os.path.join(ROOT, "benchmarks", "results", f"profile_step_{args.shapes}.md")
    with open(out, "w") as fh:
        fh.write("\n".join(lines) + "\n")
    print("\n".join(lines))
    print(f"written to {out}")


if __name__ == "__main__":
    main()
