"""--method xtoken_kd and --method uld end to end with real DeepSpeed on CPU: a word-level teacher and a byte-level
BPE student (different vocabularies); the hybrid equals kd when both share one tokenizer; fused equals naive; exact
resume; 2-rank ZeRO-3; the export loads with pipeline("text-generation"); bad input exits 2 and writes nothing."""
import json
import os

import pytest
import torch

import tiny
from kd_engine.cli import main as cli_main
from kd_engine.config import build_config


@pytest.fixture(scope="module", autouse=True)
def _single_process_env(tmp_path_factory):
    tiny.single_process_env(str(tmp_path_factory.mktemp("kdcache")))


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    d = tmp_path_factory.mktemp("xtoken_assets")
    tiny.make_llama(str(d / "teacher"), layers=2, seed=1)
    tiny.write_lines(str(d / "train.txt"), tiny.sentences(24, seed=7))
    tok = tiny.make_bpe_tokenizer(str(d / "bpe"), tiny.sentences(200, seed=8), vocab_size=120)
    tiny.make_llama_for(str(d / "student"), tok, layers=1)
    return d


def _run(argv):
    from kd_engine.engine.trainer import Trainer

    tr = Trainer(build_config(argv))
    tr.fit()
    return tr


def _argv(assets, out, *extra, method="xtoken_kd", student=True):
    who = ["--student", str(assets / "student")] if student else ["--student.layers", "1"]
    return ["--method", method, "--teacher", str(assets / "teacher"), *who, "--train_file",
            str(assets / "train.txt"), "--output_dir", str(out), "--max_steps", "3", "--per_device_train_batch_size",
            "4", "--learning_rate", "1e-3", "--lr_scheduler_type", "constant", "--logging_steps", "1",
            "--disable_tqdm", "true", *extra]


def _log(out, split="train"):
    return [r for r in (json.loads(x) for x in open(out / "train_log.jsonl")) if r["split"] == split]


def test_hybrid_with_one_tokenizer_on_both_sides_is_kd(assets, tmp_path):
    """Same tokenizer: every token maps, every span is one token, the ULD and span terms vanish, and the loss is
    kd's (forward KL, alpha 0.5, T 2) step by step."""
    common = ("--alpha", "0.5", "--temperature", "2", "--kd_loss_impl", "naive", "--student.init", "random")
    _run(_argv(assets, tmp_path / "x", *common, student=False))
    _run(_argv(assets, tmp_path / "k", *common, method="kd", student=False))
    x, k = _log(tmp_path / "x"), _log(tmp_path / "k")
    assert len(x) == len(k) == 3
    for a, b in zip(x, k):
        assert a["kd"] == pytest.approx(b["kd"], rel=1e-4) and a["ce"] == pytest.approx(b["ce"], rel=1e-4)
        assert a["uld"] == 0.0 and a["span"] == 0.0
    assert x[0]["kd"] > 1e-3


def test_student_equal_to_teacher_gives_zero_distillation_terms(assets, tmp_path):
    _run(_argv(assets, tmp_path / "o", "--student.layers", "2", "--learning_rate", "0", student=False))
    assert all(abs(r["kd"]) < 1e-6 and r["uld"] == 0.0 and abs(r["span"]) < 1e-6 for r in _log(tmp_path / "o"))


@pytest.mark.parametrize("method,extra", [("xtoken_kd", ()), ("uld", ("--alignment", "position")),
                                          ("uld", ("--alignment", "span"))])
def test_different_tokenizers_fused_equals_naive_and_evaluation_reports_bits_per_byte(assets, tmp_path, method,
                                                                                     extra):
    ev = ("--eval_split", "0.25", "--eval_steps", "3")
    fused = _run(_argv(assets, tmp_path / "f", *extra, *ev, method=method))
    _run(_argv(assets, tmp_path / "n", *extra, *ev, "--kd_loss_impl", "naive", method=method))
    f, n = _log(tmp_path / "f"), _log(tmp_path / "n")
    terms = ("kd", "uld", "span", "ce") if method == "xtoken_kd" else ("uld", "ce")
    for a, b in zip(f, n):
        for t in terms:
            assert a[t] == pytest.approx(b[t], rel=1e-4, abs=1e-6), t
    assert all(f[0][t] > 0 for t in terms)
    ef, en = _log(tmp_path / "f", "eval")[-1], _log(tmp_path / "n", "eval")[-1]
    for key in ("bits_per_byte", "teacher_bits_per_byte", "next_word_agreement", "lm_loss"):
        assert ef[key] == pytest.approx(en[key], rel=1e-4, abs=1e-6)
    assert 0 < ef["bits_per_byte"] < 20 and 0 < ef["teacher_bits_per_byte"] < 20
    assert 0.0 <= ef["next_word_agreement"] <= 1.0
    vm = fused.method.vmap
    assert 0 < vm["mapped"] < tiny.vocab_size()  # some words are whole BPE tokens, most teacher tokens are not
    card = open(tmp_path / "f" / "final" / "README.md").read()
    assert method in card and "teacher_tokenizer" in card


def test_uld_alignments_compare_different_rows(assets, tmp_path):
    a = _run(_argv(assets, tmp_path / "p", "--alignment", "position", "--max_steps", "1", method="uld"))
    b = _run(_argv(assets, tmp_path / "s", "--alignment", "span", "--max_steps", "1", method="uld"))
    batch = a.data.collate_fn([a.data.train[i] for i in range(4)])
    assert not torch.equal(batch["pos_s"][batch["pos_s"] >= 0], batch["span_s0"][batch["span_s0"] >= 0] - 1)
    assert _log(tmp_path / "p")[0]["uld"] != pytest.approx(_log(tmp_path / "s")[0]["uld"], rel=1e-6)
    assert b.method.pair_mode == "span" and a.method.pair_mode == "position"


def test_on_policy_rows_are_the_students_continuations_scored_without_ce(assets, tmp_path):
    tr = _run(_argv(assets, tmp_path / "o", "--lmbda", "1", "--max_new_tokens", "6", "--onpolicy_prompt_tokens", "3"))
    log = _log(tmp_path / "o")
    # (a random student's continuation can glue onto the prompt's last word: no span, terms 0 that step)
    assert all(r["on_policy"] == 1.0 and r["ce"] == 0.0 for r in log) and any(r["kd"] > 0 for r in log), log
    batch = tr.data.collate_fn([tr.data.train[i] for i in range(4)])
    ctx = tr.ctx
    new = tr.method.student_batch(ctx, {k: v.to(ctx.device) for k, v in batch.items()})
    s_tok = tr.tokenizer
    for i in range(4):
        ids = new["input_ids"][i][new["attention_mask"][i] > 0].tolist()
        prompt = s_tok.decode(batch["input_ids"][i][:4].tolist(), skip_special_tokens=True)
        text = s_tok.decode(ids, skip_special_tokens=True)
        assert text.startswith(prompt)  # the row's first 3 content tokens, then the student's own tokens
        starts = new["span_s0"][i][new["span_s0"][i] >= 0].tolist()
        assert all(s > 3 for s in starts)  # only spans inside the continuation are scored
    assert tr.method.on_policy_batches == tr.method.micro_batches == 3


def test_exact_resume_and_export_loads_with_a_text_generation_pipeline(assets, tmp_path):
    """With lmbda 0.5: the coin flips and the samples resume exactly too."""
    from transformers import pipeline

    args = ("--save_steps", "3", "--max_steps", "6", "--lmbda", "0.5", "--max_new_tokens", "5")
    a = _run(_argv(assets, tmp_path / "a", *args))
    _run(_argv(assets, tmp_path / "b", "--max_steps", "3", "--lmbda", "0.5", "--max_new_tokens", "5"))
    b = _run(_argv(assets, tmp_path / "b", *args, "--resume"))
    la = _log(tmp_path / "a")
    assert 0 < sum(r["on_policy"] for r in la) < 6
    assert [r["loss"] for r in la] == [r["loss"] for r in _log(tmp_path / "b")]
    sa, sb = a.student.module.state_dict(), b.student.module.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    gen = pipeline("text-generation", model=str(tmp_path / "a" / "final"), device=-1)
    out = gen("the cat", max_new_tokens=4, do_sample=False)
    assert out[0]["generated_text"].startswith("the cat")
    assert len(gen.tokenizer) == len(b.tokenizer)  # the student's own tokenizer went with it


@pytest.mark.slow
@pytest.mark.multirank
def test_two_rank_zero3_fused_equals_naive(assets, tmp_path):
    """2 ranks, ZeRO-3 student and ZeRO-3 teacher (every parameter partitioned, both output layers gathered for
    the chunked loss): the same losses fused and naive; on-policy micro-batches sample on both ranks together."""
    import subprocess
    import sys

    from kd_engine.dist import free_port

    tiny.ds_config_file(tmp_path / "z3.json")
    torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
    runs = {"auto": ["--kd_loss_impl", "auto"], "naive": ["--kd_loss_impl", "naive"],
            "sampled": ["--lmbda", "1", "--max_new_tokens", "4"]}  # ranks generate together under ZeRO-3
    for impl, extra in runs.items():
        argv = _argv(assets, tmp_path / impl, "--deepspeed", str(tmp_path / "z3.json"), *extra,
                     "--per_device_train_batch_size", "2")
        cmd = [torchrun, "--nproc_per_node", "2", "--master_addr", "127.0.0.1", "--master_port", str(free_port()),
               os.path.abspath("launch/train.py"), *argv]
        r = subprocess.run(cmd, env=tiny.cpu_env({"KD_ENGINE_CACHE": str(tmp_path / "cache")}), capture_output=True,
                           text=True, timeout=400)
        assert r.returncode == 0, r.stderr[-3000:]
    assert [r["on_policy"] for r in _log(tmp_path / "sampled")] == [1.0, 1.0, 1.0]
    a, b = _log(tmp_path / "auto"), _log(tmp_path / "naive")
    assert len(a) == len(b) == 3
    for ra, rb in zip(a, b):
        for t in ("kd", "uld", "span", "ce"):
            assert ra[t] == pytest.approx(rb[t], rel=1e-4, abs=1e-6)


@pytest.mark.parametrize("flags,needle", [
    (["--method", "kd"], "--method xtoken_kd or --method uld"),
    (["--uld_weight", "-1"], "uld_weight must be in [0, 100]"),
    (["--alpha", "2"], "alpha must be in [0, 1]"),
    (["--method", "uld", "--alignment", "diagonal"], "alignment must be position or span"),
    (["--target_column", "x"], "has no column 'x'"),
    (["--messages_column", "messages"], "does not read chat data"),
])
def test_bad_input_exits_2_and_writes_nothing(assets, tmp_path, capsys, flags, needle):
    out = tmp_path / "o"
    assert cli_main(_argv(assets, out, *flags)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err and err[-1].startswith("error:") and needle in err[-1], err[-3:]
    assert not out.exists()


def test_prompt_response_rows_score_the_response_only(assets, tmp_path):
    rows = [{"q": " ".join(x.split()[:3]), "a": " " + " ".join(x.split()[3:])} for x in tiny.sentences(16, seed=9,
                                                                                                  min_len=6)]
    (tmp_path / "qa.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    argv = _argv(assets, tmp_path / "o", "--text_column", "q", "--target_column", "a", "--lmbda", "0.5",
                 "--max_new_tokens", "4", "--max_steps", "6")
    argv[argv.index("--train_file") + 1] = str(tmp_path / "qa.jsonl")
    tr = _run(argv)
    log = _log(tmp_path / "o")
    assert len(log) == 6 and all(r["kd"] >= 0 for r in log) and 0 < sum(r["on_policy"] for r in log) < 6
    s_tok = tr.tokenizer
    for ex, row in zip(tr.data.train, rows):
        scored = [i for i, y in zip(ex["input_ids"], ex["labels"]) if y != -100]
        assert s_tok.decode(scored) == row["a"]  # the response's tokens, every one of them, and nothing else
        assert ex["n_bytes"] == len(row["a"].encode())
        assert min(ex["span_s0"]) >= len(s_tok(row["q"])["input_ids"]) + 1  # spans start inside the response


def test_texts_that_align_nowhere_exit_2_naming_the_file(assets, tmp_path, capsys):
    """With room for the start token only, no text keeps a piece both models predict."""
    bad = tiny.write_lines(str(tmp_path / "bad.txt"), ["the cat", "a dog"])
    out = tmp_path / "o"
    argv = _argv(assets, out, "--max_length", "1")
    argv[argv.index("--train_file") + 1] = bad
    assert cli_main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert "bad.txt: no text where the teacher's and the student's tokenizations share a span" in err[-1]
    assert not out.exists()
