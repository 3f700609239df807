"""Shrink-and-fine-tune path for classifiers (issue 5's SST-2 run in miniature, tiny random BERTs).

A bare encoder (no head, like all-MiniLM-L6-v2) gets a fresh head through ``--method sft --num_labels K``; the
fine-tuned classifier is then shrunk (``--student.layers N``) and trained with ``sft`` and with ``kd``.
"""
from __future__ import annotations

import os

import pytest
import torch

import tiny
from kd_engine.config import build_config


@pytest.fixture(scope="module", autouse=True)
def _single_process_env(tmp_path_factory):
    with tiny.single_process_env_kept(str(tmp_path_factory.mktemp("kdcache"))):
        yield


def make_bert_encoder(path: str, layers: int = 4, hidden: int = 32, seed: int = 0):
    """A bare BertModel (architectures = ['BertModel'], no classification head) + a BERT tokenizer."""
    from transformers import BertConfig, BertModel

    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=tiny.vocab_size(), hidden_size=hidden, intermediate_size=hidden * 2,
                     num_hidden_layers=layers, num_attention_heads=4, max_position_embeddings=128,
                     hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    model = BertModel(cfg)
    model.save_pretrained(path)
    tiny.make_tokenizer(path, "bert")
    return model


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    d = tmp_path_factory.mktemp("sft_assets")
    make_bert_encoder(str(d / "encoder"), layers=4)
    tiny.write_classification_tsv(str(d / "train.tsv"), 64)
    tiny.write_classification_tsv(str(d / "eval.tsv"), 16, seed=1)
    return d


def run(argv):
    from kd_engine.engine.trainer import Trainer

    tr = Trainer(build_config(argv))
    tr.fit()
    return tr


def common(assets, out, *extra):
    return ["--train_file", str(assets / "train.tsv"), "--eval_file", str(assets / "eval.tsv"),
            "--text_column", "sentence", "--label_column", "label", "--max_length", "32",
            "--output_dir", str(out), "--per_device_train_batch_size", "8", "--learning_rate", "1e-3",
            "--disable_tqdm", "true", "--report_to", "none", *extra]


def _exported(out):
    from transformers import AutoModelForSequenceClassification

    folder = os.path.join(out, "final")
    assert os.path.isfile(os.path.join(folder, "config.json")), os.listdir(out)
    return AutoModelForSequenceClassification.from_pretrained(folder)


@pytest.mark.parametrize("num_labels", [2, 3])
def test_sft_puts_a_fresh_head_on_a_bare_encoder(assets, tmp_path, num_labels):
    from transformers import AutoModel

    tr = run(["--method", "sft", "--student", str(assets / "encoder"), "--num_labels", str(num_labels),
              *common(assets, tmp_path / "o", "--max_steps", "3")])
    assert tr.method.task == "sequence_classification"
    assert "accuracy" in tr.final_metrics
    model = _exported(str(tmp_path / "o"))
    assert model.config.num_labels == num_labels and model.config.num_hidden_layers == 4
    # the body was loaded from the encoder, not re-initialised: embeddings moved only by 3 small steps
    enc = AutoModel.from_pretrained(str(assets / "encoder"))
    w0, w1 = enc.embeddings.word_embeddings.weight, model.bert.embeddings.word_embeddings.weight
    assert torch.allclose(w0, w1, atol=0.05) and not torch.equal(w0, w1)


def test_sft_shrinks_a_bare_encoder_with_the_requested_head(assets, tmp_path):
    """--teacher ENCODER --student.layers 2 --num_labels 3: a 2-layer student with a 3-way head."""
    run(["--method", "sft", "--teacher", str(assets / "encoder"), "--student.layers", "2", "--num_labels", "3",
         *common(assets, tmp_path / "o", "--max_steps", "2")])
    model = _exported(str(tmp_path / "o"))
    assert model.config.num_labels == 3 and model.config.num_hidden_layers == 2


def test_fine_tuned_teacher_shrunk_then_sft_and_kd(assets, tmp_path):
    """The SST-2 demo in miniature: teacher = sft on a bare encoder; 4 -> 2 students trained with sft and kd."""
    from transformers import AutoModelForSequenceClassification

    from kd_engine.models.student import create_student

    teacher_run = run(["--method", "sft", "--student", str(assets / "encoder"), "--num_labels", "2",
                       *common(assets, tmp_path / "t", "--max_steps", "40")])
    teacher_dir = str(tmp_path / "t" / "final")
    teacher = AutoModelForSequenceClassification.from_pretrained(teacher_dir).eval()
    # both students start from the same copied layers; check that init against the teacher
    init = create_student(teacher, layers=2)
    lineage = init.config.kd_lineage if hasattr(init.config, "kd_lineage") else None
    assert init.config.num_hidden_layers == 2 and lineage is not None
    assert torch.equal(init.classifier.weight, teacher.classifier.weight)

    results = {}
    for method in ("sft", "kd"):
        out = tmp_path / method
        tr = run(["--method", method, "--teacher", teacher_dir, "--student.layers", "2",
                  *common(assets, out, "--max_steps", "20")])
        assert tr.method.task == "sequence_classification"
        assert (tr.teacher is None) == (method == "sft")
        student = _exported(str(out))
        assert student.config.num_hidden_layers == 2 and student.config.num_labels == 2
        assert student.config.id2label == teacher.config.id2label
        results[method] = tr.final_metrics
    assert {"accuracy", "teacher_agreement", "kd_kl"} <= set(results["kd"])
    assert "accuracy" in results["sft"] and "teacher_agreement" not in results["sft"]
    assert teacher_run.final_metrics["accuracy"] >= 0.5  # learnable task: the teacher is above chance


def test_named_string_labels_map_through_label2id(assets, tmp_path):
    """SST-2 style data with 'negative'/'positive' strings and a teacher whose label2id names them."""
    rows = open(assets / "train.tsv").read().splitlines()
    named = [rows[0]] + [f"{s}\t{'positive' if y == '1' else 'negative'}" for s, y in (r.split("\t") for r in rows[1:])]
    tiny.write_lines(str(tmp_path / "named.tsv"), named)
    tiny.make_bert_classifier(str(tmp_path / "teacher"), layers=2, label2id={"negative": 0, "positive": 1})
    tr = run(["--method", "kd", "--teacher", str(tmp_path / "teacher"), "--student.layers", "1",
              "--train_file", str(tmp_path / "named.tsv"), "--eval_split", "0.25", "--text_column", "sentence",
              "--label_column", "label", "--output_dir", str(tmp_path / "o"), "--max_steps", "2",
              "--disable_tqdm", "true", "--report_to", "none"])
    student = _exported(str(tmp_path / "o"))
    assert student.config.label2id == {"negative": 0, "positive": 1}
    assert "accuracy" in tr.final_metrics
