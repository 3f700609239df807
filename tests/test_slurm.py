"""kd_engine under a real SLURM (two slurmd "nodes" on this machine, scripts/slurm/local_cluster.sh): a 2-node
ZeRO-3 KD job, preemption by `scancel --signal=USR1 --batch` and by a higher-priority partition (checkpoint,
requeue, the same job restarts and resumes, final weights bit-identical to an uninterrupted run), and a 2-"node"
torchrun job without SLURM."""
import json
import os
import re
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

import slurm_cluster
import tiny
from kd_engine.dist import free_port

pytestmark = [pytest.mark.slow, pytest.mark.multirank]
SBATCH = os.path.abspath("scripts/slurm/train.sbatch")
STEPS = 40


@pytest.fixture(scope="session")
def cluster():
    """The local 2-node cluster: started (installed when missing, as root) once per session, stopped at the end
    when this session started it; skipped with the reason only where it cannot run (not root / no apt)."""
    c, reason = slurm_cluster.start()
    if c is None:
        pytest.skip(f"no local SLURM cluster: {reason}")
    yield c
    slurm_cluster.stop(c)


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    d = tmp_path_factory.mktemp("slurm_assets")
    tiny.make_llama(str(d / "teacher"), layers=4, dropout=0.1)  # dropout on: per-rank RNG must be restored
    tiny.make_llama(str(d / "student"), layers=2, seed=1, dropout=0.1)  # for the teacher-group job
    tiny.write_lines(str(d / "train.txt"), tiny.sentences(200))
    tiny.write_lines(str(d / "eval.txt"), tiny.sentences(8, seed=1))
    z3 = json.load(open("ds_configs/zero3.json"))
    z3["zero_optimization"]["stage3_param_persistence_threshold"] = 0  # partition the tiny student for real
    z3["optimizer"]["params"]["torch_adam"] = True
    (d / "zero3.json").write_text(json.dumps(z3))
    (d / "logs").mkdir()
    return d


def train_args(assets):
    return ["--method", "kd", "--teacher", str(assets / "teacher"), "--student.layers", "2",
            "--train_file", str(assets / "train.txt"), "--eval_file", str(assets / "eval.txt"),
            "--max_steps", str(STEPS), "--per_device_train_batch_size", "2", "--learning_rate", "5e-3",
            "--logging_steps", "1", "--save_steps", "100", "--disable_tqdm", "true",
            "--deepspeed", str(assets / "zero3.json")]


def job_env(cluster, assets, out, **extra):
    env = tiny.cpu_env({"KD_ENGINE_CACHE": str(assets / "cache"), "PYTHONPATH": os.getcwd(),
                        "SLURM_CONF": cluster.env["SLURM_CONF"], "OUTPUT_DIR": str(out), **extra})
    return {k: v for k, v in env.items() if not (k.startswith("SLURM_") and k != "SLURM_CONF")}


def submit(cluster, assets, out, *sbatch_opts, **env_extra):
    return cluster.sbatch("--nodes", "2", "--output", str(assets / "logs" / "%j.out"), *sbatch_opts, SBATCH,
                          *train_args(assets), env=job_env(cluster, assets, out, **env_extra))


def log_of(assets, job):
    return (assets / "logs" / f"{job}.out").read_text()


def wait_for_step(out, step, timeout=240):
    t0, path = time.time(), out / "train_log.jsonl"
    while time.time() - t0 < timeout:
        if path.exists() and any(json.loads(line).get("step", 0) >= step and json.loads(line)["split"] == "train"
                                 for line in path.read_text().splitlines() if line.strip()):
            return
        time.sleep(0.1)
    raise AssertionError(f"{path} never reached step {step}")


def rows(out, split):
    return [json.loads(line) for line in open(out / "train_log.jsonl") if json.loads(line)["split"] == split]


def weights(out):
    return load_file(str(out / "final" / "model.safetensors"))


def same_weights(a, b):
    wa, wb = weights(a), weights(b)
    return wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


@pytest.fixture(scope="module")
def reference(cluster, assets, tmp_path_factory):
    """An uninterrupted 2-node run: sbatch --nodes 2, torchrun per node, ZeRO-3 student + ZeRO-3 teacher."""
    out = tmp_path_factory.mktemp("ref") / "run"
    job = submit(cluster, assets, out)
    info = cluster.wait(job)
    return job, info, out


def test_two_node_zero3_job_completes_and_exports(reference, assets):
    job, info, out = reference
    log = log_of(assets, job)
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", log[-3000:]
    assert info["NumNodes"] == "2" and info["NodeList"] == "node[1-2]"
    assert "world size 2 | ZeRO stage 3" in log and "(ZeRO-3 partitioned)" in log
    assert "2 node(s) x 1 rank(s), torchrun" in log
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(out / "final"))
    assert model.config.num_hidden_layers == 2
    assert [r["step"] for r in rows(out, "train")] == list(range(1, STEPS + 1))


def _check_preempted_run(cluster, assets, job, out, reference, signame):
    info = cluster.wait(job, timeout=400)
    log = log_of(assets, job)
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", log[-4000:]
    assert info["Restarts"] == "1", log[-4000:]  # the same job id ran twice
    m = re.search(r"stopped by (\w+) at step (\d+) \([\d.]+ s after the signal\); checkpoint (\S+); (.*)", log)
    assert m and m.group(1) == signame, log[-4000:]
    step = int(m.group(2))
    assert 3 <= step < STEPS and m.group(3).endswith(f"step-{step:08d}")
    assert "restart 1: 2 node(s)" in log and f"resumed from {m.group(3)} at step {step}" in log
    assert [r["step"] for r in rows(out, "train")] == list(range(1, STEPS + 1))  # no duplicate/missing step
    assert [(r["step"], r["restart_count"]) for r in rows(out, "run")] == [(0, 0.0), (step, 1.0)]
    assert same_weights(out, reference[2])  # bit-identical to the uninterrupted run
    return m


def test_scancel_usr1_checkpoints_requeues_and_resumes_exactly(cluster, assets, reference, tmp_path):
    # an array task (requeued as ARRAYJOB_TASK) with the default per-task output folder under OUTPUT_ROOT, and
    # one srun task per rank (SLURM_PROCID -> RANK)
    env = job_env(cluster, assets, "", LAUNCHER="srun", OUTPUT_ROOT=str(tmp_path))
    del env["OUTPUT_DIR"]
    array_job = cluster.sbatch("--nodes", "2", "--array", "5", "--job-name", "pre", "--output",
                               str(assets / "logs" / "%A_%a.out"), SBATCH, *train_args(assets), env=env)
    job, out = f"{array_job}_5", tmp_path / f"pre-{array_job}_5"
    wait_for_step(out, 3)
    cluster.run("scancel", "--signal=USR1", "--batch", job)
    m = _check_preempted_run(cluster, assets, job, out, reference, "SIGUSR1")
    assert m.group(4) == f"requeueing SLURM job {job}"
    assert "2 node(s) x 1 rank(s), srun" in log_of(assets, job)


def test_teacher_group_on_node_0_is_preempted_requeued_and_finishes_bit_identical(cluster, assets, tmp_path):
    """TEACHER_NODES=1: the teacher serves from node 0 (global rank 0), the student trains on node 1 (ZeRO-3).
    An uninterrupted job, then one stopped by USR1 at step >= 3: the teacher keeps serving through the student's
    checkpoint, both exit, the job requeues, resumes and exports weights equal to the uninterrupted job's."""
    args = [a for a in train_args(assets)]
    i = args.index("--student.layers")
    args[i:i + 2] = ["--student", str(assets / "student"), "--teacher_top_k", "8", "--teacher_tail_samples", "4"]

    def job(out):
        return cluster.sbatch("--nodes", "2", "--output", str(assets / "logs" / "%j.out"), SBATCH, *args,
                              env=job_env(cluster, assets, out, TEACHER_NODES="1"))

    ref = tmp_path / "ref"
    first = job(ref)
    info, log = cluster.wait(first), log_of(assets, first)
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", log[-4000:]
    assert "teacher group on the first 1 node(s) (1 rank(s)), students on the other 1" in log
    assert "world size 1 | ZeRO stage 3" in log and "served by global ranks 0-0" in log
    out = tmp_path / "pre"
    second = job(out)
    wait_for_step(out, 3)
    cluster.run("scancel", "--signal=USR1", "--batch", second)
    _check_preempted_run(cluster, assets, second, out, (first, info, ref), "SIGUSR1")
    assert "teacher rank 0: SIGUSR1 received" in log_of(assets, second)


def test_partition_priority_preemption_resumes_exactly(cluster, assets, reference, tmp_path):
    out = tmp_path / "run"
    job = submit(cluster, assets, out)
    wait_for_step(out, 3)
    high = cluster.sbatch("-p", "high", "--nodes", "2", "--exclusive", "--output", "/dev/null", "--wrap", "sleep 1")
    _check_preempted_run(cluster, assets, job, out, reference, "SIGTERM")
    assert cluster.wait(high)["JobState"] == "COMPLETED"


def test_plain_scancel_checkpoints_and_stays_cancelled(cluster, assets, tmp_path):
    """`scancel JOB` sends TERM like a preemption, but the job is ending: checkpoint, no requeue. Run under
    DeepSpeed's launcher (--no_ssh --node_rank per node)."""
    out = tmp_path / "run"
    job = submit(cluster, assets, out, LAUNCHER="deepspeed")
    wait_for_step(out, 3)
    cluster.run("scancel", job)
    info = cluster.wait(job, states=("CANCELLED",), timeout=120)
    time.sleep(1)
    log = log_of(assets, job)
    assert "2 node(s) x 1 rank(s), deepspeed" in log and "world size 2 | ZeRO stage 3" in log
    m = re.search(r"stopped by SIGTERM at step (\d+) .*; checkpoint (\S+); not requeued \(job cancelled", log)
    assert m, log[-3000:]
    assert info["Restarts"] == "0" and os.path.isfile(os.path.join(m.group(2), "COMPLETE"))
    time.sleep(8)  # a requeued job would be back by now (cred_expire=5, sched_interval=1)
    assert cluster.job(job)["JobState"] == "CANCELLED" and cluster.job(job)["Restarts"] == "0"


def test_torchrun_two_nodes_on_localhost_without_slurm(assets, tmp_path):
    out, port = tmp_path / "run", str(free_port())
    env = tiny.cpu_env({"KD_ENGINE_CACHE": str(assets / "cache"), "PYTHONPATH": os.getcwd()})
    env = {k: v for k, v in env.items() if not k.startswith("SLURM_")}
    args = train_args(assets) + ["--output_dir", str(out), "--max_steps", "3"]
    torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
    procs = [subprocess.Popen([torchrun, "--nnodes", "2", "--node_rank", str(n), "--nproc_per_node", "1",
                               "--master_addr", "127.0.0.1", "--master_port", port, "launch/train.py", *args],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for n in (0, 1)]
    logs = [p.communicate(timeout=400)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], logs[0][-3000:] + logs[1][-3000:]
    assert "world size 2 | ZeRO stage 3" in logs[0]
    assert [r["step"] for r in rows(out, "train")] == [1, 2, 3] and (out / "final" / "model.safetensors").exists()


def test_time_limit_without_a_warning_signal_checkpoints_and_requeues(cluster, assets, tmp_path):
    """No USR1 before the limit (`--signal CONT@5`: a signal nobody acts on): at the time limit SLURM sends TERM with
    the job COMPLETING, Reason=TimeLimit; the ranks checkpoint, rank 0 requeues, the job restarts and resumes."""
    out = tmp_path / "run"
    job = cluster.sbatch("--nodes", "1", "--time", "1", "--signal", "CONT@5", "--output",
                         str(assets / "logs" / "%j.out"), SBATCH, *train_args(assets), "--max_steps", "1000000",
                         "--logging_steps", "50", env=job_env(cluster, assets, out))
    t0 = time.time()
    log = ""
    while time.time() - t0 < 300:
        log = log_of(assets, job) if (assets / "logs" / f"{job}.out").exists() else ""
        if re.search(r"resumed from \S+ at step \d+", log):
            break
        time.sleep(1)
    cluster.run("scancel", job)
    m = re.search(r"stopped by SIGTERM at step (\d+) .*; checkpoint (\S+); requeueing SLURM job", log)
    assert m, log[-3000:]
    r = re.search(r"resumed from (\S+) at step (\d+)", log)
    assert r, log[-3000:]
    assert r.group(2) == m.group(1) and os.path.basename(r.group(1)) == os.path.basename(m.group(2))
    assert "restart 1:" in log and "DUE TO TIME LIMIT" in log


@pytest.mark.parametrize("launcher", ["torchrun", "deepspeed"])
def test_a_stop_without_requeue_reports_75_under_every_launcher(cluster, assets, tmp_path, launcher):
    """torchrun and DeepSpeed's launcher turn a rank's exit 75 into their own failure code; train.sbatch reports 75
    (stopped after a checkpoint, run again) from rank 0's stopped.json."""
    out = tmp_path / "run"
    job = cluster.sbatch("--nodes", "2", "--output", str(assets / "logs" / "%j.out"), SBATCH, *train_args(assets),
                         "--requeue_on_stop", "false", env=job_env(cluster, assets, out, LAUNCHER=launcher))
    wait_for_step(out, 3)
    cluster.run("scancel", "--signal=USR1", "--batch", job)
    info = cluster.wait(job, timeout=180)
    log = log_of(assets, job)
    assert info["ExitCode"] == "75:0" and info["Restarts"] == "0", log[-3000:]
    assert "job step exited with 75" in log
    stopped = json.load(open(out / "stopped.json"))
    assert stopped["signal"] == "SIGUSR1" and stopped["requeue"] is False and stopped["exit_code"] == 75
    assert os.path.isfile(os.path.join(stopped["checkpoint"], "COMPLETE"))
