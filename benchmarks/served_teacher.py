"""A served teacher (--teacher_ranks 1) vs the offline cache vs a co-located replica, side by side in one run.

SmolLM2-135M teacher (offline package) -> a 10-layer student copied from it (``python -m kd_engine.shrink``), kd on
WikiText-2 lines (micro-batch 4 x 128 tokens, top-32 + 8 tail samples, fp32 rows), on this 2-core CPU with one
thread per process: the student pinned to core 0, the teacher rank to core 1. Runs, interleaved ``--repeats``
times so that load affects every side alike:

- ``cached``: one student process reading a cache built beforehand (same k, tail samples, seed);
- ``served``: global rank 0 serves the teacher, rank 1 trains (two independent processes, as on two nodes);
- ``colocated``: one process holding the student and a teacher replica (kd's default fused loss), for memory.

Figures (medians over repeats; step times are the train log's per-step times, first 2 steps dropped):

- ``teacher_hidden`` = 1 - (served step - cached step) / teacher forward time (the teacher rank's own timing of a
  forward plus rows): the share of the teacher's work hidden behind the student's step; target >= 0.9.
- ``teacher_hidden_vs_busy_core``: the same against a cached run whose other core runs teacher forwards (a cache
  build) at the same time: what remains is the service's own cost, not the two cores sharing caches and memory.
- ``student_rank_rss_ratio`` = peak RSS of the served run's student rank / the co-located process's; target <= 0.6.
- ``served_vs_cache_max_loss_diff``: largest |kd| or |ce| difference between served and cached runs, every step;
  target <= 1e-5.
- ``plan_error_max``: the capacity planner's largest relative error against measured peak memory at three sizes,
  read from ``benchmarks/plan_validation.py``'s last result (that benchmark measures it; not rerun here).

    python benchmarks/served_teacher.py [--steps 12] [--repeats 2]   # JSON last line; results/served_teacher.*
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import RESULTS, ROOT  # noqa: E402

TEACHER = "offline:smollm2-135m"
K, M, SEQ, MICRO = 32, 8, 128, 4
WIKI = os.path.join(ROOT, "..", "shared", "data", "wikitext-2-raw", "wiki.valid.raw")


def _env(extra=None) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                            "MASTER_PORT")}
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               DS_ACCELERATOR="cpu", GLOO_SOCKET_IFNAME="lo", PYTHONPATH=ROOT)
    env.update(extra or {})
    return env


def _spawn(core: int, argv: list[str], env: dict, log: str):
    f = open(log, "w")
    return subprocess.Popen(["taskset", "-c", str(core), sys.executable, *argv], env=env, stdout=f,
                            stderr=subprocess.STDOUT, cwd=ROOT), f


def _wait(proc, f, what: str) -> int:
    """Waits; returns the process's peak RSS in MiB (wait4's ru_maxrss of the taskset-exec'd python)."""
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    f.close()
    if proc.returncode != 0:
        raise SystemExit(f"{what} failed (exit {proc.returncode}); see {f.name}")
    return usage.ru_maxrss / 1024.0


def _prepare(work: str, steps: int) -> dict:
    os.makedirs(work, exist_ok=True)
    student, data, cache = (os.path.join(work, n) for n in ("student", "train.txt", "cache"))
    if not os.path.isfile(os.path.join(student, "config.json")):
        p, f = _spawn(0, ["-m", "kd_engine.shrink", "--teacher", TEACHER, "--layers", "10", "--output_dir", student],
                      _env(), os.path.join(work, "shrink.log"))
        _wait(p, f, "shrink")
    if not os.path.isfile(data):
        with open(WIKI, encoding="utf-8") as src:
            lines = [line.strip() for line in src if len(line.strip()) > 600]
        with open(data, "w", encoding="utf-8") as out:
            out.write("\n".join(lines[:MICRO * (steps + 8)]) + "\n")
        with open(data + ".busy", "w", encoding="utf-8") as out:  # the busy neighbour's: outlasts a training run
            out.write("\n".join(lines[:3 * MICRO * (steps + 8)]) + "\n")
    if not os.path.isfile(os.path.join(cache, "complete.json")):
        p, f = _spawn(1, ["-m", "kd_engine.teacher_cache", "--teacher", TEACHER, "--train_file", data,
                          "--output_dir", cache, "--top_k", str(K), "--tail_samples", str(M), "--temperature", "1.0",
                          "--max_length", str(SEQ), "--logp_dtype", "fp32", "--batch_size", str(MICRO)],
                      _env(), os.path.join(work, "cache.log"))
        _wait(p, f, "cache build")
    return {"student": student, "data": data, "cache": cache}


def _train_args(a: dict, out: str, steps: int, *extra) -> list[str]:
    return ["launch/train.py", "--method", "kd", "--student", a["student"], "--train_file", a["data"],
            "--output_dir", out, "--overwrite_output_dir", "true", "--max_steps", str(steps),
            "--per_device_train_batch_size", str(MICRO), "--max_length", str(SEQ), "--temperature", "1.0",
            "--alpha", "1.0", "--learning_rate", "1e-4", "--logging_steps", "1", "--disable_tqdm", "true",
            "--export", "false", "--save_total_limit", "1", "--report_to", "none", *extra]


def _log(out: str) -> list[dict]:
    with open(os.path.join(out, "train_log.jsonl"), encoding="utf-8") as f:
        return [r for r in map(json.loads, f) if r.get("split") == "train"]


def _step_ms(rows: list[dict]) -> float:
    return statistics.median(r["student_ms"] + r["teacher_ms"] for r in rows[2:])


def run_cached(a, work, steps, i, busy=False):
    """The student alone on core 0; ``busy``: while a cache build runs teacher forwards on core 1 (the load the
    served run's teacher puts on the shared caches and memory bus, without serving anything)."""
    import shutil

    out = os.path.join(work, f"cached{'_busy' if busy else ''}_{i}")
    neighbour = None
    if busy:
        scratch = os.path.join(work, f"busy_cache_{i}")
        shutil.rmtree(scratch, ignore_errors=True)
        neighbour = _spawn(1, ["-m", "kd_engine.teacher_cache", "--teacher", TEACHER, "--train_file",
                               a["data"] + ".busy", "--output_dir", scratch, "--top_k", str(K),
                               "--tail_samples", str(M), "--temperature", "1.0", "--max_length", str(SEQ),
                               "--logp_dtype", "fp32", "--batch_size", str(MICRO), "--chunk_size", "100000"],
                           _env(), scratch + ".log")
    p, f = _spawn(0, _train_args(a, out, steps, "--teacher_cache", a["cache"]), _env(), out + ".log")
    rss, rows = _wait(p, f, "cached run"), _log(out)
    if neighbour is not None:
        neighbour[0].kill()
        neighbour[0].wait()
        neighbour[1].close()
        shutil.rmtree(scratch, ignore_errors=True)
    return {"rss_mib": rss, "step_ms": _step_ms(rows), "losses": [(r["kd"], r.get("ce", 0.0)) for r in rows]}


def run_served(a, work, steps, i):
    from kd_engine.dist import free_port

    out, port = os.path.join(work, f"served_{i}"), str(free_port())
    argv = _train_args(a, out, steps, "--teacher", TEACHER, "--teacher_ranks", "1", "--teacher_top_k", str(K),
                       "--teacher_tail_samples", str(M))
    procs = [_spawn(1 - r, argv, _env({"RANK": str(r), "WORLD_SIZE": "2", "LOCAL_RANK": "0",
                                       "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port}), f"{out}.rank{r}.log")
             for r in (0, 1)]
    rss = [_wait(p, f, f"served run rank {r}") for r, (p, f) in enumerate(procs)]
    teacher_log = open(f"{out}.rank0.log", encoding="utf-8").read()
    fwd = float(teacher_log.split("micro-batches answered, ")[1].split(" ms")[0])
    rows = _log(out)
    return {"rss_mib": rss[1], "teacher_rss_mib": rss[0], "step_ms": _step_ms(rows), "teacher_forward_ms": fwd,
            "wait_ms": statistics.median(r["teacher_ms"] for r in rows[2:]),
            "losses": [(r["kd"], r.get("ce", 0.0)) for r in rows]}


def run_colocated(a, work, i):
    out = os.path.join(work, f"colocated_{i}")
    p, f = _spawn(0, _train_args(a, out, 4, "--teacher", TEACHER), _env(), out + ".log")
    return {"rss_mib": _wait(p, f, "co-located run")}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=12, help="training steps per cached / served run")
    ap.add_argument("--repeats", type=int, default=2, help="interleaved repeats of every run")
    ap.add_argument("--work", default=os.path.join(ROOT, "runs", "served_teacher"), help="work folder")
    args = ap.parse_args(argv)
    a = _prepare(args.work, args.steps)
    runs = {"cached": [], "cached_busy": [], "served": [], "colocated": []}
    for i in range(args.repeats):
        runs["cached"].append(run_cached(a, args.work, args.steps, i))
        runs["cached_busy"].append(run_cached(a, args.work, args.steps, i, busy=True))
        runs["served"].append(run_served(a, args.work, args.steps, i))
        runs["colocated"].append(run_colocated(a, args.work, i))

    def med(kind, key):
        return statistics.median(r[key] for r in runs[kind])

    cached_ms, served_ms, fwd_ms = med("cached", "step_ms"), med("served", "step_ms"), med("served",
                                                                                         "teacher_forward_ms")
    diff = max(abs(x - y) for s, c in zip(runs["served"], runs["cached"])
               for ps, pc in zip(s["losses"], c["losses"]) for x, y in zip(ps, pc))
    plan = json.load(open(os.path.join(RESULTS, "plan_validation.json"), encoding="utf-8"))["plan_error_max"]
    busy_ms = med("cached_busy", "step_ms")
    result = {"teacher_hidden": round(1.0 - (served_ms - cached_ms) / fwd_ms, 3),
              "teacher_hidden_vs_busy_core": round(1.0 - (served_ms - busy_ms) / fwd_ms, 3),
              "cached_busy_step_ms": round(busy_ms, 1),
              "student_rank_rss_ratio": round(med("served", "rss_mib") / med("colocated", "rss_mib"), 3),
              "served_vs_cache_max_loss_diff": diff, "plan_error_max": plan,
              "cached_step_ms": round(cached_ms, 1), "served_step_ms": round(served_ms, 1),
              "served_wait_ms": round(med("served", "wait_ms"), 1), "teacher_forward_ms": round(fwd_ms, 1),
              "student_rank_rss_mib": round(med("served", "rss_mib")), "cached_rss_mib":
              round(med("cached", "rss_mib")), "colocated_rss_mib": round(med("colocated", "rss_mib")),
              "teacher_rank_rss_mib": round(med("served", "teacher_rss_mib")), "steps": args.steps,
              "repeats": args.repeats, "load_avg_1min": round(os.getloadavg()[0], 2)}
    os.makedirs(RESULTS, exist_ok=True)
    with open(os.path.join(RESULTS, "served_teacher.json"), "w", encoding="utf-8") as f:
        json.dump({**result, "runs": runs}, f, indent=1)
    rows = [("teacher_hidden", ">= 0.9"), ("teacher_hidden_vs_busy_core", "(control)"),
            ("student_rank_rss_ratio", "<= 0.6"), ("served_vs_cache_max_loss_diff", "<= 1e-5"),
            ("plan_error_max", "<= 0.15")]
    md = ["# Served teacher (--teacher_ranks 1) vs offline cache vs co-located replica", "",
          f"`python benchmarks/served_teacher.py --steps {args.steps} --repeats {args.repeats}`: SmolLM2-135M -> "
          f"10-layer student, {MICRO} x {SEQ} tokens, top-{K} + {M} tail samples, one thread per process "
          f"(load average {result['load_avg_1min']} at the end).", "", "| figure | measured | target |",
          "|---|---|---|"]
    md += [f"| {k} | {result[k]} | {t} |" for k, t in rows]
    md += ["", "| run | step ms | peak RSS MiB |", "|---|---|---|",
           f"| cached (student only) | {result['cached_step_ms']} | {result['cached_rss_mib']} |",
           f"| cached, teacher forwards running on the other core | {result['cached_busy_step_ms']} | |",
           f"| served: student rank (waits {result['served_wait_ms']} ms/step) | {result['served_step_ms']} | "
           f"{result['student_rank_rss_mib']} |",
           f"| served: teacher rank ({result['teacher_forward_ms']} ms forward + rows) | | "
           f"{result['teacher_rank_rss_mib']} |",
           f"| co-located replica (4 steps, memory only) | | {result['colocated_rss_mib']} |"]
    with open(os.path.join(RESULTS, "served_teacher.md"), "w", encoding="utf-8") as f:
        f.write("\n".join(md) + "\n")
    print("\n".join(md))
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
