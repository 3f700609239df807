"""SLURM preemption soak: one 2-node ZeRO-3 KD job (scripts/slurm/train.sbatch) preempted N times with
`scancel --signal=USR1 --batch`; each preemption must checkpoint, requeue the same job id, restart with
SLURM_RESTART_COUNT=i and resume from that checkpoint; the job must then finish.

    python benchmarks/slurm_preempt.py --n 3          # starts scripts/slurm/local_cluster.sh when needed
Last line JSON: {"preempt_requeue_ok": "k/n", "signal_to_stop_s": [...], "signal_to_exit_s": [...], ...};
report in benchmarks/results/slurm_preempt.json. ``run_preemptions(n)`` is what benchmarks/fault_soak.py calls.
signal_to_stop_s: from `scancel` to the ranks' stop decision (the engine's log line, measured in the job);
signal_to_exit_s: from `scancel` until slurmctld no longer shows the job RUNNING (checkpoint written, requeued).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests"))


def _assets(d: str) -> None:
    import tiny

    tiny.make_llama(os.path.join(d, "teacher"), layers=4, dropout=0.1)
    tiny.write_lines(os.path.join(d, "train.txt"), tiny.sentences(400))
    with open(os.path.join(ROOT, "ds_configs", "zero3.json")) as fh:
        z3 = json.load(fh)
    z3["zero_optimization"]["stage3_param_persistence_threshold"] = 0
    z3["optimizer"]["params"]["torch_adam"] = True
    with open(os.path.join(d, "zero3.json"), "w") as fh:
        json.dump(z3, fh)


def _max_step(out: str) -> int:
    path = os.path.join(out, "train_log.jsonl")
    if not os.path.exists(path):
        return 0
    steps = [json.loads(line).get("step", 0) for line in open(path) if '"split": "train"' in line]
    return max(steps, default=0)


def run_preemptions(n: int = 3, steps: int = 200, timeout: float = 900) -> dict:
    """Preempt one job n times; returns the figures (see the module docstring)."""
    cwd = os.getcwd()
    os.chdir(ROOT)
    import slurm_cluster
    import tiny

    cluster, reason = slurm_cluster.start()
    if cluster is None:
        os.chdir(cwd)
        return {"preempt_requeue_ok": f"0/{n}", "skipped": reason}
    work = tempfile.mkdtemp(prefix="kd_preempt_")
    try:
        _assets(work)
        out, log = os.path.join(work, "run"), os.path.join(work, "job.out")
        env = tiny.cpu_env({"KD_ENGINE_CACHE": os.path.join(work, "cache"), "PYTHONPATH": ROOT,
                            "SLURM_CONF": cluster.env["SLURM_CONF"], "OUTPUT_DIR": out})
        env = {k: v for k, v in env.items() if not (k.startswith("SLURM_") and k != "SLURM_CONF")}
        job = cluster.sbatch(
            "--nodes", "2", "--output", log, os.path.join(ROOT, "scripts", "slurm", "train.sbatch"),
            "--method", "kd", "--teacher", os.path.join(work, "teacher"), "--student.layers", "2",
            "--train_file", os.path.join(work, "train.txt"), "--max_steps", str(steps),
            "--per_device_train_batch_size", "2", "--logging_steps", "1", "--save_steps", "1000",
            "--disable_tqdm", "true", "--deepspeed", os.path.join(work, "zero3.json"), env=env)
        ok, to_stop, to_exit, stopped_at = 0, [], [], []
        t_end = time.time() + timeout
        for i in range(1, n + 1):
            last = stopped_at[-1] if stopped_at else 0
            while _max_step(out) < last + 3:  # this start trained a little past its resume point
                if time.time() > t_end or cluster.job(job).get("JobState") in ("COMPLETED", "FAILED", "CANCELLED"):
                    break
                time.sleep(0.1)
            t0 = time.time()
            cluster.run("scancel", "--signal=USR1", "--batch", job)
            while cluster.job(job).get("JobState") == "RUNNING" and time.time() < t_end:
                time.sleep(0.05)
            to_exit.append(round(time.time() - t0, 2))
            # wait for the restart with SLURM_RESTART_COUNT=i to resume
            while time.time() < t_end:
                text = open(log).read() if os.path.exists(log) else ""
                if text.count("resumed from") >= i or cluster.job(job).get("JobState") in ("COMPLETED", "FAILED"):
                    break
                time.sleep(0.2)
            text = open(log).read()
            stops = re.findall(r"stopped by SIGUSR1 at step (\d+) \(([\d.]+) s after the signal\); checkpoint (\S+); "
                               r"requeueing SLURM job (\S+)", text)
            resumes = re.findall(r"resumed from (\S+) at step (\d+)", text)
            good = (len(stops) == i and len(resumes) == i and stops[-1][3] == job and resumes[-1][0] == stops[-1][2]
                    and f"restart {i}:" in text and int(cluster.job(job).get("Restarts", -1)) == i)
            ok += good
            if stops:
                stopped_at.append(int(stops[-1][0]))
                to_stop.append(float(stops[-1][1]))
        final = cluster.wait(job, timeout=max(t_end - time.time(), 30))
        text = open(log).read()
        return {"preempt_requeue_ok": f"{ok}/{n}", "signal_to_stop_s": to_stop, "signal_to_exit_s": to_exit,
                "stopped_at_steps": stopped_at, "final_state": final.get("JobState"),
                "final_exit_code": final.get("ExitCode"), "restarts": int(final.get("Restarts", 0)),
                "finished_all_steps": _max_step(out) == steps and "done: " in text}
    finally:
        slurm_cluster.stop(cluster)
        shutil.rmtree(work, ignore_errors=True)
        os.chdir(cwd)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=3, help="number of preemptions of the one job")
    ap.add_argument("--steps", type=int, default=200, help="training steps of the job")
    args = ap.parse_args()
    res = run_preemptions(args.n, args.steps)
    res["command"] = f"python benchmarks/slurm_preempt.py --n {args.n} --steps {args.steps}"
    os.makedirs(os.path.join(ROOT, "benchmarks", "results"), exist_ok=True)
    path = os.path.join(ROOT, "benchmarks", "results", "slurm_preempt.json")
    with open(path, "w") as fh:
        json.dump(res, fh, indent=2)
    print(f"report: {path}")
    print(json.dumps(res))


if __name__ == "__main__":
    main()
