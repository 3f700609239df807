"""--teacher_ranks: a teacher group of its own serving sparse rows (the offline cache's format) to the student ranks.

Real torchrun jobs on CPU (gloo): global rank 0 serves the teacher, ranks 1-2 train under DeepSpeed in their own
process group. Compared with a 2-rank run from an offline cache built with the same k, tail samples and seed.
"""
import json
import os
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
    return [(r["kd"], r.get("ce", 0.0)) for r in rows if r["split"] == "train"]


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


def test_a_tensor_parallel_teacher_group_serves_the_same_rows(assets, cache, tmp_path):
    """--teacher_ranks 2 --teacher_tp 2: one teacher copy split over global ranks 0-1 (each rank receives every
    request, the group's first rank answers), one student rank: its losses equal a 1-rank cached run's."""
    _ok(_launch(3, _served(assets, tmp_path / "served", "--teacher_ranks", "2", "--teacher_tp", "2")))
    _ok(_launch(1, _train(assets, tmp_path / "cached", "--teacher_cache", str(cache))))
    a, b = _losses(tmp_path / "served"), _losses(tmp_path / "cached")
    assert len(a) == len(b) == 4
    for (ka, ca), (kb, cb) in zip(a, b):
        assert abs(ka - kb) <= 1e-5 and abs(ca - cb) <= 1e-5


@pytest.mark.parametrize("method", ["gkd", "kd", "gkd-tp2"])
def test_served_hidden_states_train_like_a_co_located_teacher(assets, tmp_path, method):
    """Losses that need the teacher's whole distribution: gkd fully on-policy (lmbda 1, the student's own samples
    scored by the teacher group) and kd with reverse KL. 1 teacher rank + 2 student ranks at ZeRO-2 (the teacher
    sends its output layer once, then the hidden states entering it) vs 2 ranks with the teacher co-located, and a
    teacher split over 2 ranks (--teacher_tp 2, its output layer gathered) serving 1 student vs 1 rank: the same
    losses within 1e-5 at every step."""
    ds, pairs = str(assets / "z2.json"), tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps({"prompt": " ".join(s.split()[:-2]), "response": " ".join(s.split()[-2:])})
                             + "\n" for s in tiny.sentences(16, seed=3, min_len=4)))
    extra = ["--divergence", "reverse_kl", "--kd_loss_impl", "naive"] if method == "kd" else [
        "--method", "gkd", "--lmbda", "1", "--max_new_tokens", "4", "--train_file", str(pairs), "--text_column",
        "prompt", "--target_column", "response"]
    held_out = ["--eval_file", str(pairs), "--max_eval_samples", "4"] if "gkd" in method else ["--eval_split", "0.25"]
    base = (*extra, "--deepspeed", ds, "--teacher", str(assets / "teacher"), *held_out)
    group = ["--teacher_ranks", "2", "--teacher_tp", "2"] if method == "gkd-tp2" else ["--teacher_ranks", "1"]
    served = _ok(_launch(3, _train(assets, tmp_path / "served", *base, *group, steps=3)))
    assert "final hidden states" in served.stderr
    _ok(_launch(1 if method == "gkd-tp2" else 2, _train(assets, tmp_path / "local", *base, steps=3)))
    a, b = _losses(tmp_path / "served"), _losses(tmp_path / "local")
    assert len(a) == len(b) == 3 and a[0][0] > 0
    for (ka, ca), (kb, cb) in zip(a, b):
        assert abs(ka - kb) <= 1e-5 and abs(ca - cb) <= 1e-5
    ea, eb = ([r for r in map(json.loads, open(out / "train_log.jsonl")) if r["split"] == "eval"][-1]
              for out in (tmp_path / "served", tmp_path / "local"))
    assert ea.keys() == eb.keys() and any("teacher" in k or "agree" in k for k in ea), ea  # teacher metrics served
    assert all(abs(ea[k] - eb[k]) <= 1e-5 * max(1.0, abs(eb[k])) for k in ea if isinstance(ea[k], float)), (ea, eb)


def _served_equals_co_located(argv, d, keys, steps=3):
    """Run ``argv`` with 1 teacher rank + 2 students and with 2 ranks and the teacher co-located: the train log's
    ``keys`` within 1e-5 at every step, and the same final evaluation."""
    served = _ok(_launch(3, argv + ["--output_dir", str(d / "served"), "--teacher_ranks", "1"]))
    assert "final hidden states" in served.stderr
    _ok(_launch(2, argv + ["--output_dir", str(d / "local")]))

    def log(out, split):
        return [r for r in map(json.loads, open(out / "train_log.jsonl")) if r["split"] == split]

    a, b = log(d / "served", "train"), log(d / "local", "train")
    assert len(a) == len(b) == steps
    for ra, rb in zip(a, b):
        for key in keys:
            assert abs(ra[key] - rb[key]) <= 1e-5, (key, ra, rb)
    ea, eb = log(d / "served", "eval"), log(d / "local", "eval")
    assert ea and len(ea) == len(eb)
    assert all(abs(x - y) <= 1e-5 for k, x in ea[-1].items() if isinstance(x, float) for y in [eb[-1][k]])


def test_minillm_rollouts_on_a_served_teacher_train_like_a_co_located_teacher(assets, tmp_path):
    """minillm: teacher-mixed sampling decodes on the teacher group (a KV-cached session per student, one request
    per generated token), rewards and the single-step and pretraining KD terms from served hidden states. 1 teacher
    rank + 2 student ranks (ZeRO-2, lockstep rollouts) vs 2 ranks with the teacher co-located: the same losses and
    rewards within 1e-5 at every step, and the same evaluation."""
    d = tmp_path
    (d / "prompts.jsonl").write_text("".join(json.dumps({"text": s, "answer": s.split()[-1]}) + "\n"
                                             for s in tiny.sentences(16, seed=3)))
    tiny.write_lines(str(d / "pt.txt"), tiny.sentences(16, seed=4))
    argv = ["--method", "minillm", "--teacher", str(assets / "teacher"), "--student", str(assets / "student"),
            "--train_file", str(d / "prompts.jsonl"), "--pt_file", str(d / "pt.txt"), "--max_steps", "3",
            "--per_device_train_batch_size", "2", "--num_rollouts", "4", "--ppo_epochs", "2", "--max_new_tokens", "5",
            "--learning_rate", "1e-3", "--logging_steps", "1", "--disable_tqdm", "true", "--target_column", "answer",
            "--eval_file", str(d / "prompts.jsonl"), "--max_eval_samples", "4", "--eval_steps", "3",
            "--deepspeed", str(assets / "z2.json")]
    _served_equals_co_located(argv, d, ("loss", "pg", "reg", "pt", "reward"))


def _t5_pair(d):
    """A tiny random T5 teacher (2 layers) and student (1 layer) sharing a SentencePiece tokenizer trained here."""
    import sentencepiece as spm
    from transformers import T5Config, T5ForConditionalGeneration, T5Tokenizer

    tiny.write_lines(str(d / "spm.txt"), tiny.sentences(200, seed=5))
    (d / "spm").mkdir()
    spm.SentencePieceTrainer.train(input=str(d / "spm.txt"), model_prefix=str(d / "spm" / "spiece"), vocab_size=60,
                                   model_type="unigram", pad_id=0, eos_id=1, unk_id=2, bos_id=-1, minloglevel=2)
    tok = T5Tokenizer.from_pretrained(str(d / "spm"), extra_ids=4)
    for name, layers, seed in (("t5_teacher", 2, 0), ("t5_student", 1, 1)):
        torch.manual_seed(seed)
        cfg = T5Config(vocab_size=64, d_model=32, d_kv=8, d_ff=64, num_layers=layers, num_heads=4,
                       decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)
        T5ForConditionalGeneration(cfg).save_pretrained(str(d / name))
        tok.save_pretrained(str(d / name))
    return d / "t5_teacher", d / "t5_student"


def test_minillm_encoder_decoder_on_a_served_teacher_trains_like_a_co_located_teacher(tmp_path):
    """minillm with a T5 teacher and student: the rollout session on the teacher group runs the encoder on the
    prompts once and decodes from the decoder's start token with its own cache; rewards, the reg term and the
    prefix-LM pt term from served hidden states (decoder ids sent). 1 teacher rank + 2 students (ZeRO-2) vs 2 ranks
    with the teacher co-located: losses and rewards within 1e-5 at every step, and the same evaluation."""
    d = tmp_path
    teacher, student = _t5_pair(d)
    (d / "prompts.jsonl").write_text("".join(json.dumps({"text": s, "answer": s.split()[-1]}) + "\n"
                                             for s in tiny.sentences(16, seed=3)))
    tiny.write_lines(str(d / "pt.txt"), tiny.sentences(16, seed=4))
    tiny.ds_config_file(d / "z2.json", stage=2)
    argv = ["--method", "minillm", "--teacher", str(teacher), "--student", str(student), "--train_file",
            str(d / "prompts.jsonl"), "--pt_file", str(d / "pt.txt"), "--pt_max_length", "24", "--max_steps", "3",
            "--per_device_train_batch_size", "2", "--num_rollouts", "4", "--ppo_epochs", "2", "--max_new_tokens", "4",
            "--max_prompt_length", "8", "--learning_rate", "1e-3", "--logging_steps", "1", "--disable_tqdm", "true",
            "--target_column", "answer", "--eval_file", str(d / "prompts.jsonl"), "--max_eval_samples", "4",
            "--eval_steps", "3", "--deepspeed", str(d / "z2.json")]
    _served_equals_co_located(argv, d, ("loss", "pg", "reg", "pt", "reward", "response_len"))


def test_resume_after_a_kill_is_bit_identical_to_an_uninterrupted_run(assets, tmp_path):
    """Checkpoint at step 2, every rank killed at step 3 (the teacher group with them), resumed: the exported
    student equals an uninterrupted served run's bit for bit (the data position lives on the student ranks; the
    requests prefetched before the kill are simply asked again)."""
    from safetensors.torch import load_file

    _ok(_launch(3, _served(assets, tmp_path / "straight", "--save_steps", "2", "--eval_split", "0.2",
                           "--eval_steps", "2", steps=5)))
    env = tiny.cpu_env({"KD_ENGINE_CRASH_AT_STEP": "4"})
    r = _launch(3, _served(assets, tmp_path / "resumed", "--save_steps", "2", "--eval_split", "0.2", "--eval_steps",
                           "2", steps=5), env=env)
    assert r.returncode != 0 and not os.path.exists(tmp_path / "resumed" / "final")
    _ok(_launch(3, _served(assets, tmp_path / "resumed", "--save_steps", "2", "--eval_split", "0.2",
                           "--eval_steps", "2", "--resume", steps=5)))
    a = load_file(str(tmp_path / "straight" / "final" / "model.safetensors"))
    b = load_file(str(tmp_path / "resumed" / "final" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert _losses(tmp_path / "straight")[-1] == _losses(tmp_path / "resumed")[-1]


def test_a_checkpoint_write_longer_than_the_timeout_does_not_end_the_teacher(assets, tmp_path):
    """Students announce a pause before each evaluation and checkpoint write: the teacher waits for their next
    request beyond --dist_timeout (5 s here; every checkpoint write takes 8 s longer), and the run completes."""
    env = tiny.cpu_env({"KD_ENGINE_SLEEP_IN_SAVE": "8"})
    _ok(_launch(3, _served(assets, tmp_path / "o", "--dist_timeout", "5", "--save_steps", "2", steps=3), env=env))
    assert os.path.isfile(tmp_path / "o" / "final" / "config.json")


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
        tiny.kill_survivors(procs)
    assert waited < 150 and not os.path.exists(tmp_path / "o" / "final")
    named = []
    for rank, err in errs.items():
        errors = [line for line in err.splitlines() if line.startswith("error:")]
        assert procs[rank].returncode != 0 and len(errors) == 1 and "--resume" in errors[0], (rank, err[-3000:])
        named.append(errors[0])
    if who == "teacher":  # noticed on the bridge, or first in the students' all-reduce (gloo resets the survivors'
        assert all("teacher global rank 0" in e for e in named), named  # connections): a probe finds the dead rank
    else:  # the teacher names the student it lost, and so does the other student (its all-reduce partner)
        assert all("student global rank 2" in e for e in named), named


@pytest.mark.parametrize("extra,message", [
    (["--teacher_ranks", "1"], "leaves no student rank in a world of 1"),
    (["--teacher_ranks", "1", "--teacher_cache", "x"], "--teacher_cache replaces"),
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


@pytest.mark.parametrize("method,extra,what", [
    ("seqkd", [], "teacher generation (responses decoded by the teacher)"),
    ("gkd", ["--seq_kd", "true"], "the teacher service runs forward passes only"),
])
def test_a_method_the_service_cannot_feed_is_refused_naming_what_it_needs(assets, tmp_path, capsys, method, extra,
                                                                          what):
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps({"prompt": a, "response": b}) + "\n"
                             for a, b in zip(tiny.sentences(8), tiny.sentences(8, seed=1))))
    argv = ["--method", method, "--teacher", str(assets / "teacher"), "--student", str(assets / "student"),
            "--train_file", str(pairs), "--text_column", "prompt", "--target_column", "response", "--output_dir",
            str(tmp_path / "o"), "--teacher_ranks", "1", *extra]
    assert cli_main(argv) == 2
    err = capsys.readouterr().err
    assert what in err and err.count("error:") == 1, err
    assert not (tmp_path / "o").exists()


def test_teacher_tp_must_divide_the_teacher_group(assets, tmp_path):
    """Checked before any launch cost is paid beyond the rendezvous: 3 ranks, --teacher_ranks 1 --teacher_tp 2."""
    r = _launch(3, _served(assets, tmp_path / "o", "--teacher_tp", "2"), timeout=200)
    assert r.returncode != 0 and "does not divide --teacher_ranks 1" in r.stderr
    assert not (tmp_path / "o").exists()
