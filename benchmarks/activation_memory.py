"""Activation checkpointing: the student's step memory and time with and without ``--gradient_checkpointing``.

SmolLM2-135M teacher (``offline:smollm2-135m``) -> 10-layer student copied from it, ``--method kd`` with the fused
loss (the default for LMs), ZeRO-0 fp32 on this CPU, ``--batch`` x ``--max_length`` tokens a step (default 8 x 1024:
the demo corpus packed into full 1024-token rows with ``--packing``, so every step holds that many real tokens).
Each variant runs in a fresh child process through the real engine (``Trainer``); the child measures:

- ``step_peak_mib``: peak RSS growth over the training steps above the resting state once models, data and engines
  are built (Adam's moments and gradients, the same for both variants, plus activations and the loss's chunks,
  which checkpointing changes). Measured from before the first step: freed activation memory stays resident in the
  allocator, so a baseline taken after a step would hide the activations;
- ``process_peak_mib``: the whole process's peak RSS (models, optimizer state, data included);
- ``step_s``: median wall time of the steps after the first.

    nice -n 5 python benchmarks/activation_memory.py                   # 8 x 1024 tokens, 3 steps each (~10 min)
    python benchmarks/activation_memory.py --batch 2 --max_length 256 --steps 2     # quick

Last line: JSON with ``ckpt_peak_ratio`` (step peak with / without; target <= 0.45), ``ckpt_time_ratio`` (step time
with / without; target <= 1.4), ``max_loss_diff`` (the two runs' logged losses; checkpointing changes no number)
and the figures of each variant; also ``benchmarks/results/activation_memory.{json,md}``.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile

from _common import RESULTS, ROOT, reset_peak, single_rank_env, status_kib, timed_fit, train_losses

TEACHER = "offline:smollm2-135m"


def child(args) -> None:
    """One variant in this process: the engine's own kd run, the steps after the first measured."""
    argv = ["--method", "kd", "--teacher", TEACHER, "--student.layers", "10", "--train_file", args.train_file,
            "--max_train_samples", str(args.examples), "--packing", "true", "--max_length", str(args.max_length),
            "--per_device_train_batch_size", str(args.batch), "--max_steps", str(args.steps + 1),
            "--temperature", "1", "--alpha", "0.5", "--learning_rate", "1e-4", "--logging_steps", "1",
            "--output_dir", args.out, "--export", "false", "--disable_tqdm", "true", "--report_to", "none",
            "--gradient_checkpointing", "true" if args.ckpt else "false"]
    marks = {"base": None}

    def before_step(tr):
        if tr.global_step == 0:  # models, data and engines are built: what the steps add from here
            marks["base"] = status_kib("VmRSS")
            marks["exact"] = reset_peak()

    _, times = timed_fit(argv, before_step)
    times = times[1:]  # the steps after the first
    peak = status_kib("VmHWM")
    import resource

    print("RESULT " + json.dumps({
        "step_peak_mib": (peak - marks["base"]) / 1024, "peak_reset_exact": marks.get("exact", False),
        "process_peak_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "step_s": statistics.median(times), "step_times": times, "tokens_per_step": args.batch * args.max_length,
        "losses": train_losses(args.out)}), flush=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=8, help="rows per step")
    ap.add_argument("--max_length", type=int, default=1024, help="tokens per row (packed, so all real)")
    ap.add_argument("--steps", type=int, default=3, help="measured steps per variant (after one warm-up step)")
    ap.add_argument("--examples", type=int, default=3000, help="demo paragraphs read (enough to fill the rows)")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--ckpt", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--train_file", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args)
        return 0
    sys.path.insert(0, ROOT)
    from kd_engine.demo_data import news_corpus

    train, _ = news_corpus()
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for i, name in enumerate(("plain", "checkpointed")):
            env = single_rank_env(29600 + i, DS_ACCELERATOR="cpu")
            cmd = [sys.executable, os.path.abspath(__file__), "--child", "--train_file", train, "--out",
                   os.path.join(tmp, name), "--batch", str(args.batch), "--max_length", str(args.max_length),
                   "--steps", str(args.steps), "--examples", str(args.examples)] + (["--ckpt"] if i else [])
            p = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=ROOT)
            lines = [x for x in p.stdout.splitlines() if x.startswith("RESULT ")]
            if p.returncode != 0 or not lines:
                print(p.stdout[-2000:], p.stderr[-3000:], file=sys.stderr)
                return 1
            results[name] = json.loads(lines[-1][7:])
            print(f"{name}: step peak {results[name]['step_peak_mib']:.0f} MiB, process peak "
                  f"{results[name]['process_peak_mib']:.0f} MiB, step {results[name]['step_s']:.1f} s", flush=True)
    a, b = results["plain"], results["checkpointed"]
    summary = {"benchmark": "activation_memory", "tokens_per_step": args.batch * args.max_length,
               "ckpt_peak_ratio": round(b["step_peak_mib"] / a["step_peak_mib"], 3),
               "ckpt_process_peak_ratio": round(b["process_peak_mib"] / a["process_peak_mib"], 3),
               "ckpt_time_ratio": round(b["step_s"] / a["step_s"], 3),
               "max_loss_diff": max(abs(x - y) for x, y in zip(a["losses"], b["losses"])),
               "targets": {"ckpt_peak_ratio": 0.45, "ckpt_time_ratio": 1.4}, "variants": results,
               "command": "python benchmarks/activation_memory.py " + " ".join(sys.argv[1:])}
    os.makedirs(RESULTS, exist_ok=True)
    with open(os.path.join(RESULTS, "activation_memory.json"), "w") as f:
        json.dump(summary, f, indent=2)
    with open(os.path.join(RESULTS, "activation_memory.md"), "w") as f:
        f.write(f"# Activation checkpointing ({args.batch} x {args.max_length} tokens a step, SmolLM2-135M -> "
                f"10-layer student, kd fused loss, ZeRO-0 fp32, CPU)\n\n"
                "| variant | step peak growth (MiB) | process peak (MiB) | step (s) |\n|---|---|---|---|\n")
        for name, r in results.items():
            f.write(f"| {name} | {r['step_peak_mib']:.0f} | {r['process_peak_mib']:.0f} | {r['step_s']:.2f} |\n")
        f.write(f"\nckpt_peak_ratio {summary['ckpt_peak_ratio']} (target <= 0.45), ckpt_time_ratio "
                f"{summary['ckpt_time_ratio']} (target <= 1.4), max_loss_diff {summary['max_loss_diff']:.2e}\n")
    print(json.dumps({k: v for k, v in summary.items() if k != "variants"}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
