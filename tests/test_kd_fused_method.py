"""--method kd with the fused loss (default for LMs) trains exactly like the naive one: causal and seq2seq, ZeRO-3."""
import json
import os

import pytest
import torch

import tiny
from kd_engine.cli import main as cli_main
from kd_engine.config import build_config
from kd_engine.errors import ConfigError


@pytest.fixture(scope="module", autouse=True)
def _env(tmp_path_factory):
    tiny.single_process_env(str(tmp_path_factory.mktemp("kdcache")))


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    d = tmp_path_factory.mktemp("fused_assets")
    tiny.make_llama(str(d / "teacher"), layers=3, hidden=48)
    tiny.write_lines(str(d / "train.txt"), tiny.sentences(32))
    rows = [{"text": s, "target": t} for s, t in zip(tiny.sentences(16, seed=2), tiny.sentences(16, seed=3))]
    tiny.write_lines(str(d / "pairs.jsonl"), [json.dumps(r) for r in rows])
    return d


def _run(argv):
    from kd_engine.engine.trainer import Trainer

    tr = Trainer(build_config(argv))
    tr.fit()
    return tr


def _losses(out):
    rows = [json.loads(line) for line in open(os.path.join(out, "train_log.jsonl"))]
    return [(r["kd"], r.get("ce"), r["loss"]) for r in rows if r["split"] == "train"]


def _causal(assets, out, impl, *extra):
    return ["--method", "kd", "--teacher", str(assets / "teacher"), "--student.layers", "2", "--student.init", "random",
            "--student.hidden", "32", "--train_file", str(assets / "train.txt"), "--output_dir", str(out), "--max_steps", "3",
            "--per_device_train_batch_size", "4", "--learning_rate", "1e-2", "--logging_steps", "1",
            "--disable_tqdm", "true", "--kd_loss_impl", impl, *extra]


@pytest.mark.parametrize("extra", [[], ["--divergence", "jsd", "--beta", "0.3", "--temperature", "1.5"]],
                         ids=["forward_kl", "jsd"])
def test_causal_lm_fused_and_naive_give_the_same_losses(assets, tmp_path, extra):
    fused = _run(_causal(assets, tmp_path / "fused", "fused", *extra))
    naive = _run(_causal(assets, tmp_path / "naive", "naive", *extra))
    a, b = _losses(tmp_path / "fused"), _losses(tmp_path / "naive")
    assert len(a) == len(b) == 3
    for ra, rb in zip(a, b):
        for x, y in zip(ra, rb):
            assert x == pytest.approx(y, rel=1e-4, abs=1e-6)
    assert a[0][0] > 0 and a[-1][2] != a[0][2]  # real loss values, and training moved them
    assert fused.method.card_info()["kd_loss_impl"] == "fused" and naive.method.card_info()["kd_loss_impl"] == "naive"
    # the student's hidden size differs from the teacher's (48): the fused loss had both shapes
    assert fused.student.module.config.hidden_size == 32


def _evals(out):
    rows = [json.loads(line) for line in open(os.path.join(out, "train_log.jsonl"))]
    return [{k: v for k, v in r.items() if k not in ("split", "step", "eval_s", "time", "epoch")}
            for r in rows if r["split"] == "eval"]


def test_fused_evaluation_is_chunked_and_equals_the_naive_one(assets, tmp_path, monkeypatch):
    """Evaluation of an LM under the fused setting computes the same metrics from hidden states, a few rows at a
    time (chunk of 5 rows forced): no full-vocabulary logits of either model."""
    from kd_engine.methods import _supervised

    real = _supervised.chunked_evaluation_metrics
    seen = []

    def small_chunks(*a, **k):
        seen.append(a[1].shape)
        return real(*a, **dict(k, chunk_rows=5))

    monkeypatch.setattr("kd_engine.methods.kd.chunked_evaluation_metrics", small_chunks)
    extra = ["--eval_split", "0.25", "--eval_on_start", "true", "--per_device_eval_batch_size", "3"]
    _run(_causal(assets, tmp_path / "fused", "fused", *extra))
    _run(_causal(assets, tmp_path / "naive", "naive", *extra))
    a, b = _evals(tmp_path / "fused"), _evals(tmp_path / "naive")
    assert seen and len(a) == len(b) == 2
    for ra, rb in zip(a, b):
        assert set(ra) == set(rb) and {"lm_loss", "kd_kl", "teacher_lm_loss", "teacher_agreement"} <= set(ra)
        for k in ra:
            assert ra[k] == pytest.approx(rb[k], rel=1e-5, abs=1e-6), k


def _t5(d):
    import sentencepiece as spm
    from transformers import T5Config, T5ForConditionalGeneration, T5Tokenizer

    tiny.write_lines(str(d / "spm.txt"), tiny.sentences(200, seed=5))
    (d / "t5").mkdir()
    spm.SentencePieceTrainer.train(input=str(d / "spm.txt"), model_prefix=str(d / "t5" / "spiece"), vocab_size=60,
                                   model_type="unigram", pad_id=0, eos_id=1, unk_id=2, bos_id=-1, minloglevel=2)
    tok = T5Tokenizer.from_pretrained(str(d / "t5"), extra_ids=0)
    torch.manual_seed(0)
    cfg = T5Config(vocab_size=64, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4, decoder_start_token_id=0,
                   pad_token_id=0, eos_token_id=1)  # 64 logit rows for 60 tokens: padded vocab
    T5ForConditionalGeneration(cfg).save_pretrained(str(d / "t5"))
    tok.save_pretrained(str(d / "t5"))
    return d / "t5"


def test_seq2seq_t5_fused_and_naive_give_the_same_losses(assets, tmp_path):
    teacher = _t5(tmp_path)

    def argv(out, impl):
        return ["--method", "kd", "--teacher", str(teacher), "--student.layers", "1", "--train_file",
                str(assets / "pairs.jsonl"), "--target_column", "target", "--output_dir", str(out), "--max_steps",
                "2", "--per_device_train_batch_size", "4", "--learning_rate", "1e-2", "--logging_steps", "1",
                "--disable_tqdm", "true", "--kd_loss_impl", impl, "--divergence", "reverse_kl", "--eval_split", "0.25"]

    tr = _run(argv(tmp_path / "fused", "fused"))
    assert tr.method._task() == "seq2seq_lm" and tr.method.vocab_size == 60
    _run(argv(tmp_path / "naive", "naive"))
    a, b = _losses(tmp_path / "fused"), _losses(tmp_path / "naive")
    assert len(a) == 2
    for ra, rb in zip(a, b):
        for x, y in zip(ra, rb):
            assert x == pytest.approx(y, rel=1e-4, abs=1e-6)
    ea, eb = _evals(tmp_path / "fused"), _evals(tmp_path / "naive")  # chunked evaluation, seq2seq rows
    assert len(ea) == len(eb) == 1 and "teacher_lm_loss" in ea[0]
    assert all(ea[0][k] == pytest.approx(eb[0][k], rel=1e-5, abs=1e-6) for k in ea[0])


def test_output_layer_not_found_names_the_model_and_suggests_naive():
    from kd_engine.models.lm_head import output_layer

    class NoHead(torch.nn.Module):
        def get_output_embeddings(self):
            return None

    with pytest.raises(ConfigError, match=r"NoHead.*--kd_loss_impl naive"):
        output_layer(NoHead(), "student")


@pytest.mark.parametrize("flags,needle", [(["--beta", "1.5", "--divergence", "jsd"], "beta"),
                                          (["--kd_loss_impl", "fast"], "kd_loss_impl"),
                                          (["--divergence", "kl"], "divergence")])
def test_bad_options_exit_2_and_write_nothing(assets, tmp_path, capsys, flags, needle):
    out = tmp_path / "out"
    assert cli_main(_causal(assets, out, "fused", *flags)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err and err[-1].startswith("error:") and needle in err[-1]
    assert not out.exists()


@pytest.mark.slow
@pytest.mark.multirank
def test_two_rank_zero3_fused_equals_naive(assets, tmp_path):
    """2 ranks, ZeRO-3 student and ZeRO-3 teacher (all parameters partitioned): same losses fused and naive."""
    import subprocess
    import sys

    from kd_engine.dist import free_port

    tiny.ds_config_file(tmp_path / "z3.json")
    torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
    for impl in ("fused", "naive"):
        argv = _causal(assets, tmp_path / impl, impl, "--deepspeed", str(tmp_path / "z3.json"),
                       "--per_device_train_batch_size", "2")
        cmd = [torchrun, "--nproc_per_node", "2", "--master_addr", "127.0.0.1", "--master_port", str(free_port()),
               os.path.abspath("launch/train.py"), *argv]
        r = subprocess.run(cmd, env=tiny.cpu_env({"KD_ENGINE_CACHE": str(tmp_path / "cache")}), capture_output=True,
                           text=True, timeout=400)
        assert r.returncode == 0, r.stderr[-3000:]
    a, b = _losses(tmp_path / "fused"), _losses(tmp_path / "naive")
    assert len(a) == len(b) == 3
    for ra, rb in zip(a, b):
        for x, y in zip(ra, rb):
            assert x == pytest.approx(y, rel=1e-4, abs=1e-6)
