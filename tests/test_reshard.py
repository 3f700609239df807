"""Resume on a different world size: a 2-rank ZeRO-2 run killed after its step-3 checkpoint continues on 1 rank
through DeepSpeed's universal checkpoint; the global batch is kept (accumulation 2 -> 4) and the loss continues
within a tolerance of the uninterrupted 2-rank run (not bitwise)."""
import json
import os
import subprocess
import sys

import pytest
from safetensors.torch import load_file

import tiny
from kd_engine.dist import free_port

pytestmark = [pytest.mark.slow, pytest.mark.multirank]
TRAIN = os.path.abspath("launch/train.py")


def _run(nproc, argv, cache, env_extra=None):
    env = tiny.cpu_env({"KD_ENGINE_CACHE": str(cache), **(env_extra or {})})
    cmd = [sys.executable, TRAIN] if nproc == 1 else [
        os.path.join(os.path.dirname(sys.executable), "torchrun"), "--nproc_per_node", str(nproc),
        "--master_addr", "127.0.0.1", "--master_port", str(free_port()), TRAIN]
    return subprocess.run(cmd + argv, env=env, capture_output=True, text=True, timeout=400)


def _eval(out):
    return [r for r in map(json.loads, open(out / "train_log.jsonl")) if r["split"] == "eval"][-1]


def _losses(out):
    return {r["step"]: r["loss"] for r in map(json.loads, open(out / "train_log.jsonl")) if r["split"] == "train"}


@pytest.mark.parametrize("stage", [2, 3])  # the universal-checkpoint path (ZeRO-0 loads directly); ZeRO-3 with
def test_two_ranks_to_one_keeps_the_global_batch_and_the_loss(tmp_path, stage):  # every parameter partitioned
    tiny.make_llama(str(tmp_path / "teacher"), layers=2)
    tiny.write_lines(str(tmp_path / "train.txt"), tiny.sentences(64))
    tiny.write_lines(str(tmp_path / "eval.txt"), tiny.sentences(8, seed=1))
    ds = tiny.ds_config_file(tmp_path / "ds.json", stage)

    def args(out, *extra):
        return ["--method", "kd", "--teacher", str(tmp_path / "teacher"), "--student.layers", "1", "--train_file",
                str(tmp_path / "train.txt"), "--eval_file", str(tmp_path / "eval.txt"), "--output_dir", str(out), "--max_steps", "6", "--save_steps", "3",
                "--per_device_train_batch_size", "2", "--gradient_accumulation_steps", "2", "--learning_rate", "5e-3",
                "--group_by_length", "false", "--logging_steps", "1", "--disable_tqdm", "true",
                "--deepspeed", ds, *extra]

    straight, moved = tmp_path / "straight", tmp_path / "moved"
    r = _run(2, args(straight), tmp_path / "cache")
    assert r.returncode == 0, r.stderr[-3000:]
    r = _run(2, args(moved), tmp_path / "cache", {"KD_ENGINE_CRASH_AT_STEP": "4"})
    assert r.returncode != 0 and sorted(os.listdir(moved / "checkpoints")) == ["step-00000003"]
    r = _run(1, args(moved, "--resume"), tmp_path / "cache")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "gradient accumulation 2 -> 4 keeps the global batch of 8" in r.stderr
    a, b = _losses(straight), _losses(moved)
    assert sorted(b) == [1, 2, 3, 4, 5, 6]
    for step in (4, 5, 6):  # logged train loss: rank 0's micro-batches at 2 ranks, all 8 examples at 1 rank
        assert b[step] == pytest.approx(a[step], rel=0.05), (step, a, b)
    # the same examples per step: final weights and the (all-rank) evaluation agree up to reduction-order noise
    wa, wb = load_file(str(straight / "final" / "model.safetensors")), load_file(str(moved / "final" /
                                                                                    "model.safetensors"))
    assert max(float((wa[k] - wb[k]).abs().max()) for k in wa) < 1e-4
    ea, eb = (_eval(straight), _eval(moved))
    assert eb["lm_loss"] == pytest.approx(ea["lm_loss"], rel=1e-4) and eb["kd_kl"] == pytest.approx(ea["kd_kl"], rel=1e-3)
    assert os.path.exists(moved / "final" / "model.safetensors")
    assert not [n for n in os.listdir(moved / "checkpoints") if n.startswith(".")]


def test_minillm_mid_round_on_another_world_size_is_refused(tmp_path):
    """MiniLLM's rollout buffers are per rank: a checkpoint written mid-way through a PPO round by 2 ranks is refused
    on 1 rank with one error (before the engines are built), and resumes on 2 ranks."""
    tiny.make_llama(str(tmp_path / "teacher"), layers=2)
    with open(tmp_path / "prompts.jsonl", "w") as f:
        for s in tiny.sentences(16, seed=3):
            f.write(json.dumps({"text": s}) + "\n")

    def args(out, *extra):
        return ["--method", "minillm", "--teacher", str(tmp_path / "teacher"), "--student.layers", "1",
                "--train_file", str(tmp_path / "prompts.jsonl"), "--output_dir", str(out), "--max_steps", "4",
                "--save_steps", "2", "--per_device_train_batch_size", "2", "--num_rollouts", "4", "--ppo_epochs",
                "2", "--max_new_tokens", "4", "--learning_rate", "1e-3", "--logging_steps", "1",
                "--disable_tqdm", "true", "--export", "false", *extra]

    out = tmp_path / "run"
    r = _run(2, args(out), tmp_path / "cache", {"KD_ENGINE_CRASH_AT_STEP": "3"})
    assert r.returncode != 0 and sorted(os.listdir(out / "checkpoints")) == ["step-00000002"]
    before = sorted(os.listdir(out))
    r = _run(1, args(out, "--resume"), tmp_path / "cache")
    errors = [x for x in r.stderr.splitlines() if x.startswith("error:")]
    assert r.returncode == 2 and len(errors) == 1 and "mid-way through a PPO round" in errors[0], r.stderr[-3000:]
    assert sorted(os.listdir(out)) == before
    r = _run(2, args(out, "--resume"), tmp_path / "cache")
    assert r.returncode == 0, r.stderr[-3000:]
