"""Peak memory of the MiniLMv2 relation loss (forward + backward): chunked vs the naive whole-tensor computation.

Each variant runs in a fresh child process on the same random teacher/student Q, K, V (the student's with
``requires_grad``). The child records its resident set size just before the loss, resets the kernel's peak
counter (``/proc/self/clear_refs``), runs ``minilm_v2_loss(...).backward()`` and reads the peak (``VmHWM``); the
growth is what the loss itself needed. It also sums the bytes the autograd graph saves for backward
(``saved_tensors_hooks``). The parent checks that both variants give the same loss and student gradients.

    python benchmarks/minilmv2_memory.py                    # B=32, n=512, A_r=48, hidden 384 / 384
    python benchmarks/minilmv2_memory.py --batch 8 --seq 256

If the naive variant would not fit in the memory available now (estimated from the relation size), the batch
is halved until it does, and the sizes used are printed. The last line printed is a JSON object with
``peak_ratio`` (chunked / naive peak growth) and ``max_abs_diff`` (loss and gradients); the same figures go
to ``benchmarks/results/minilmv2_memory.{json,md}``.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

from _common import RESULTS, ROOT, PeakGrowth


def child(args) -> None:
    sys.path.insert(0, ROOT)
    import torch

    from kd_engine.losses.minilm import minilm_v2_loss, resolve_chunk_size

    torch.manual_seed(args.seed)
    B, n = args.batch, args.seq
    teacher = [torch.randn(B, n, args.teacher_hidden) for _ in range(3)]
    student = [torch.randn(B, n, args.student_hidden, requires_grad=True) for _ in range(3)]
    mask = torch.ones(B, n, dtype=torch.long)
    lengths = torch.randint(n // 2, n + 1, (B,), generator=torch.Generator().manual_seed(args.seed))
    mask[torch.arange(n)[None, :] >= lengths[:, None]] = 0  # right padding of random length
    chunk = None
    if args.variant == "chunked":  # "auto" -> pairs per chunk
        chunk = resolve_chunk_size(args.chunk_size if args.chunk_size == "auto" else int(args.chunk_size), n)

    saved = [0]

    def pack(t):
        saved[0] += t.numel() * t.element_size()
        return t

    with PeakGrowth() as m:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss, terms = minilm_v2_loss(teacher, student, mask, args.heads, chunk_size=chunk)
        loss.backward()
    torch.save({"loss": loss.detach(), "grads": [s.grad for s in student]}, args.out)
    print(json.dumps({
        "variant": args.variant, "chunk_size": chunk, "loss": loss.item(),
        "terms": {k: v.item() for k, v in terms.items()},
        "peak_growth_bytes": m.growth_kib * 1024, "baseline_rss_bytes": m.base_kib * 1024,
        "autograd_saved_bytes": saved[0], "seconds": m.seconds, "peak_exact": m.exact,
    }))


def _available_bytes() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return 0


def _run_child(variant: str, args, out: str) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--child", variant, "--out", out,
           "--batch", str(args.batch), "--seq", str(args.seq), "--heads", str(args.heads),
           "--teacher-hidden", str(args.teacher_hidden), "--student-hidden", str(args.student_hidden),
           "--chunk-size", str(args.chunk_size), "--seed", str(args.seed)]
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
    res = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if res.returncode != 0:
        raise SystemExit(f"{variant} run failed (exit {res.returncode}):\n{res.stderr[-3000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def _fmt_mib(x: float) -> str:
    return f"{x / 2**20:,.0f} MiB"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--heads", type=int, default=48, help="relation heads A_r")
    p.add_argument("--teacher-hidden", type=int, default=384)
    p.add_argument("--student-hidden", type=int, default=384)
    p.add_argument("--chunk-size", default="auto", help="(batch x relation head) pairs per chunk, or 'auto'")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS of the child processes")
    p.add_argument("--mem-fraction", type=float, default=0.6,
                   help="largest share of MemAvailable the naive run may be estimated to need")
    p.add_argument("--no-write", action="store_true", help="do not write benchmarks/results/")
    p.add_argument("--child", choices=["naive", "chunked"], help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        args.variant = args.child
        return child(args)

    requested = args.batch
    # naive: about 7 relation-sized fp32 tensors alive at its peak per relation, 2 kept per relation for backward
    def naive_estimate(b):
        rel = b * args.heads * args.seq ** 2 * 4
        return rel * (2 * 3 + 5)

    avail = _available_bytes()
    while args.batch > 1 and naive_estimate(args.batch) > args.mem_fraction * avail:
        args.batch //= 2
    if args.batch != requested:
        print(f"naive B={requested} needs about {_fmt_mib(naive_estimate(requested))} but "
              f"{_fmt_mib(avail)} is available: using B={args.batch}")
    print(f"sizes: B={args.batch} n={args.seq} A_r={args.heads} teacher hidden={args.teacher_hidden} "
          f"student hidden={args.student_hidden} chunk_size={args.chunk_size} threads={args.threads} "
          f"(Q-Q, K-K, V-V relations, forward + backward)")

    import torch

    with tempfile.TemporaryDirectory() as tmp:
        res, saved = {}, {}
        for variant in ("naive", "chunked"):
            out = os.path.join(tmp, f"{variant}.pt")
            res[variant] = _run_child(variant, args, out)
            saved[variant] = torch.load(out)
        diffs = [float((saved["naive"]["loss"] - saved["chunked"]["loss"]).abs())]
        diffs += [float((a - b).abs().max()) for a, b in zip(saved["naive"]["grads"], saved["chunked"]["grads"])]
    max_abs_diff = max(diffs)
    ratio = res["chunked"]["peak_growth_bytes"] / res["naive"]["peak_growth_bytes"]

    rows = [("variant", "chunk (pairs)", "loss", "peak RSS growth", "autograd saved", "time")]
    for v in ("naive", "chunked"):
        r = res[v]
        rows.append((v, str(r["chunk_size"]), f"{r['loss']:.6f}", _fmt_mib(r["peak_growth_bytes"]),
                     _fmt_mib(r["autograd_saved_bytes"]), f"{r['seconds']:.1f} s"))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    table = ["| " + " | ".join(c.ljust(w) for c, w in zip(row, widths)) + " |" for row in rows]
    table.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    print("\n".join(table))
    print(f"loss diff {diffs[0]:.2e}; max |grad diff| Q {diffs[1]:.2e} K {diffs[2]:.2e} V {diffs[3]:.2e}")

    summary = {
        "peak_ratio": round(ratio, 4), "max_abs_diff": max_abs_diff,
        "batch": args.batch, "requested_batch": requested, "seq": args.seq, "relation_heads": args.heads,
        "teacher_hidden": args.teacher_hidden, "student_hidden": args.student_hidden,
        "chunk_size": res["chunked"]["chunk_size"], "threads": args.threads,
        "naive_peak_bytes": res["naive"]["peak_growth_bytes"],
        "chunked_peak_bytes": res["chunked"]["peak_growth_bytes"],
        "naive_saved_bytes": res["naive"]["autograd_saved_bytes"],
        "chunked_saved_bytes": res["chunked"]["autograd_saved_bytes"],
        "naive_seconds": round(res["naive"]["seconds"], 2), "chunked_seconds": round(res["chunked"]["seconds"], 2),
        "loss": res["naive"]["loss"], "peak_exact": res["naive"]["peak_exact"] and res["chunked"]["peak_exact"],
        "torch": torch.__version__, "command": " ".join(["python", "benchmarks/minilmv2_memory.py", *sys.argv[1:]]),
    }
    if not args.no_write:
        os.makedirs(RESULTS, exist_ok=True)
        with open(os.path.join(RESULTS, "minilmv2_memory.json"), "w") as f:
            json.dump(summary, f, indent=2)
        with open(os.path.join(RESULTS, "minilmv2_memory.md"), "w") as f:
            f.write("# MiniLMv2 relation loss: peak memory, forward + backward (CPU)\n\n")
            f.write(f"Command: `{' '.join(['python', 'benchmarks/minilmv2_memory.py', *sys.argv[1:]])}`  \n")
            f.write(f"Sizes: B={args.batch} n={args.seq} A_r={args.heads}, teacher hidden {args.teacher_hidden}, "
                    f"student hidden {args.student_hidden}; Q-Q + K-K + V-V; fp32; {args.threads} thread(s); "
                    f"torch {torch.__version__}. Peak = growth of the child's peak RSS (VmHWM) over its RSS "
                    f"before the loss. Times are wall-clock on a shared 2-core machine (other jobs running), "
                    f"not a speed benchmark.\n\n")
            f.write("\n".join(table) + "\n\n")
            f.write(f"peak_ratio (chunked / naive) = {ratio:.4f}; max_abs_diff (loss and student grads) = "
                    f"{max_abs_diff:.3g}\n")
    print(json.dumps({"peak_ratio": round(ratio, 4), "max_abs_diff": max_abs_diff}))


if __name__ == "__main__":
    main()
