"""Real launchers and exact resume after a real crash (SIGKILL), 1 and 2 ranks."""
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

import tiny
from kd_engine.dist import free_port

pytestmark = [pytest.mark.slow, pytest.mark.multirank]
TRAIN = os.path.abspath("launch/train.py")
BIN = os.path.dirname(sys.executable)


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    d = tmp_path_factory.mktemp("launch_assets")
    tiny.make_llama(str(d / "teacher"), layers=4, dropout=0.1)  # dropout on: RNG state must be restored
    tiny.write_lines(str(d / "train.txt"), tiny.sentences(40))
    tiny.write_lines(str(d / "eval.txt"), tiny.sentences(8, seed=1))
    tiny.ds_config_file(d / "zero3.json")
    return d


def args(assets, out, *extra):
    return ["--method", "kd", "--teacher", str(assets / "teacher"), "--student.layers", "2",
            "--train_file", str(assets / "train.txt"), "--eval_file", str(assets / "eval.txt"),
            "--output_dir", str(out), "--max_steps", "6", "--per_device_train_batch_size", "2",
            "--gradient_accumulation_steps", "2", "--learning_rate", "5e-3", "--warmup_steps", "2",
            "--logging_steps", "1", "--save_steps", "3", "--disable_tqdm", "true", *extra]


def launch(kind, nproc, argv, cache, env_extra=None, timeout=400):
    env = tiny.cpu_env({"KD_ENGINE_CACHE": str(cache), **(env_extra or {})})
    port = str(free_port())
    if kind == "python":
        cmd = [sys.executable, TRAIN]
    elif kind == "torchrun":
        cmd = [os.path.join(BIN, "torchrun"), "--nproc_per_node", str(nproc), "--master_addr", "127.0.0.1",
               "--master_port", port, TRAIN]
    elif kind == "deepspeed":
        cmd = [os.path.join(BIN, "deepspeed"), "--num_accelerators", str(nproc), "--master_port", port, TRAIN]
    elif kind == "mpirun":  # no MASTER_ADDR/PORT: rank 0 broadcasts them with mpi4py
        cmd = ["mpirun", "-np", str(nproc), "--allow-run-as-root", "--oversubscribe", "--mca", "btl", "self,vader",
               "--mca", "oob_tcp_if_include", "lo"]
        for k in ("OMP_NUM_THREADS", "DS_ACCELERATOR", "GLOO_SOCKET_IFNAME",
                  "KD_ENGINE_CACHE", "PATH", "HF_HUB_OFFLINE") + tuple(env_extra or ()):
            cmd += ["-x", k]
        cmd += [sys.executable, TRAIN]
    else:
        raise ValueError(kind)
    return subprocess.run(cmd + argv, env=env, capture_output=True, text=True, timeout=timeout)


def train_losses(out):
    by_step = {}
    for line in open(os.path.join(out, "train_log.jsonl")):
        r = json.loads(line)
        if r["split"] == "train":
            by_step[r["step"]] = r["loss"]  # a resumed run re-logs nothing before its checkpoint
    return [by_step[s] for s in sorted(by_step)]


def final_weights(out):
    return load_file(os.path.join(out, "final", "model.safetensors"))


@pytest.mark.parametrize("kind,nproc,extra", [("python", 1, []), ("torchrun", 2, ["--deepspeed", "ZERO3"])],
                         ids=["1rank-zero0", "2rank-zero3-zero3teacher"])
def test_exact_resume_after_kill(assets, tmp_path, kind, nproc, extra):
    extra = [str(assets / "zero3.json") if e == "ZERO3" else e for e in extra]
    straight, crashed = tmp_path / "straight", tmp_path / "crashed"
    r = launch(kind, nproc, args(assets, straight, *extra), tmp_path / "cache")
    assert r.returncode == 0, r.stderr[-3000:]
    r = launch(kind, nproc, args(assets, crashed, *extra), tmp_path / "cache", {"KD_ENGINE_CRASH_AT_STEP": "5"})
    assert r.returncode != 0  # killed while running step 5, after the step-3 checkpoint
    ck = sorted(os.listdir(crashed / "checkpoints"))
    assert ck == ["step-00000003"] and not (crashed / "final").exists()
    r = launch(kind, nproc, args(assets, crashed, "--resume", *extra), tmp_path / "cache")
    assert r.returncode == 0, r.stderr[-3000:]
    a, b = train_losses(straight), train_losses(crashed)
    assert len(a) == 6 and len(b) == 6
    assert a == b  # the same loss at every step, bit for bit
    wa, wb = final_weights(straight), final_weights(crashed)
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    # keep-last-k: save_total_limit 2 keeps steps 3 and 6
    assert sorted(os.listdir(crashed / "checkpoints")) == ["step-00000003", "step-00000006"]


def test_incomplete_checkpoint_is_ignored(assets, tmp_path):
    out = tmp_path / "o"
    r = launch("python", 1, args(assets, out, "--max_steps", "3"), tmp_path / "cache")
    assert r.returncode == 0, r.stderr[-3000:]
    # a checkpoint folder whose write never finished (no COMPLETE marker) must not be resumed from
    shutil.copytree(out / "checkpoints" / "step-00000003", out / "checkpoints" / "step-00000009")
    os.remove(out / "checkpoints" / "step-00000009" / "COMPLETE")
    r = launch("python", 1, args(assets, out, "--max_steps", "4", "--resume"), tmp_path / "cache")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "resumed from" in r.stderr and "step-00000003" in r.stderr


@pytest.mark.parametrize("kind", ["deepspeed", "mpirun"])
def test_two_ranks_zero2_under_each_launcher(assets, tmp_path, kind):
    if kind == "mpirun" and shutil.which("mpirun") is None:
        pytest.skip("mpirun not installed (apt-get install openmpi-bin)")
    out = tmp_path / "o"
    r = launch(kind, 2, args(assets, out, "--deepspeed", "ds_configs/zero2.json", "--max_steps", "2"),
               tmp_path / "cache")
    assert r.returncode == 0, (r.stdout[-2000:], r.stderr[-3000:])
    losses = train_losses(out)
    assert len(losses) == 2
    marker = json.load(open(out / "kd_run.json"))
    assert marker["method"] == "kd"
    # both ranks took part: the global batch is 2 ranks x 2 micro x 2 accumulation = 8 samples per step
    log = [json.loads(line) for line in open(out / "train_log.jsonl")]
    assert os.path.exists(out / "final" / "model.safetensors")
    assert any(r.get("samples_per_s", 0) > 0 for r in log)
    assert "world size 2" in (r.stdout + r.stderr) or "world_size=2" in (r.stdout + r.stderr)
