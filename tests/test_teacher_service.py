"""--teacher_ranks: a teacher group of its own serving sparse rows (the offline cache's format) to the student ranks.

Real torchrun jobs on CPU (gloo): global rank 0 serves the teacher, ranks 1-2 train under DeepSpeed in their own
process group. Compared with a 2-rank run from an offline cache built with the same k, tail samples and seed.
"""
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

import tiny
from kd_engine.cli import main as cli_main
from kd_engine.dist import free_port

TORCHRUN = os.path.join(os.path.dirname(sys.executable), "torchrun")
TRAIN = os.path.abspath("launch/train.py")
K, M = "8", "4"


@pytest.fixture(scope="module", autouse=True)
def _env(tmp_path_factory):
    tiny.single_process_env(str(tmp_path_factory.mktemp("kdserve")))


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    d = tmp_path_factory.mktemp("serve_assets")
    tiny.make_llama(str(d / "teacher"), layers=3)
    tiny.make_llama(str(d / "student"), layers=1, seed=1)
    tiny.write_lines(str(d / "train.txt"), tiny.sentences(40))
    tiny.ds_config_file(d / "z2.json", stage=2)
    tiny.ds_config_file(d / "z3.json", stage=3)
    return d


def _train(assets, out, *extra, steps=4):
    return ["--method", "kd", "--student", str(assets / "student"), "--train_file", str(assets / "train.txt"),
            "--output_dir", str(out), "--max_steps", str(steps), "--per_device_train_batch_size", "2",
            "--max_length", "32", "--learning_rate", "1e-2", "--logging_steps", "1", "--disable_tqdm", "true",
            "--temperature", "2.0", *extra]


def _served(assets, out, *extra, steps=4):
    return _train(assets, out, "--teacher", str(assets / "teacher"), "--teacher_ranks", "1", "--teacher_top_k", K,
                  "--teacher_tail_samples", M, *extra, steps=steps)


def _launch(nproc, argv, env=None, timeout=400):
    cmd = [TORCHRUN, "--nproc_per_node", str(nproc), "--master_addr", "127.0.0.1", "--master_port",
           str(free_port()), TRAIN]
    return subprocess.run(cmd + argv, env=env or tiny.cpu_env(), capture_output=True, text=True, timeout=timeout)


def _ok(r):
    assert r.returncode == 0, r.stderr[-3000:]
    return r


def _losses(out):
    rows = [json.loads(line) for line in open(os.path.join(out, "train_log.jsonl"))]
    return [(r["kd"], r["ce"]) for r in rows if r["split"] == "train"]


@pytest.fixture(scope="module")
def cache(assets, tmp_path_factory):
    from kd_engine.teacher_cache import main

    c = tmp_path_factory.mktemp("served_cache") / "c"
    assert main(["--teacher", str(assets / "teacher"), "--train_file", str(assets / "train.txt"), "--output_dir",
                 str(c), "--temperature", "2.0", "--max_length", "32", "--top_k", K, "--tail_samples", M,
                 "--logp_dtype", "fp32"]) == 0
    return c


@pytest.mark.parametrize("stage", [2, 3])
def test_served_losses_equal_the_offline_cache_run_step_by_step(assets, cache, tmp_path, stage):
    """1 teacher rank + 2 student ranks at ZeRO-2 / ZeRO-3 vs 2 ranks reading a cache of the same k, tail samples
    and seed: the same rows (top-k, tail mass, sampled tail), so the same losses within 1e-5 at every step."""
    ds = str(assets / f"z{stage}.json")
    served = _ok(_launch(3, _served(assets, tmp_path / "served", "--deepspeed", ds)))
    assert "served by global ranks 0-0" in served.stderr
    _ok(_launch(2, _train(assets, tmp_path / "cached", "--teacher_cache", str(cache), "--deepspeed", ds)))
    a, b = _losses(tmp_path / "served"), _losses(tmp_path / "cached")
    assert len(a) == len(b) == 4
    for (ka, ca), (kb, cb) in zip(a, b):
        assert abs(ka - kb) <= 1e-5 and abs(ca - cb) <= 1e-5
    assert os.path.isfile(tmp_path / "served" / "final" / "config.json")
    assert not os.path.exists(tmp_path / "served" / "teacher")  # the teacher ranks write nothing


def test_resume_after_a_kill_is_bit_identical_to_an_uninterrupted_run(assets, tmp_path):
    """Checkpoint at step 2, every rank killed at step 3 (the teacher group with them), resumed: the exported
    student equals an uninterrupted served run's bit for bit (the data position lives on the student ranks; the
    requests prefetched before the kill are simply asked again)."""
    from safetensors.torch import load_file

    _ok(_launch(3, _served(assets, tmp_path / "straight", "--save_steps", "2", steps=5)))
    env = tiny.cpu_env({"KD_ENGINE_CRASH_AT_STEP": "4"})
    r = _launch(3, _served(assets, tmp_path / "resumed", "--save_steps", "2", steps=5), env=env)
    assert r.returncode != 0 and not os.path.exists(tmp_path / "resumed" / "final")
    _ok(_launch(3, _served(assets, tmp_path / "resumed", "--save_steps", "2", "--resume", steps=5)))
    a = load_file(str(tmp_path / "straight" / "final" / "model.safetensors"))
    b = load_file(str(tmp_path / "resumed" / "final" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert _losses(tmp_path / "straight")[-1] == _losses(tmp_path / "resumed")[-1]


@pytest.mark.parametrize("who,sig", [("teacher", "KILL"), ("teacher", "STOP"), ("student", "KILL")])
def test_a_lost_rank_ends_every_rank_within_the_timeout(assets, tmp_path, who, sig):
    """A teacher rank killed or hung (SIGSTOP) while serving, or a student rank killed: every other rank exits
    within --dist_timeout with one error line, naming the rank it lost across the bridge; no run looks finished.
    Three independent processes, as on three nodes: no launcher tears the survivors down."""
    lost = 0 if who == "teacher" else 2
    extra = {"KD_ENGINE_CRASH_SIGNAL": sig, "KD_ENGINE_CRASH_RANK": "0" if who == "teacher" else "1"}
    extra["KD_ENGINE_CRASH_IN_TEACHER" if who == "teacher" else "KD_ENGINE_CRASH_AT_STEP"] = "5" if who == "teacher" \
        else "3"  # a student's CRASH_RANK is its rank in the student group (1 = global rank 2)
    port, procs = str(free_port()), []
    argv = [sys.executable, TRAIN] + _served(assets, tmp_path / "o", "--dist_timeout", "20", steps=8)
    for rank in range(3):
        env = tiny.cpu_env({**extra, "RANK": str(rank), "WORLD_SIZE": "3", "LOCAL_RANK": "0",
                            "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port})
        procs.append(subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    t0, errs = time.monotonic(), {}
    try:
        for rank, p in enumerate(procs):
            if rank != lost:
                errs[rank] = p.communicate(timeout=240)[1]
        waited = time.monotonic() - t0
    finally:
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGKILL)
                p.wait()
    assert waited < 150 and not os.path.exists(tmp_path / "o" / "final")
    for rank, err in errs.items():
        errors = [line for line in err.splitlines() if line.startswith("error:")]
        assert procs[rank].returncode != 0 and len(errors) == 1, (rank, err[-3000:])
        if who == "teacher":  # both student ranks name the teacher rank
            assert "teacher global rank 0" in errors[0] and "--resume" in errors[0], errors
        elif rank == 0:  # the teacher names the student it lost
            assert "student global rank 2" in errors[0], errors


@pytest.mark.parametrize("extra,message", [
    (["--teacher_ranks", "1"], "leaves no student rank in a world of 1"),
    (["--teacher_ranks", "1", "--teacher_cache", "x"], "--teacher_cache replaces"),
    (["--teacher_ranks", "1", "--divergence", "reverse_kl"], "needs dense teacher logits"),
    (["--teacher_ranks", "1", "--packing", "true"], "excludes --packing"),
    (["--teacher_ranks", "-1"], "teacher_ranks must be >= 0"),
    (["--teacher_ranks", "1", "--teacher_prefetch", "1000"], "teacher_prefetch must be in [0, 64]"),
    (["--teacher_ranks", "1", "--teacher_top_k", "0"], "teacher_top_k must be >= 1"),
])
def test_bad_input_is_one_error_exit_2_and_nothing_written(assets, tmp_path, capsys, extra, message):
    out = tmp_path / "o"
    argv = _train(assets, out, "--teacher", str(assets / "teacher"), *extra)
    assert cli_main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("error:") == 1, err
    assert not out.exists()


@pytest.mark.parametrize("method,what", [("gkd", "generalized JSD"), ("minillm", "reverse-KL rewards")])
def test_a_method_the_service_cannot_feed_is_refused_naming_what_it_needs(assets, tmp_path, capsys, method, what):
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps({"prompt": a, "response": b}) + "\n"
                             for a, b in zip(tiny.sentences(8), tiny.sentences(8, seed=1))))
    argv = ["--method", method, "--teacher", str(assets / "teacher"), "--student", str(assets / "student"),
            "--train_file", str(pairs), "--text_column", "prompt", "--target_column", "response", "--output_dir",
            str(tmp_path / "o"), "--teacher_ranks", "1"]
    assert cli_main(argv) == 2
    err = capsys.readouterr().err
    assert what in err and "dense teacher logits" in err, err
    assert not (tmp_path / "o").exists()


def test_teacher_tp_must_divide_the_teacher_group(assets, tmp_path):
    """Checked before any launch cost is paid beyond the rendezvous: 3 ranks, --teacher_ranks 1 --teacher_tp 2."""
    r = _launch(3, _served(assets, tmp_path / "o", "--teacher_tp", "2"), timeout=200)
    assert r.returncode != 0 and "does not divide --teacher_ranks 1" in r.stderr
    assert not (tmp_path / "o").exists()
