"""The minilmv2 method end to end through launch/train.py: a tiny BERT teacher, a text corpus, real DeepSpeed."""
import hashlib
import json
import os
import subprocess
import sys

import pytest

import tiny
from kd_engine.dist import free_port

pytestmark = pytest.mark.slow
TRAIN = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "launch", "train.py"))
BIN = os.path.dirname(sys.executable)


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    d = tmp_path_factory.mktemp("minilmv2_assets")
    tiny.make_bert_classifier(str(d / "teacher"), layers=4, hidden=32)  # any BERT head: AutoModel loads the encoder
    tiny.write_lines(str(d / "corpus.txt"), tiny.sentences(400, seed=1))
    return d


def _args(assets, out, *extra):
    return ["--method", "minilmv2", "--teacher", str(assets / "teacher"), "--student.layers", "2",
            "--student.hidden", "16", "--student.heads", "2", "--relation_heads", "8",  # random init: new width
            "--train_file", str(assets / "corpus.txt"), "--corpus_cache_dir", str(assets / "cache"),
            "--max_length", "32", "--per_device_train_batch_size", "8", "--learning_rate", "5e-3",
            "--logging_steps", "5", "--output_dir", str(out), "--report_to", "none", "--disable_tqdm", "true", *extra]


def _run(cmd, timeout=400):
    env = tiny.cpu_env()
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)


def _losses(out):
    rows = [json.loads(line) for line in open(os.path.join(out, "train_log.jsonl"))]
    return [r["loss"] for r in rows if r["split"] == "train"]


def _sha(path):
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


def test_relation_loss_falls_and_student_exports(assets, tmp_path):
    teacher_file = assets / "teacher" / "model.safetensors"
    before = _sha(teacher_file)
    out = tmp_path / "run"
    res = _run([sys.executable, TRAIN, *_args(assets, out, "--max_steps", "40", "--eval_split", "0.1",
                                              "--teacher_layer", "3", "--relation_chunk_size", "16",
                                              "--pack_blocks", "false")])  # padded batches
    assert res.returncode == 0, res.stderr[-3000:]
    losses = _losses(out)
    assert len(losses) == 8 and all(x == x and x >= 0 for x in losses)
    assert sum(losses[-2:]) < 0.8 * sum(losses[:2]), losses  # the relation loss falls
    rows = [json.loads(line) for line in open(out / "train_log.jsonl") if '"train"' in line]
    assert all(r["teacher_ms"] > 0 for r in rows)  # the Q/K/V teacher pass (ctx.teacher_hooks) is timed
    from transformers import AutoModel

    student = AutoModel.from_pretrained(str(out / "final"))
    assert (student.config.num_hidden_layers, student.config.hidden_size) == (2, 16)
    assert _sha(teacher_file) == before


def test_two_ranks_zero2_packed_blocks(assets, tmp_path):
    out = tmp_path / "z2"
    cmd = [os.path.join(BIN, "torchrun"), "--nproc_per_node", "2", "--master_addr", "127.0.0.1", "--master_port",
           str(free_port()), TRAIN, *_args(assets, out, "--max_steps", "10", "--deepspeed", "ds_configs/zero2.json")]
    res = _run(cmd)
    assert res.returncode == 0, res.stderr[-3000:]
    assert len(_losses(out)) == 2 and os.path.isdir(out / "final")


@pytest.mark.parametrize("extra,message", [
    (["--relation_heads", "5"], "relation_heads=5 does not divide the teacher's Q/K/V width 32"),
    (["--teacher_layer", "5"], "teacher_layer 5 is out of range: the teacher has 4 layers"),
    (["--relation_chunk_size", "zero"], "relation_chunk_size must be a positive integer"),
])
def test_bad_input_is_one_clear_error(assets, tmp_path, extra, message):
    res = _run([sys.executable, TRAIN, *_args(assets, tmp_path / "bad", "--max_steps", "2", *extra)])
    assert res.returncode == 2, res.stderr[-3000:]
    assert message in res.stderr + res.stdout
    assert "Traceback" not in res.stderr
