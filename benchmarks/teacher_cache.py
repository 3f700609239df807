"""Offline top-k teacher cache vs the online teacher: step time, peak memory, top-k KL error, bytes/token, perplexity.

SmolLM2-135M teacher (``offline:smollm2-135m``) -> 10-layer student copied from it, the demo corpus
(``python -m kd_engine.demo_data``; the first ``--examples`` paragraphs, so that the cache covers every step).
LM distillation recipe: ``--temperature 1`` (the cache stores log-probs at its build temperature; T = 2 flattens the
teacher so that top-k covers far less mass) and ``--alpha 1`` (pure distillation, no CE term).
Side by side in one run:

0. heal the layer-copied student once (``--method sft`` for ``--heal_steps`` steps on the same training
   paragraphs): a straight layer copy has held-out perplexity in the tens of thousands, where 30 KD steps are
   dominated by noise; both runs below start from this same healed student;
1. build the cache (``python -m kd_engine.teacher_cache``, k = ``--top_k``, fp16 log-probs, at ``--temperature``);
2. ``--method kd`` for ``--steps`` steps online (teacher loaded) and from the cache (no teacher), same student
   init, data order and seed, each in its own process, ``--repeats`` times in alternating order: median step time
   over the repeats (teacher_ms + student_ms of the logged steps after the first of each run), peak RSS of the
   process (``wait4``), held-out perplexity after the last step (checked equal across repeats);
3. KL error of the top-k + tail approximation vs the full KL for k in ``--ks`` on held-out tokens (teacher vs the
   student after the online run, and vs the initial (healed) student; at ``--temperature``, log-probs rounded to fp16 as stored), and
   bytes/token.

    nice -n 5 python benchmarks/teacher_cache.py                 # 30 steps x 2 x 64 tokens (+ 40 healing steps)
    python benchmarks/teacher_cache.py --steps 4 --examples 24 --heal_steps 2    # quick

Runs ``cached`` (top-k + tail mass) and, with ``--tail_samples M > 0``, ``cached_tail`` (top-k + M tokens sampled
from the teacher's tail, an unbiased estimate of the full KL).
Last line: JSON with ``cached_step_speedup`` per cached run (online / cached median step time; target >= 1.8),
``speedup_bound`` (online step / online step without its teacher forward time), ``kl_rel_error`` per k, ``bytes_per_token``,
``ppl_online``, ``ppl_rel_diff`` per cached run (target <= 0.02), peak RSS. Also
``benchmarks/results/teacher_cache.{json,md}`` and ``teacher_cache.png`` (with matplotlib).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time

from _common import RESULTS, ROOT, pyplot, save_figure

TEACHER = "offline:smollm2-135m"


def run(cmd: list[str], env: dict) -> tuple[float, float]:
    """Run a child; (wall seconds, peak RSS MiB of that child)."""
    t0 = time.perf_counter()
    p = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    out = p.stdout.read()
    _, status, usage = os.wait4(p.pid, 0)
    p.returncode = os.waitstatus_to_exitcode(status)
    if p.returncode != 0:
        raise SystemExit(f"error: {' '.join(cmd[:4])} ... failed:\n{out[-3000:]}")
    return time.perf_counter() - t0, usage.ru_maxrss / 1024


def log_rows(out: str, split: str) -> list[dict]:
    with open(os.path.join(out, "train_log.jsonl")) as f:
        return [r for r in map(json.loads, f) if r["split"] == split]


def kl_errors(student_dir: str, eval_file: str, ks: list[int], n_texts: int, max_length: int,
              temperature: float, tail_samples: int) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    from kd_engine.losses.kd import kl_div_rows
    from kd_engine.losses.sparse_kd import sample_tail, sparse_kl_rows, teacher_rows
    from kd_engine.models.loading import load_model, load_tokenizer

    tok = load_tokenizer(TEACHER)
    teacher = load_model(TEACHER, "causal_lm").eval()
    student = AutoModelForCausalLM.from_pretrained(student_dir).eval()
    texts = [t for t in open(eval_file, encoding="utf-8").read().splitlines() if t.strip()][:n_texts]
    enc = tok(texts, truncation=True, max_length=max_length, padding=True, return_tensors="pt")
    with torch.no_grad():
        t = teacher(**enc).logits[:, :-1]
        s = student(**enc).logits[:, :-1]
    mask = enc["attention_mask"][:, 1:].bool()
    V = len(tok)
    t, s = t[mask][:, :V].float(), s[mask][:, :V].float()
    full = float(kl_div_rows(s, t, temperature)) / temperature ** 2
    out = {"tokens": int(mask.sum()), "full_kl": full, "per_k": {}}
    for k in ks:
        ids, logp, tail, log_p = teacher_rows(t, k, temperature)
        logp, tail = logp.half().float(), tail.half().float()
        approx = float(sparse_kl_rows(s, ids, logp, tail, temperature).mean())
        mass = float(logp.exp().sum(-1).mean())
        row = {"kl": approx, "rel_error": abs(approx - full) / full, "bytes_per_token": 6 * (k + 1),
               "teacher_top_k_mass": mass}
        if tail_samples:
            t_ids, t_logp = sample_tail(log_p, ids, tail_samples, torch.Generator().manual_seed(0))
            sampled = float(sparse_kl_rows(s, ids, logp, tail, temperature, None, t_ids,
                                           t_logp.half().float()).mean())
            row.update(kl_sampled=sampled, rel_error_sampled=abs(sampled - full) / full,
                       bytes_per_token_sampled=6 * (k + 1 + tail_samples))
        out["per_k"][str(k)] = row
    return out


def plot(summary: dict, path: str) -> bool:
    plt = pyplot()
    if plt is None:
        return False
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 4))
    names = list(summary["step_ms"])
    a1.bar(names, [summary["step_ms"][n] for n in names], color=["tab:blue", "tab:orange", "tab:green"][:len(names)])
    a1.set_ylabel("median step time, ms")
    a1.set_title("speedup " + ", ".join(f"{k} {v:.2f}x" for k, v in summary["cached_step_speedup"].items()))
    ks = sorted(summary["kl"]["per_k"], key=int)
    a2.plot([int(k) for k in ks], [summary["kl"]["per_k"][k]["rel_error"] for k in ks], "o-", label="top-k + tail mass")
    if summary["tail_samples"]:
        a2.plot([int(k) for k in ks], [summary["kl"]["per_k"][k]["rel_error_sampled"] for k in ks], "s-",
                label=f"top-k + {summary['tail_samples']} tail samples")
    a2.set_xscale("log", base=2)
    a2.set_xlabel("top-k")
    a2.set_ylabel("relative KL error vs full KL")
    a2.legend()
    a2.grid(True, alpha=0.3)
    return save_figure(fig, path)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=30, help="training steps per run")
    ap.add_argument("--batch", type=int, default=2, help="per-device batch size")
    ap.add_argument("--max_length", type=int, default=64, help="tokens per example")
    ap.add_argument("--examples", type=int, default=0, help="training paragraphs (default steps x batch)")
    ap.add_argument("--eval_examples", type=int, default=32, help="held-out paragraphs for perplexity")
    ap.add_argument("--top_k", type=int, default=32, help="k of the cache used for training")
    ap.add_argument("--repeats", type=int, default=2, help="training runs per variant, in alternating order (step "
                    "time: median over all of their steps)")
    ap.add_argument("--tail_samples", type=int, default=8, help="tail samples of the third run's cache "
                    "(0 = no third run)")
    ap.add_argument("--ks", default="8,32,128", help="k values for the KL error")
    ap.add_argument("--layers", type=int, default=10, help="student layers (copied from the teacher)")
    ap.add_argument("--temperature", type=float, default=1.0, help="KD temperature (cache build and training)")
    ap.add_argument("--alpha", type=float, default=1.0, help="KD weight (1 = pure distillation, no CE)")
    ap.add_argument("--heal_steps", type=int, default=40, help="SFT steps healing the layer-copied student "
                    "before both runs (0 = none)")
    ap.add_argument("--heal_lr", type=float, default=3e-4, help="learning rate of the healing SFT run")
    ap.add_argument("--results", default=RESULTS, help="folder for teacher_cache.{json,md,png}")
    args = ap.parse_args()
    sys.path.insert(0, ROOT)

    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""),
               DS_ACCELERATOR="cpu", GLOO_SOCKET_IFNAME="lo", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    paths = subprocess.run([sys.executable, "-m", "kd_engine.demo_data"], env=env, capture_output=True, text=True,
                           check=True).stdout.split()
    n = args.examples or args.steps * args.batch
    with tempfile.TemporaryDirectory() as tmp:
        train = os.path.join(tmp, "train.txt")
        lines = [ln for ln in open(paths[0], encoding="utf-8").read().splitlines() if ln.strip()][:n]
        open(train, "w", encoding="utf-8").write("\n".join(lines) + "\n")
        student = os.path.join(tmp, "student")
        from kd_engine.models.loading import load_model, load_tokenizer
        from kd_engine.models.student import create_student

        s = create_student(load_model(TEACHER, "causal_lm"), layers=args.layers)
        s.save_pretrained(student)
        load_tokenizer(TEACHER).save_pretrained(student)
        del s
        heal_s = 0.0
        if args.heal_steps > 0:
            heal = os.path.join(tmp, "heal")
            heal_s, _ = run([sys.executable, os.path.join(ROOT, "launch", "train.py"), "--method", "sft",
                             "--student", student, "--train_file", train, "--max_length", str(args.max_length),
                             "--max_steps", str(args.heal_steps), "--per_device_train_batch_size", str(args.batch),
                             "--learning_rate", str(args.heal_lr), "--logging_steps", "1", "--disable_tqdm", "true",
                             "--save_steps", "0", "--export", "true", "--output_dir", heal], env)
            student = os.path.join(heal, "final")
            if not os.path.exists(os.path.join(student, "tokenizer_config.json")):
                load_tokenizer(TEACHER).save_pretrained(student)
            print(f"healed student: {args.heal_steps} SFT steps in {heal_s:.0f} s", flush=True)
        caches, infos = {}, {}
        for name, m in (("cached", 0), ("cached_tail", args.tail_samples)):
            if name == "cached_tail" and not m:
                continue
            caches[name] = os.path.join(tmp, name + "_cache")
            build_s, _ = run([sys.executable, "-m", "kd_engine.teacher_cache", "--teacher", TEACHER,
                              "--train_file", train, "--output_dir", caches[name], "--top_k", str(args.top_k),
                              "--tail_samples", str(m), "--temperature", str(args.temperature),
                              "--max_length", str(args.max_length)], env)
            infos[name] = dict(json.load(open(os.path.join(caches[name], "complete.json"))), build_s=build_s)
            print(f"{name} cache: {infos[name]['tokens']} tokens, {infos[name]['bytes_per_token']} B/token, built in "
                  f"{build_s:.0f} s", flush=True)
        info = infos["cached"]
        common = ["--method", "kd", "--student", student, "--train_file", train, "--eval_file", paths[1],
                  "--max_eval_samples", str(args.eval_examples), "--max_length", str(args.max_length),
                  "--max_steps", str(args.steps), "--per_device_train_batch_size", str(args.batch),
                  "--learning_rate", "5e-5", "--temperature", str(args.temperature), "--alpha", str(args.alpha),
                  "--logging_steps", "1",
                  "--disable_tqdm", "true", "--save_steps", "0"]
        res = {}
        runs = [("online", ["--teacher", TEACHER, "--kd_loss_impl", "naive", "--export", "true"])]
        runs += [(name, ["--teacher_cache", c]) for name, c in caches.items()]
        steps, per_rep = {n: [] for n, _ in runs}, {n: [] for n, _ in runs}
        for rep in range(args.repeats):  # alternating order, so that drift of the machine hits every variant
            for name, extra in (runs if rep % 2 == 0 else runs[::-1]):
                out = os.path.join(tmp, name if rep == 0 else f"{name}_{rep}")
                wall, mib = run([sys.executable, os.path.join(ROOT, "launch", "train.py"), *common,
                                 "--output_dir", out, *extra], env)
                rows = log_rows(out, "train")[1:]
                steps[name] += rows
                ppl = math.exp(log_rows(out, "eval")[-1]["lm_loss"])
                per_rep[name].append(statistics.median(r["teacher_ms"] + r["student_ms"] for r in rows))
                if rep == 0:
                    res[name] = {"peak_rss_mib": mib, "wall_s": wall, "ppl": ppl}
                elif ppl != res[name]["ppl"]:
                    raise SystemExit(f"error: {name} ppl {ppl} in repeat {rep} vs {res[name]['ppl']}: not deterministic")
                print(f"{name} (repeat {rep}): step {per_rep[name][-1]:.0f} ms, peak RSS {mib:.0f} MiB, ppl {ppl:.3f}",
                      flush=True)
        for name in res:
            res[name].update(step_ms=statistics.median(r["teacher_ms"] + r["student_ms"] for r in steps[name]),
                             teacher_ms=statistics.median(r["teacher_ms"] for r in steps[name]),
                             step_ms_per_repeat=per_rep[name])
        ks = [int(k) for k in args.ks.split(",")]
        kl = kl_errors(os.path.join(tmp, "online", "final"), paths[1], ks, 8, args.max_length, args.temperature,
                       args.tail_samples)
        kl["at_init"] = kl_errors(student, paths[1], ks, 8, args.max_length, args.temperature, args.tail_samples)
    summary = {"steps": args.steps, "batch": args.batch, "max_length": args.max_length, "top_k": args.top_k,
               "student_layers": args.layers, "temperature": args.temperature, "alpha": args.alpha,
               "heal_steps": args.heal_steps, "heal_lr": args.heal_lr, "heal_s": heal_s, "tail_samples": args.tail_samples,
               "cache_tokens": info["tokens"], "cache_build_s": {k: v["build_s"] for k, v in infos.items()},
               "bytes_per_token": {k: v["bytes_per_token"] for k, v in infos.items()},
               "step_ms": {k: v["step_ms"] for k, v in res.items()},
               "peak_rss_mib": {k: v["peak_rss_mib"] for k, v in res.items()},
               "cached_step_speedup": {k: round(res["online"]["step_ms"] / res[k]["step_ms"], 3) for k in infos},
               "ppl_online": res["online"]["ppl"], **{f"ppl_{k}": res[k]["ppl"] for k in infos},
               "ppl_rel_diff": {k: abs(res[k]["ppl"] - res["online"]["ppl"]) / res["online"]["ppl"] for k in infos},
               "kl": kl, "kl_rel_error": {k: v["rel_error"] for k, v in kl["per_k"].items()}, "runs": res,
               "command": "python benchmarks/teacher_cache.py " + " ".join(sys.argv[1:])}
    os.makedirs(args.results, exist_ok=True)
    has_plot = plot(summary, os.path.join(args.results, "teacher_cache.png"))
    ks = sorted(kl["per_k"], key=int)
    m = args.tail_samples
    share = res["online"]["teacher_ms"] / res["online"]["step_ms"]
    summary["online_teacher_share"] = share
    summary["speedup_bound"] = 1 / (1 - share)  # the step without the teacher forward
    lines = [f"# Offline top-k teacher cache vs online teacher\n\n`{summary['command']}`\n\n",
             f"SmolLM2-135M -> {args.layers}-layer student, demo corpus, {args.steps} steps x {args.batch} x "
             f"{args.max_length} tokens, k={args.top_k} (fp16), T={args.temperature:g}, alpha={args.alpha:g}, all runs "
             f"from the same student healed by {args.heal_steps} SFT steps (lr {args.heal_lr:g}); `cached`: top-k + "
             f"tail mass, `cached_tail`: top-k + {m} tokens sampled from the teacher's tail (`--tail_samples {m}`)"
             f"\n\n| run | median step ms (each repeat) | speedup | peak RSS MiB | held-out ppl | ppl vs online | cache B/token |\n"
             f"|---|---|---|---|---|---|---|\n"]
    for k, v in res.items():
        sp = summary["cached_step_speedup"].get(k)
        rel = summary["ppl_rel_diff"].get(k)
        reps = " / ".join(f"{x:.0f}" for x in v["step_ms_per_repeat"])
        lines.append(f"| {k} | {v['step_ms']:.0f} ({reps}) | {f'{sp:.2f}' if sp else '-'} | {v['peak_rss_mib']:.0f} | "
                     f"{v['ppl']:.3f} | {f'{rel:+.2%}' if rel is not None else '-'} | "
                     f"{infos[k]['bytes_per_token'] if k in infos else '-'} |\n")
    lines.append(f"\nThe online teacher forward (its `teacher_ms`) is {share:.0%} of the online step: dropping it alone "
                 f"would be {summary['speedup_bound']:.2f}x; the cached runs also skip the teacher's full-vocabulary "
                 f"softmax in the loss.\n\n"
                 f"| k | KL rel. error, tail mass | + {m} tail samples | teacher top-k mass | bytes/token (+ samples) |\n"
                 f"|---|---|---|---|---|\n")
    for k in ks:
        r = kl["per_k"][k]
        lines.append(f"| {k} | {r['rel_error']:.4f} | {r.get('rel_error_sampled', float('nan')):.4f} | "
                     f"{r['teacher_top_k_mass']:.3f} | {r['bytes_per_token']} ({r.get('bytes_per_token_sampled', '-')})"
                     f" |\n")
    lines.append("\n(KL of the student after the online run vs the full KL on held-out tokens; at init: "
                 + ", ".join(f"k={k}: {kl['at_init']['per_k'][k]['rel_error']:.4f} / "
                             f"{kl['at_init']['per_k'][k].get('rel_error_sampled', float('nan')):.4f}" for k in ks)
                 + ")\n")
    with open(os.path.join(args.results, "teacher_cache.md"), "w") as f:
        f.write("".join(lines) + ("\n![teacher cache](teacher_cache.png)\n" if has_plot else ""))
    with open(os.path.join(args.results, "teacher_cache.json"), "w") as f:
        json.dump(summary, f, indent=1)
    print(f"results in {args.results}/teacher_cache.{{json,md}}" + (" and .png" if has_plot else ""))
    print(json.dumps({k: summary[k] for k in ("cached_step_speedup", "speedup_bound", "kl_rel_error",
                                              "bytes_per_token", "ppl_online", "ppl_rel_diff", "peak_rss_mib")}))


if __name__ == "__main__":
    main()
