"""The shrink CLI (python -m kd_engine.shrink): writes a student, refuses to overwrite, random init, clear errors."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers
from transformers import AutoModel, AutoModelForSequenceClassification

from kd_engine.shrink import main as shrink_main

from test_student_builder import V, tiny

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("teacher")
    tiny("bert_cls").save_pretrained(d)
    vocab = d / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + [f"w{i}" for i in range(V - 5)]))
    transformers.BertTokenizer(vocab=str(vocab)).save_pretrained(d)
    return d


def _cli(*args):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    return subprocess.run([sys.executable, "-m", "kd_engine.shrink", *args], capture_output=True, text=True,
                          cwd=REPO, env=env, timeout=300)


def test_cli_writes_student_and_refuses_to_overwrite(teacher_dir, tmp_path):
    out = tmp_path / "student"
    r = _cli("--teacher", str(teacher_dir), "--layers", "3", "--output_dir", str(out))
    assert r.returncode == 0, r.stderr
    assert (out / "model.safetensors").exists() and (out / "config.json").exists()
    card = (out / "README.md").read_text()
    assert str(teacher_dir) in card and "[0, 6, 11]" in card and "| encoder layers | 12 | 3 |" in card
    student = AutoModelForSequenceClassification.from_pretrained(out)
    assert student.config.num_hidden_layers == 3
    assert student.config.kd_lineage["encoder_layers_copied"] == [0, 6, 11]
    teacher = AutoModelForSequenceClassification.from_pretrained(teacher_dir)
    assert torch.equal(student.bert.encoder.layer[1].attention.self.key.weight,
                       teacher.bert.encoder.layer[6].attention.self.key.weight)
    tok = transformers.AutoTokenizer.from_pretrained(out)
    assert tok("w1 w2")["input_ids"] == [2, 6, 7, 3]

    r = _cli("--teacher", str(teacher_dir), "--layers", "2", "--output_dir", str(out))
    assert r.returncode == 2
    assert "error:" in r.stderr and "already holds a model" in r.stderr and "--overwrite" in r.stderr
    assert "Traceback" not in r.stderr
    assert AutoModel.from_pretrained(out).config.num_hidden_layers == 3  # untouched


def test_cli_overwrite_and_errors_in_process(teacher_dir, tmp_path, capsys):
    out = tmp_path / "s"
    assert shrink_main(["--teacher", str(teacher_dir), "--layers", "2", "--output_dir", str(out)]) == 0
    assert shrink_main(["--teacher", str(teacher_dir), "--layers", "4", "--output_dir", str(out),
                        "--overwrite"]) == 0
    assert AutoModel.from_pretrained(out).config.num_hidden_layers == 4
    capsys.readouterr()
    cases = [
        (["--teacher", str(tmp_path / "nope"), "--layers", "2"], "teacher folder not found"),
        (["--teacher", str(teacher_dir), "--layers", "13"], "more encoder layers (13) than the teacher (12)"),
        (["--teacher", str(teacher_dir), "--layers", "0"], "at least 1"),
        (["--teacher", str(teacher_dir), "--hidden", "8"], "init='random'"),
        (["--teacher", str(teacher_dir), "--decoder_layers", "2"], "decoder_layers"),
    ]
    for i, (args, match) in enumerate(cases):
        assert shrink_main(args + ["--output_dir", str(tmp_path / f"bad{i}")]) == 2, args
        last = capsys.readouterr().err.strip().splitlines()[-1]
        assert last.startswith("error:") and match in last, (args, last)
    gpt2_dir = tmp_path / "gpt2"
    transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=V, n_embd=16, n_layer=2, n_head=2)
                                 ).save_pretrained(gpt2_dir)
    assert shrink_main(["--teacher", str(gpt2_dir), "--layers", "1", "--output_dir", str(tmp_path / "g")]) == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert "unsupported architecture 'gpt2'" in last and "bert" in last and "llama" in last
    assert shrink_main(["--teacher", str(teacher_dir), "--output_dir", str(teacher_dir), "--overwrite"]) == 2
    assert "teacher's folder" in capsys.readouterr().err


def test_cli_random_init(teacher_dir, tmp_path):
    out = tmp_path / "r"
    assert shrink_main(["--teacher", str(teacher_dir), "--layers", "2", "--hidden", "8", "--heads", "2",
                        "--init", "random", "--output_dir", str(out)]) == 0
    c = AutoModel.from_pretrained(out).config
    assert (c.num_hidden_layers, c.hidden_size, c.intermediate_size) == (2, 8, 32)
    assert "randomly initialised" in (out / "README.md").read_text()
