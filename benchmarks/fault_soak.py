"""Fault soak: kill -9 a training run at random moments (steps, checkpoint writes, the final export), resume it, and
check that the final weights are bit-identical to an uninterrupted run and train_log.jsonl identical (timings aside).

One uninterrupted reference run, then ``--kills`` trials (default 10). In each trial the run is started, killed
(SIGKILL, by this script) a random time after its first checkpoint appeared (uniform in [0, the reference run's
time from its first checkpoint to its exported model]; a run that finishes its export first is drawn again) and
started again with ``--resume`` until it finishes. A trial counts when it was killed and the resumed run's weights
and log match. Checkpoints every step (``--save_steps 1``), so many kills land inside a checkpoint write. What was
on disk at the kill (a half-written ``.tmp-step-*`` checkpoint, a half export, ...) is reported per trial.

    nice -n 5 python benchmarks/fault_soak.py              # 10 kills, 7.5 minutes on the 2 shared cores
    nice -n 5 python benchmarks/fault_soak.py --kills 3

Then ``--concurrent`` trials of two runs started at the same moment into one new folder (one trains to the
reference's weights, the other stops with one error, exit 2) and ``--disk_full`` trials with the run folder on a
tmpfs of 150-450 KiB that fills during the run (one error, no half-written checkpoint, and the folder copied to a
larger disk resumes bit-identical to the reference).

The last line printed is JSON with ``"kill_resume_bitwise": "k/N"``, ``concurrent_start_ok``, ``disk_full_ok``;
the same goes to
``benchmarks/results/fault_soak.{json,md}``.
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
RESULTS = os.path.join(HERE, "results")
TRAIN = os.path.join(ROOT, "launch", "train.py")
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests"))
TIMING = {"samples_per_s", "tokens_per_s", "teacher_ms", "student_ms"}


def make_assets(d: str) -> None:
    import tiny

    tiny.make_llama(os.path.join(d, "teacher"), layers=2, dropout=0.1)  # dropout: RNG state must resume exactly
    tiny.write_lines(os.path.join(d, "train.txt"), tiny.sentences(64))
    tiny.write_lines(os.path.join(d, "eval.txt"), tiny.sentences(8, seed=1))


def argv(d: str, out: str, steps: int, *extra: str) -> list[str]:
    return [sys.executable, TRAIN, "--method", "kd", "--teacher", os.path.join(d, "teacher"), "--student.layers", "1",
            "--train_file", os.path.join(d, "train.txt"), "--eval_file", os.path.join(d, "eval.txt"),
            "--output_dir", out, "--max_steps", str(steps), "--per_device_train_batch_size", "2",
            "--gradient_accumulation_steps", "2", "--learning_rate", "5e-3", "--logging_steps", "1",
            "--save_steps", "1", "--save_total_limit", "2", "--disable_tqdm", "true", *extra]


def env(d: str) -> dict:
    e = dict(os.environ)
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        e.pop(k, None)
    e.update(DS_ACCELERATOR="cpu", GLOO_SOCKET_IFNAME="lo", OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false",
             HF_HUB_OFFLINE="1", KD_ENGINE_CACHE=os.path.join(d, "cache"))
    return e


def weights(out: str) -> dict:
    from safetensors.torch import load_file

    return load_file(os.path.join(out, "final", "model.safetensors"))


def log_records(out: str) -> list[dict]:
    with open(os.path.join(out, "train_log.jsonl"), encoding="utf-8") as fh:
        rows = [json.loads(line) for line in fh]
    # the per-start run/restart_count record is left out: a resumed run starts once more than the reference
    return [{k: v for k, v in r.items() if k not in TIMING} for r in rows if r.get("split") != "run"]


def on_disk(out: str) -> str:
    """What a kill left behind."""
    if glob.glob(os.path.join(out, "checkpoints", ".tmp-step-*")):
        return "checkpoint write"
    if glob.glob(os.path.join(out, ".tmp-export-*")):
        return "final export"
    if os.path.isdir(os.path.join(out, "final")):
        return "after the export"
    if not glob.glob(os.path.join(out, "checkpoints", "step-*")):
        return "before the first checkpoint"
    return "a step"


def trial(d: str, out: str, steps: int, delay: float) -> dict:
    """Start a run, kill it ``delay`` seconds after its first checkpoint appeared, resume until it finishes."""
    e = env(d)
    proc = subprocess.Popen(argv(d, out, steps), env=e, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    first = os.path.join(out, "checkpoints", "step-00000001", "COMPLETE")
    t_first = None
    killed = False
    while proc.poll() is None:
        now = time.perf_counter()
        if t_first is None and os.path.exists(first):
            t_first = now
        if t_first is not None and now - t_first >= delay:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
            killed = True
            break
        time.sleep(0.01)
    where = on_disk(out) if killed else "not killed (finished first)"
    restarts = 0
    while not os.path.isdir(os.path.join(out, "final")) and restarts < 3:
        has_ck = bool(glob.glob(os.path.join(out, "checkpoints", "step-*", "COMPLETE")))
        extra = ["--resume"] if has_ck else (["--overwrite_output_dir"] if os.path.exists(out) else [])
        r = subprocess.run(argv(d, out, steps, *extra), env=e, capture_output=True, text=True, timeout=600)
        restarts += 1
        if r.returncode != 0:
            return {"delay_s": round(delay, 2), "killed_during": where, "ok": False,
                    "error": (r.stderr.strip().splitlines() or ["?"])[-1][:300]}
    return {"delay_s": round(delay, 2), "killed_during": where, "restarts": restarts}


def bitwise(out: str, w_ref: dict) -> bool:
    import torch

    w = weights(out)
    return w.keys() == w_ref.keys() and all(torch.equal(w[k], w_ref[k]) for k in w)


def concurrent_trial(d: str, out: str, steps: int, w_ref: dict) -> dict:
    """Two runs started at the same moment into one new folder: one must train (to the reference's weights), the
    other stop with one error and exit 2."""
    e = env(d)
    procs = [subprocess.Popen(argv(d, out, steps), env=e, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                              text=True) for _ in range(2)]
    errs = [p.communicate(timeout=600)[1] for p in procs]
    rcs = [p.returncode for p in procs]
    lines = [[x for x in err.splitlines() if x.startswith("error:")] for err in errs]
    loser = rcs.index(2) if sorted(rcs) == [0, 2] else None
    t = {"exit_codes": rcs, "loser_error": (lines[loser][0][:200] if loser is not None and lines[loser] else None)}
    t["ok"] = bool(loser is not None and len(lines[loser]) == 1 and "Traceback" not in errs[loser]
                   and bitwise(out, w_ref) and log_records(out) == log_records_ref_cache[0])
    return t


log_records_ref_cache: list = []


def disk_full_trial(d: str, out_parent: str, steps: int, size_kib: int, w_ref: dict, log_ref: list) -> dict:
    """The run folder on a tmpfs of ``size_kib``: it fills during the run; one error, the newest complete
    checkpoint kept; the folder copied to a larger disk resumes to the reference's weights and log."""
    from kd_engine.engine.checkpoint import latest_checkpoint

    mnt = os.path.join(out_parent, "fs")
    os.makedirs(mnt, exist_ok=True)
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_kib}k", "tmpfs", mnt], capture_output=True,
                       text=True)
    if r.returncode != 0:
        return {"size_kib": size_kib, "skipped": r.stderr.strip()[:200]}
    try:
        out = os.path.join(mnt, "run")
        p = subprocess.run(argv(d, out, steps), env=env(d), capture_output=True, text=True, timeout=600)
        lines = [x for x in p.stderr.splitlines() if x.startswith("error:")]
        ck = os.path.join(out, "checkpoints")
        temps = [n for n in os.listdir(ck) if n.startswith(".tmp-")] if os.path.isdir(ck) else []
        latest = latest_checkpoint(out)
        t = {"size_kib": size_kib, "exit_code": p.returncode, "error": lines[0][:200] if lines else None,
             "one_error": len(lines) == 1 and "Traceback" not in p.stderr, "leftover_temporaries": temps,
             "latest_step": latest[0] if latest else None}
        roomy = os.path.join(out_parent, "roomy")
        shutil.copytree(out, roomy)
    finally:
        subprocess.run(["umount", "-l", mnt], capture_output=True)
    if p.returncode == 0:  # the disk did not fill: nothing to check
        t["ok"] = None
        return t
    extra = ["--resume"] if t["latest_step"] else ["--overwrite_output_dir"]
    r2 = subprocess.run(argv(d, roomy, steps, *extra), env=env(d), capture_output=True, text=True, timeout=600)
    t["resumed_ok"] = r2.returncode == 0
    t["ok"] = bool(p.returncode == 2 and t["one_error"] and not temps and t["resumed_ok"] and bitwise(roomy, w_ref)
                   and log_records(roomy) == log_ref)
    return t


def run_preemption_part(n: int):
    """SLURM preemption (benchmarks/slurm_preempt.py): one 2-node job on the local cluster preempted ``n`` times;
    None when ``n`` is 0."""
    if n <= 0:
        return None
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from slurm_preempt import run_preemptions

    return run_preemptions(n)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--kills", type=int, default=10, help="number of kill -9 / resume trials")
    ap.add_argument("--steps", type=int, default=24, help="optimizer steps per run (a checkpoint after each)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the kill delays")
    ap.add_argument("--keep", action="store_true", help="keep the temporary folder")
    ap.add_argument("--preemptions", type=int, default=3,
                    help="SLURM preemptions of one job on the local cluster (0: skip; needs root for the cluster)")
    ap.add_argument("--concurrent", type=int, default=3, help="trials of two runs started at once into one folder")
    ap.add_argument("--disk_full", type=int, default=3,
                    help="trials with the run folder on a small tmpfs that fills up (needs root to mount)")
    args = ap.parse_args()
    import torch

    rng = random.Random(args.seed)
    d = tempfile.mkdtemp(prefix="fault_soak-")
    try:
        make_assets(d)
        ref = os.path.join(d, "reference")
        t0 = time.perf_counter()
        proc = subprocess.Popen(argv(d, ref, args.steps), env=env(d), stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE, text=True)
        first_ck = final = None
        while proc.poll() is None:
            if first_ck is None and os.path.exists(os.path.join(ref, "checkpoints", "step-00000001", "COMPLETE")):
                first_ck = time.perf_counter() - t0
            if final is None and os.path.isdir(os.path.join(ref, "final")):
                final = time.perf_counter() - t0
            time.sleep(0.01)
        ref_s = time.perf_counter() - t0
        if proc.returncode != 0 or first_ck is None or final is None:
            print(proc.stderr.read()[-3000:], file=sys.stderr)
            return 1
        w_ref, log_ref = weights(ref), log_records(ref)
        trials = []
        for i in range(args.kills):
            out = os.path.join(d, f"trial{i}")
            for attempt in range(3):  # a run that finished before its kill is drawn again (timings vary under load)
                shutil.rmtree(out, ignore_errors=True)
                # a moment between the first checkpoint and the export's end: steps, checkpoint writes, the export
                t = trial(d, out, args.steps, rng.uniform(0.0, final - first_ck))
                if t["killed_during"] not in ("not killed (finished first)", "after the export"):
                    break
            if t.get("ok", True):
                w = weights(out)
                t["bitwise"] = w.keys() == w_ref.keys() and all(torch.equal(w[k], w_ref[k]) for k in w)
                t["log_identical"] = log_records(out) == log_ref
                t["leftover_temporaries"] = sorted(os.path.basename(p) for p in glob.glob(os.path.join(out, ".tmp-*"))
                                                   + glob.glob(os.path.join(out, "checkpoints", ".tmp-*")))
            else:
                t["bitwise"] = t["log_identical"] = False
            trials.append(t)
            print(f"trial {i}: killed {t['delay_s']} s after the first checkpoint, during {t['killed_during']}: "
                  f"bitwise={t['bitwise']} log_identical={t['log_identical']}", flush=True)
        log_records_ref_cache[:] = [log_ref]
        concurrent = []
        for i in range(args.concurrent):
            c = concurrent_trial(d, os.path.join(d, f"concurrent{i}"), args.steps, w_ref)
            concurrent.append(c)
            print(f"concurrent {i}: exit codes {c['exit_codes']}, ok={c['ok']}: {c['loser_error']}", flush=True)
        full = []
        for i in range(args.disk_full):
            size = rng.randint(150, 450)  # KiB: the disk fills at different checkpoints / writes
            f = disk_full_trial(d, os.path.join(d, f"diskfull{i}"), args.steps, size, w_ref, log_ref)
            full.append(f)
            print(f"disk full {i}: {size} KiB, exit {f.get('exit_code')}, latest step {f.get('latest_step')}, "
                  f"ok={f.get('ok')}: {f.get('error') or f.get('skipped')}", flush=True)
    finally:
        if not args.keep:
            shutil.rmtree(d, ignore_errors=True)
    ok = sum(1 for t in trials if t["bitwise"] and t["log_identical"] and not t.get("leftover_temporaries")
             and t["killed_during"] not in ("not killed (finished first)", "after the export"))
    summary = {"kill_resume_bitwise": f"{ok}/{len(trials)}", "reference_wall_s": round(ref_s, 1),
               "reference_first_checkpoint_s": round(first_ck, 2), "reference_export_done_s": round(final, 2),
               "steps": args.steps, "seed": args.seed,
               "killed_during": {w: sum(1 for t in trials if t["killed_during"] == w)
                                 for w in sorted({t["killed_during"] for t in trials})}}
    summary["concurrent_start_ok"] = f"{sum(1 for c in concurrent if c['ok'])}/{len(concurrent)}"
    ran = [f for f in full if f.get("ok") is not None]
    summary["disk_full_ok"] = f"{sum(1 for f in ran if f['ok'])}/{len(ran)}"
    summary["disk_full_not_filled"] = sum(1 for f in full if f.get("ok") is None)
    preempt = run_preemption_part(args.preemptions)
    if preempt is not None:
        summary["preempt_requeue_ok"] = preempt.get("preempt_requeue_ok")
        summary["preemption"] = preempt
    os.makedirs(RESULTS, exist_ok=True)
    cmd = "nice -n 5 python benchmarks/fault_soak.py " + " ".join(sys.argv[1:])
    with open(os.path.join(RESULTS, "fault_soak.json"), "w", encoding="utf-8") as fh:
        json.dump({"command": cmd.strip(), "summary": summary, "trials": trials, "concurrent": concurrent,
                   "disk_full": full}, fh, indent=2)
    rows = [f"| {i} | {t['delay_s']} | {t['killed_during']} | {t['bitwise']} | {t['log_identical']} |"
            for i, t in enumerate(trials)]
    with open(os.path.join(RESULTS, "fault_soak.md"), "w", encoding="utf-8") as fh:
        fh.write(f"# Fault soak\n\n`{cmd.strip()}`\n\nkill -9 then --resume, final weights bit-identical to an "
                 f"uninterrupted run: **{summary['kill_resume_bitwise']}** (reference run {ref_s:.1f} s, "
                 f"{args.steps} steps, a checkpoint after each).\n\n| trial | kill (s after the 1st checkpoint) | "
                 "killed during | bitwise | log identical |\n|---|---|---|---|---|\n" + "\n".join(rows) + "\n"
                 f"\nTwo runs started at once into one folder: **{summary['concurrent_start_ok']}** with one trained "
                 f"(weights and log equal to the reference) and the other refused with one error.\n"
                 f"\nRun folder on a small tmpfs that fills up: **{summary['disk_full_ok']}** with one error, no "
                 f"half-written checkpoint left, and a resume (folder copied to a larger disk) ending bit-identical "
                 f"to the reference ({summary['disk_full_not_filled']} trial(s) did not fill).\n")
    print(json.dumps(summary))
    good = ok == len(trials) and all(c["ok"] for c in concurrent) and all(f["ok"] for f in ran)
    return 0 if good else 1


if __name__ == "__main__":
    sys.exit(main())
