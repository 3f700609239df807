"""The gkd plugin end to end on tiny random models with real DeepSpeed on CPU."""
import json
import os

import pytest
import torch

import tiny
from kd_engine.config import build_config
from kd_engine.dist import free_port


@pytest.fixture(scope="module", autouse=True)
def _single_process_env(tmp_path_factory):
    tiny.single_process_env(str(tmp_path_factory.mktemp("kdcache")))


def write_pairs(path, n, seed):
    """Prompt/response rows: the response is the sentence's last two words."""
    with open(path, "w") as f:
        for s in tiny.sentences(n, seed=seed, min_len=4):
            w = s.split()
            f.write(json.dumps({"text": " ".join(w[:-2]), "answer": " ".join(w[-2:])}) + "\n")
    return path


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    d = tmp_path_factory.mktemp("gkd_assets")
    tiny.make_llama(str(d / "teacher"), layers=2)
    write_pairs(d / "pairs.jsonl", 16, seed=3)
    return d


def _run(argv):
    from kd_engine.engine.trainer import Trainer

    tr = Trainer(build_config(argv))
    tr.fit()
    return tr


def _argv(assets, out, *extra, method="gkd", teacher=None):
    return ["--method", method, "--teacher", str(teacher or assets / "teacher"), "--student.layers", "1",
            "--train_file", str(assets / "pairs.jsonl"), "--target_column", "answer", "--output_dir", str(out),
            "--max_steps", "3", "--per_device_train_batch_size", "2", "--learning_rate", "1e-3",
            "--lr_scheduler_type", "constant", "--logging_steps", "1", "--disable_tqdm", "true",
            *(["--max_new_tokens", "5"] if method != "kd" else []), *extra]


def _train_log(out):
    return [r for r in (json.loads(x) for x in open(out / "train_log.jsonl")) if r["split"] == "train"]


@pytest.mark.parametrize("beta,divergence", [(0.0, "forward_kl"), (1.0, "reverse_kl"), (0.3, "jsd")])
def test_gkd_off_policy_equals_kd_with_the_same_divergence(assets, tmp_path, beta, divergence):
    """lmbda 0 on dataset targets: GKD's loss is kd's (alpha 1) with forward KL at beta 0, reverse KL at beta 1,
    JSD(beta) in between, step by step (same batches, same updates)."""
    common = ("--temperature", "2", "--kd_loss_impl", "naive")
    _run(_argv(assets, tmp_path / "g", "--lmbda", "0", "--beta", str(beta), *common))
    _run(_argv(assets, tmp_path / "k", "--alpha", "1", "--divergence", divergence, "--beta", str(beta), *common,
               method="kd"))
    g, k = _train_log(tmp_path / "g"), _train_log(tmp_path / "k")
    assert len(g) == len(k) == 3 and all(r["on_policy"] == 0.0 for r in g)
    for a, b in zip(g, k):
        assert a["kd"] == pytest.approx(b["kd"], rel=1e-5, abs=1e-7)
    assert g[0]["kd"] > 0


def test_jsd_half_is_symmetric_and_endpoints_are_the_kls():
    from kd_engine.losses.divergences import distill_loss

    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(2, 5, 11, generator=g), torch.randn(2, 5, 11, generator=g)
    labels = torch.randint(0, 11, (2, 5), generator=g)
    labels[1, 3:] = -100

    def d(a, b, beta):
        return float(distill_loss(a, b, labels, "jsd", beta, 1.0, 1.0)["kd"])

    assert d(s, t, 0.5) == pytest.approx(d(t, s, 0.5), rel=1e-6)
    assert d(s, t, 0.2) == pytest.approx(d(t, s, 0.8), rel=1e-6)  # JSD_beta(p||q) = JSD_(1-beta)(q||p)
    assert d(s, t, 0.2) != pytest.approx(d(t, s, 0.2), rel=1e-3)  # ... but not symmetric at other betas
    p, q = torch.log_softmax(t, -1), torch.log_softmax(s, -1)
    m = labels != -100
    fwd = float((p.exp() * (p - q)).sum(-1)[m].mean())
    rev = float((q.exp() * (q - p)).sum(-1)[m].mean())
    assert d(s, t, 0.0) == pytest.approx(fwd, rel=1e-5) and d(s, t, 1.0) == pytest.approx(rev, rel=1e-5)


@pytest.mark.parametrize("lmbda,expected", [(0.0, 0), (1.0, 6), (0.5, None)])
def test_lmbda_sets_how_often_the_student_generates(assets, tmp_path, monkeypatch, lmbda, expected):
    import kd_engine.models.sampling as sampling

    calls = []
    real = sampling.mixed_sample

    def counting(model, *a, **kw):
        calls.append(model)
        return real(model, *a, **kw)

    monkeypatch.setattr(sampling, "mixed_sample", counting)
    tr = _run(_argv(assets, tmp_path / "o", "--lmbda", str(lmbda), "--gradient_accumulation_steps", "2",
                    "--max_steps", "3"))
    log = _train_log(tmp_path / "o")
    m = tr.method
    assert m.micro_batches == 6 and m.on_policy_batches == len(calls)
    assert all(c is tr.student.module for c in calls)  # the student samples, never the teacher here
    if expected is not None:
        assert len(calls) == expected
        assert all(r["on_policy"] == lmbda for r in log)
    else:
        assert sum(r["on_policy"] for r in log) * 2 == pytest.approx(len(calls))


def test_student_equal_to_teacher_gives_zero_loss(assets, tmp_path):
    _run(_argv(assets, tmp_path / "o", "--student.layers", "2", "--lmbda", "0.5", "--beta", "0.5",
               "--learning_rate", "0", "--max_steps", "6"))
    log = _train_log(tmp_path / "o")
    assert {r["on_policy"] for r in log} == {0.0, 1.0}  # both kinds of batch were seen (seed 42: draws 5 and 6)
    assert all(abs(r["kd"]) < 1e-6 for r in log)


def test_gkd_resumes_exactly_mid_run(assets, tmp_path):
    """Coin flips and student samples come from checkpointed generators: 3 steps + resume to 6 == 6 straight."""
    args = ("--lmbda", "0.5", "--save_steps", "3", "--max_steps", "6")
    a = _run(_argv(assets, tmp_path / "a", *args))
    _run(_argv(assets, tmp_path / "b", "--lmbda", "0.5", "--max_steps", "3"))
    b = _run(_argv(assets, tmp_path / "b", *args, "--resume"))
    la, lb = _train_log(tmp_path / "a"), _train_log(tmp_path / "b")
    assert [r["on_policy"] for r in la] == [r["on_policy"] for r in lb] and 0 < sum(r["on_policy"] for r in la) < 6
    assert [r["loss"] for r in la] == [r["loss"] for r in lb]
    sa, sb = a.student.module.state_dict(), b.student.module.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert b.method.micro_batches == 6


def test_gkd_encoder_decoder_t5_fused_and_seq_kd(assets, tmp_path):
    from test_minillm_method import _t5_teacher

    t5 = _t5_teacher(tmp_path)
    tr = _run(_argv(assets, tmp_path / "o", "--lmbda", "0.5", "--seq_kd", "true", "--max_steps", "6",
                    "--eval_file", str(assets / "pairs.jsonl"), "--max_eval_samples", "4", teacher=t5))
    log = _train_log(tmp_path / "o")
    assert {r["on_policy"] for r in log} == {0.0, 1.0}
    assert all(torch.isfinite(torch.tensor(r["kd"])) and r["kd"] > 0 for r in log)
    assert tr.method._fused() and tr.method.vocab_size == 60
    rows = tr.data.train  # off-policy responses: the teacher's greedy answers, from the seqkd cache
    assert tr.method.seqkd_info["generated_chunks"] == 1
    assert all(1 <= len(r["response_ids"]) <= 5 for r in rows)


def test_gkd_bad_inputs_are_clear_errors(assets, tmp_path):
    from kd_engine.errors import ConfigError

    base = ["--method", "gkd", "--teacher", str(assets / "teacher")]
    for extra, msg in [(["--beta", "1.5"], "beta must be in"), (["--lmbda", "-0.1"], "lmbda must be in"),
                       (["--gen_top_k", "0", "--gen_top_p", "0"], "keeps no token"),
                       (["--seqkd_top_p", "0"], "keeps no token"), (["--max_new_tokens", "0"], "max_new_tokens"),
                       (["--train_file", str(assets / "pairs.jsonl")], "target_column"),
                       (["--eval_split", "0.2"], "does not support --eval_split")]:  # refused, never ignored
        with pytest.raises(ConfigError, match=msg):
            build_config(base + extra)
    # lmbda 1 (always on-policy) or seq_kd: prompts alone are enough
    build_config(base + ["--train_file", str(assets / "pairs.jsonl"), "--lmbda", "1"])
    build_config(base + ["--train_file", str(assets / "pairs.jsonl"), "--seq_kd", "true"])


@pytest.mark.slow
@pytest.mark.multirank
def test_gkd_two_ranks_zero3_torchrun(assets, tmp_path):
    """2 ranks, student and teacher partitioned: the coin is the same on both ranks (they generate together),
    teacher responses are generated sharded, training runs and exports."""
    import subprocess
    import sys

    tiny.ds_config_file(tmp_path / "z3.json")
    out = tmp_path / "out"
    env = tiny.cpu_env({"KD_ENGINE_CACHE": str(tmp_path / "cache")})
    cmd = [os.path.join(os.path.dirname(sys.executable), "torchrun"), "--nproc_per_node", "2", "--master_addr",
           "127.0.0.1", "--master_port", str(free_port()), "launch/train.py",
           *_argv(assets, out, "--lmbda", "0.5", "--seq_kd", "true", "--max_steps", "6", "--seqkd_batch_size", "3",
                  "--deepspeed", str(tmp_path / "z3.json"), "--eval_file", str(assets / "pairs.jsonl"),
                  "--max_eval_samples", "4")]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=500)
    assert res.returncode == 0, res.stderr[-3000:]
    log = _train_log(out)
    assert len(log) == 6 and {r["on_policy"] for r in log} == {0.0, 1.0}
    assert all(torch.isfinite(torch.tensor(r["kd"])) for r in log)
    assert (out / "final" / "model.safetensors").exists()
    caches = list((tmp_path / "cache" / "seqkd").iterdir())
    assert len(caches) == 1 and (caches[0] / "responses.pt").exists()


def test_always_on_policy_needs_prompts_only(assets, tmp_path):
    """lmbda 1: every response is the student's own sample, so a prompt-only file (no --target_column) trains."""
    argv = [a for a in _argv(assets, tmp_path / "o", "--lmbda", "1") if a not in ("--target_column", "answer")]
    tr = _run(argv)
    assert tr.method.on_policy_batches == tr.method.micro_batches == 3
    assert all("response_ids" not in r for r in tr.data.train)
    assert all(r["kd"] > 0 for r in _train_log(tmp_path / "o"))
