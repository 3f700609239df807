"""Peak memory and time of the logit-KD loss (forward + backward): fused chunked vs naive full logits.

SmolLM2 shapes by default: vocab 49,152, hidden 576 (student and teacher), batch 8 x 1,024 tokens. The loss
alone: from the final hidden states and lm_head weights of both models to the gradients of the student's
hidden states and lm_head weight (``alpha=0.5``, ``T=2``, forward KL). The naive variant materialises both
models' logits (``hidden @ W.T``) and calls ``losses.divergences.distill_loss``; the fused one calls
``losses.fused_kd.fused_kd_loss``.

Each measurement runs in a fresh child process: it records its resident set size just before the loss, resets
the kernel's peak counter (``/proc/self/clear_refs``), runs forward + backward and reads the peak (``VmHWM``);
the growth is what the loss needed. Variants alternate (naive, fused, naive, fused, ...) so that noise from
other processes hits both. The parent compares loss and gradients at the main size.

    nice -n 5 python benchmarks/kd_loss_memory.py                 # 8 x 1024, sweep 128..1024, 2 timing repeats
    nice -n 5 python benchmarks/kd_loss_memory.py --loss sparse   # the same for the offline teacher cache's loss
                                                                  # (losses.sparse_kd vs losses.fused_sparse_kd)
    python benchmarks/kd_loss_memory.py --batch 2 --seqs 64,128 --repeats 1   # quick

Last line: JSON with ``peak_ratio`` (fused / naive peak growth, target <= 0.125), ``time_ratio`` (fused / naive
wall time of forward + backward, best of the repeats, target <= 1.1) and ``max_abs_diff`` (loss and gradients,
target <= 1e-5). Also written: ``benchmarks/results/kd_loss_memory.{json,md}`` and the peak-vs-length plot
``kd_loss_memory.png`` (needs matplotlib: ``pip install .[plots]``).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

from _common import RESULTS, ROOT, PeakGrowth, pyplot, save_figure


def child(args) -> None:
    sys.path.insert(0, ROOT)
    import torch

    from kd_engine.losses.divergences import distill_loss
    from kd_engine.losses.fused_kd import fused_kd_loss

    torch.manual_seed(args.seed)
    B, n, V, H, Ht = args.batch, args.seq, args.vocab, args.hidden, args.teacher_hidden
    hs = torch.randn(B, n, H, requires_grad=True)
    ws = (torch.randn(V, H) / H ** 0.5).requires_grad_(True)
    ht = torch.randn(B, n, Ht)
    wt = torch.randn(V, Ht) / Ht ** 0.5
    labels = torch.randint(0, V, (B, n))
    kw = dict(temperature=args.temperature, alpha=args.alpha, divergence=args.divergence)
    if args.loss == "sparse":  # the cached teacher: top-k + tail samples of the teacher rows, made before measuring
        from kd_engine.losses.fused_sparse_kd import fused_sparse_kd_vector
        from kd_engine.losses.sparse_kd import sample_tail, sparse_kd_loss, teacher_rows

        g, parts = torch.Generator().manual_seed(args.seed), []
        flat_t = ht.reshape(-1, Ht)
        with torch.no_grad():
            for i in range(0, flat_t.shape[0], 1024):
                ids, logp, tail, log_p = teacher_rows(flat_t[i:i + 1024] @ wt.T, args.top_k, args.temperature)
                parts.append((ids, logp.half().float(), tail.half().float(),
                              *sample_tail(log_p, ids, args.tail_samples, g)))
                del log_p
        cached = [torch.cat(x) for x in zip(*parts)]
        cached[4] = cached[4].half().float()
        del parts, ht
        kw = dict(temperature=args.temperature, alpha=args.alpha)
    with PeakGrowth(strict=True) as m:
        if args.loss == "sparse" and args.variant == "naive":
            terms = sparse_kd_loss(hs @ ws.T, labels, *cached[:3], vocab_size=V, tail_ids=cached[3],
                                   tail_logp=cached[4], **kw)
        elif args.loss == "sparse":
            vec = fused_sparse_kd_vector(hs, ws, labels, *cached, vocab_size=V, **kw)
            terms = {"kd": vec[0], "ce": vec[1]}
        elif args.variant == "naive":
            terms = distill_loss(hs @ ws.T, ht @ wt.T, labels, **kw)
        else:
            terms = fused_kd_loss(hs, ws, ht, wt, labels, **kw)
        loss = sum(terms.values())
        loss.backward()
    out = {"variant": args.variant, "seq": n, "peak_mib": m.growth_kib / 1024, "seconds": m.seconds,
           "loss": {k: float(v) for k, v in terms.items()}}
    if args.save:
        torch.save({"hs": hs.grad, "ws": ws.grad, "loss": loss.detach()}, args.save)
    print("RESULT " + json.dumps(out))


def run_child(args, variant: str, seq: int, save: str = "") -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--child", "--variant", variant, "--seq", str(seq),
           "--batch", str(args.batch), "--vocab", str(args.vocab), "--hidden", str(args.hidden),
           "--teacher_hidden", str(args.teacher_hidden), "--temperature", str(args.temperature),
           "--alpha", str(args.alpha), "--divergence", args.divergence, "--seed", str(args.seed),
           "--loss", args.loss, "--top_k", str(args.top_k), "--tail_samples", str(args.tail_samples)]
    if save:
        cmd += ["--save", save]
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0:
        raise SystemExit(f"error: {variant} seq={seq} failed:\n{res.stderr[-2000:]}")
    line = [ln for ln in res.stdout.splitlines() if ln.startswith("RESULT ")][-1]
    return json.loads(line[len("RESULT "):])


def plot(sweep: dict, path: str, args) -> bool:
    plt = pyplot()
    if plt is None:
        return False
    fig, ax = plt.subplots(figsize=(6, 4))
    for variant, style in (("naive", "o-"), ("fused", "s-")):
        xs = sorted(int(s) for s in sweep[variant])
        ax.plot(xs, [sweep[variant][str(x)] for x in xs], style, label=variant)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel(f"sequence length (batch {args.batch})")
    ax.set_ylabel("peak memory growth, MiB (fwd + bwd)")
    ax.set_title(f"{'cached-teacher ' if args.loss == 'sparse' else ''}KD loss, vocab {args.vocab:,}, "
                 f"hidden {args.hidden}")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    return save_figure(fig, path)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batch", type=int, default=8, help="sequences per micro-batch")
    ap.add_argument("--seqs", default="128,256,512,1024", help="sequence lengths of the sweep; the last is the "
                    "main size (ratios, max_abs_diff)")
    ap.add_argument("--repeats", type=int, default=2, help="timed runs per variant at the main size")
    ap.add_argument("--vocab", type=int, default=49152, help="vocabulary size")
    ap.add_argument("--hidden", type=int, default=576, help="student hidden size")
    ap.add_argument("--teacher_hidden", type=int, default=576, help="teacher hidden size")
    ap.add_argument("--temperature", type=float, default=2.0, help="KD temperature")
    ap.add_argument("--alpha", type=float, default=0.5, help="KD weight (1 - alpha on hard-label CE)")
    ap.add_argument("--divergence", default="forward_kl", help="forward_kl | reverse_kl | jsd")
    ap.add_argument("--seed", type=int, default=0, help="random seed of the inputs")
    ap.add_argument("--loss", default="dense", help="dense: online teacher (both models' hidden states and "
                    "weights); sparse: offline teacher cache (top-k + tail samples), results in "
                    "kd_loss_memory_sparse.*")
    ap.add_argument("--top_k", type=int, default=32, help="--loss sparse: cached top-k")
    ap.add_argument("--tail_samples", type=int, default=8, help="--loss sparse: cached tail samples")
    ap.add_argument("--results", default=RESULTS, help="folder for kd_loss_memory.{json,md,png}")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--variant", default="fused", help=argparse.SUPPRESS)
    ap.add_argument("--seq", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--save", default="", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(args)
    seqs = [int(s) for s in args.seqs.split(",")]
    if min(seqs) <= 0 or args.batch <= 0 or args.repeats <= 0:
        raise SystemExit("error: --seqs, --batch and --repeats must be positive")
    import torch

    sweep = {"naive": {}, "fused": {}}
    times = {"naive": [], "fused": []}
    main_seq = seqs[-1]
    with tempfile.TemporaryDirectory() as tmp:
        saved = {}
        for seq in seqs[:-1]:
            for variant in ("naive", "fused"):
                r = run_child(args, variant, seq)
                sweep[variant][str(seq)] = r["peak_mib"]
                print(f"seq {seq:5d} {variant}: peak +{r['peak_mib']:.0f} MiB, {r['seconds']:.2f} s", flush=True)
        for rep in range(args.repeats):
            for variant in (("naive", "fused") if rep % 2 == 0 else ("fused", "naive")):
                save = os.path.join(tmp, f"{variant}.pt") if rep == 0 else ""
                r = run_child(args, variant, main_seq, save)
                saved.setdefault(variant, save)
                sweep[variant][str(main_seq)] = min(sweep[variant].get(str(main_seq), 1e30), r["peak_mib"])
                times[variant].append(r["seconds"])
                print(f"seq {main_seq:5d} {variant}: peak +{r['peak_mib']:.0f} MiB, {r['seconds']:.2f} s",
                      flush=True)
        a, b = torch.load(saved["naive"]), torch.load(saved["fused"])
        max_abs_diff = max(float((a[k] - b[k]).abs().max()) for k in ("hs", "ws", "loss"))
    peak_ratio = sweep["fused"][str(main_seq)] / sweep["naive"][str(main_seq)]
    time_ratio = min(times["fused"]) / min(times["naive"])
    os.makedirs(args.results, exist_ok=True)
    name = "kd_loss_memory" + ("_sparse" if args.loss == "sparse" else "")
    png = os.path.join(args.results, name + ".png")
    has_plot = plot(sweep, png, args)
    summary = {"batch": args.batch, "seq": main_seq, "vocab": args.vocab, "hidden": args.hidden,
               "teacher_hidden": args.teacher_hidden, "divergence": args.divergence,
               "temperature": args.temperature, "alpha": args.alpha,
               "peak_mib": {v: sweep[v][str(main_seq)] for v in sweep}, "seconds": times,
               "peak_ratio": round(peak_ratio, 4), "time_ratio": round(time_ratio, 3),
               "max_abs_diff": max_abs_diff, "sweep_peak_mib": sweep, "plot": png if has_plot else None,
               "command": "python benchmarks/kd_loss_memory.py " + " ".join(sys.argv[1:])}
    with open(os.path.join(args.results, name + ".json"), "w") as f:
        json.dump(summary, f, indent=1)
    rows = "\n".join(f"| {s} | {sweep['naive'][s]:.0f} | {sweep['fused'][s]:.0f} |"
                     for s in sorted(sweep["naive"], key=int))
    what = (f"cached teacher (top-{args.top_k} + {args.tail_samples} tail samples)" if args.loss == "sparse"
            else f"online teacher, {args.divergence}")
    with open(os.path.join(args.results, name + ".md"), "w") as f:
        f.write(f"# KD loss fwd+bwd: fused chunked vs naive, {what}\n\n`{summary['command']}`\n\n"
                f"batch {args.batch}, vocab {args.vocab}, hidden {args.hidden}/{args.teacher_hidden}, "
                f"T={args.temperature}, alpha={args.alpha}\n\n"
                f"peak_ratio {peak_ratio:.4f}, time_ratio {time_ratio:.3f} (best of {args.repeats}), "
                f"max_abs_diff {max_abs_diff:.2e}\n\n| seq | naive peak MiB | fused peak MiB |\n|---|---|---|\n"
                f"{rows}\n" + (f"\n![peak vs length]({name}.png)\n" if has_plot else ""))
    print(f"results in {args.results}/{name}.{{json,md}}" + (" and .png" if has_plot else ""))
    print(json.dumps({k: summary[k] for k in ("peak_ratio", "time_ratio", "max_abs_diff", "peak_mib")}))


if __name__ == "__main__":
    main()
