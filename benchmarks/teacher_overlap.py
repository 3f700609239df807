"""Does a teacher-forward thread pay on this CPU? One KD step done sequentially vs with the teacher's forward of the
next batch running in a second thread while the student trains on this one.

    python benchmarks/teacher_overlap.py [--rounds 5] [--steps 3] [--layers 10] [--seq 64] [--batch 8] [--threads 2]

Models and batches as benchmarks/peer_step.py (SmolLM2-135M teacher, ``kd_engine.shrink --layers N`` student, fp32,
forward KL T 1, AdamW lr 5e-5 fused, clipping 1.0), written as a plain PyTorch loop so that only the scheduling
differs. Variants, interleaved round by round so that load drift hits them alike:

- ``sequential``: teacher forward (inference_mode), then student forward + backward + step, all on ``--threads``;
- ``overlap``: a worker thread runs the teacher forward of batch i+1 while the main thread runs the student step of
  batch i (both threads keep ``--threads`` intra-op threads: 2x oversubscribed on 2 cores);
- ``overlap_split``: the same, each thread limited to half the intra-op threads (``torch.set_num_threads`` is per
  calling thread under OpenMP).

Wall time per step (median over every timed step; the overlap variants' first teacher forward, paid once per run in
training, is outside the timed steps). The teacher logits are the same in every variant (max abs diff
printed and asserted below 1e-4, different thread counts change reduction order only). Last line printed:
{"overlap_speedup": sequential / overlap, "overlap_split_speedup": sequential / overlap_split, ...}; writes
benchmarks/results/teacher_overlap.{json,md}.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

LR, CLIP = 5e-5, 1.0


def _batches(tmp: str, n: int, seq: int, batch: int) -> list:
    from kd_engine.models.loading import offline_model_path
    from transformers import AutoTokenizer

    import peer_step

    path = os.path.join(tmp, "train.txt")
    peer_step.write_corpus(path, n * batch, seq)
    tok = AutoTokenizer.from_pretrained(offline_model_path("smollm2-135m"))
    lines = open(path, encoding="utf-8").read().splitlines()
    out = []
    for i in range(n):
        enc = tok(lines[i * batch:(i + 1) * batch], truncation=True, max_length=seq, padding="max_length",
                  return_tensors="pt")
        labels = enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)
        out.append({"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"], "labels": labels})
    return out


class Loop:
    def __init__(self, teacher, student, threads: int):
        import torch

        self.torch, self.teacher, self.student, self.threads = torch, teacher, student, threads
        self.opt = torch.optim.AdamW(student.parameters(), lr=LR, weight_decay=0.0, fused=True)
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="teacher")
        self._worker_threads: dict[int, int] = {}

    def teacher_logits(self, b, threads: int):
        torch = self.torch
        if self._worker_threads.get(threading.get_ident()) != threads:
            torch.set_num_threads(threads)
            self._worker_threads[threading.get_ident()] = threads
        with torch.inference_mode():
            return self.teacher(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits

    def student_step(self, b, t_logits) -> float:
        import peer_step

        torch = self.torch
        loss = peer_step.kd_forward_loss(self.student(input_ids=b["input_ids"], attention_mask=b["attention_mask"])
                                         .logits, t_logits, b["labels"])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.student.parameters(), CLIP)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        return float(loss.detach())

    def run(self, variant: str, batches: list) -> list[float]:
        """Per-step wall times of ``variant`` over ``batches``."""
        times = []
        main_threads = self.threads if variant != "overlap_split" else max(1, self.threads // 2)
        worker_threads = main_threads
        self._worker_threads[threading.get_ident()] = -1
        self.torch.set_num_threads(main_threads)
        if variant == "sequential":
            for b in batches:
                t0 = time.perf_counter()
                self.student_step(b, self.teacher_logits(b, main_threads))
                times.append(time.perf_counter() - t0)
            return times
        nxt = self.pool.submit(self.teacher_logits, batches[0], worker_threads)
        nxt.result()  # pipeline fill, paid once per run in training: outside the timed steps
        t0 = time.perf_counter()
        for i, b in enumerate(batches):
            t_logits = nxt.result()
            if i + 1 < len(batches):
                nxt = self.pool.submit(self.teacher_logits, batches[i + 1], worker_threads)
            self.student_step(b, t_logits)
            times.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
        return times


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=5, help="interleaved rounds (each runs every variant)")
    ap.add_argument("--steps", type=int, default=3, help="timed steps per variant per round")
    ap.add_argument("--layers", type=int, default=10, help="student layers (shrunk from the teacher)")
    ap.add_argument("--seq", type=int, default=64, help="tokens per row")
    ap.add_argument("--batch", type=int, default=8, help="rows per batch")
    ap.add_argument("--threads", type=int, default=2, help="intra-op threads")
    args = ap.parse_args()

    import torch
    from transformers import AutoModelForCausalLM

    import peer_step
    from kd_engine.allocator import keep_freed_memory
    from kd_engine.models.loading import offline_model_path

    keep_freed_memory()
    torch.manual_seed(0)
    tmp = tempfile.mkdtemp(prefix="kd-overlap-")
    student_dir = peer_step.build_student(tmp, args.layers)
    teacher = AutoModelForCausalLM.from_pretrained(offline_model_path("smollm2-135m"), dtype=torch.float32)
    teacher.eval().requires_grad_(False)
    student = AutoModelForCausalLM.from_pretrained(student_dir, dtype=torch.float32).train()
    batches = _batches(tmp, args.steps + 1, args.seq, args.batch)
    loop = Loop(teacher, student, args.threads)

    ref = loop.teacher_logits(batches[0], args.threads)
    other = loop.pool.submit(loop.teacher_logits, batches[0], max(1, args.threads // 2)).result()
    diff = float((ref - other).abs().max())
    assert diff < 1e-4, f"teacher logits differ across threads by {diff}"

    variants = ("sequential", "overlap", "overlap_split")
    loop.run("sequential", batches[:2])  # warm-up: allocator, optimizer state
    loop.run("overlap", batches[:2])
    times: dict[str, list[float]] = {v: [] for v in variants}
    for r in range(args.rounds):
        order = variants if r % 2 == 0 else variants[::-1]
        for v in order:
            times[v].extend(loop.run(v, batches[1:]))
    med = {v: statistics.median(t) for v, t in times.items()}
    t_teacher = statistics.median([_timed(lambda: loop.teacher_logits(batches[1], args.threads)) for _ in range(3)])
    result = {"overlap_speedup": round(med["sequential"] / med["overlap"], 3),
              "overlap_split_speedup": round(med["sequential"] / med["overlap_split"], 3),
              "step_s": {v: round(m, 4) for v, m in med.items()},
              "step_s_quartiles": {v: [round(q, 4) for q in statistics.quantiles(t, n=4)] for v, t in times.items()}, "teacher_forward_s": round(t_teacher, 4),
              "teacher_share": round(t_teacher / med["sequential"], 3), "teacher_logits_max_diff": diff,
              "threads": args.threads, "cores": os.cpu_count(), "load": os.getloadavg()[0],
              "shapes": f"{args.batch} x {args.seq}, student {args.layers} layers",
              "rounds": args.rounds, "steps_per_round": args.steps}
    _write(result)
    print(json.dumps(result))


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def _write(result: dict) -> None:
    out = os.path.join(ROOT, "benchmarks", "results")
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "teacher_overlap.json"), "w") as fh:
        json.dump(result, fh, indent=1)
    s = result["step_s"]
    lines = ["# Teacher forward in a second thread vs sequential (CPU)", "",
             f"{result['shapes']}, {result['threads']} intra-op threads, {result['cores']} cores, load "
             f"{result['load']:.1f}; {result['rounds']} interleaved rounds x {result['steps_per_round']} steps.", "",
             "| variant | median step (s) | speedup vs sequential |", "|---|---|---|"]
    q = result["step_s_quartiles"]
    for v in ("sequential", "overlap", "overlap_split"):
        lines.append(f"| {v} | {s[v]:.3f} (quartiles {q[v][0]:.3f}-{q[v][2]:.3f}) | {s['sequential'] / s[v]:.2f} |")
    lines += ["", f"Teacher forward alone {result['teacher_forward_s']:.3f} s = {result['teacher_share']:.0%} of "
              f"the sequential step; teacher logits across thread counts differ by "
              f"{result['teacher_logits_max_diff']:.1e}.", ""]
    with open(os.path.join(out, "teacher_overlap.md"), "w") as fh:
        fh.write("\n".join(lines))


if __name__ == "__main__":
    main()
