"""The zero_shot method end to end with real DeepSpeed on CPU: tiny random NLI teacher -> 1-layer student."""
import os
import subprocess
import sys

import pytest
import torch

import tiny
from kd_engine.config import build_config
from kd_engine.dist import free_port
from kd_engine.errors import KDError
from kd_engine.methods.zero_shot import soft_label_loss

CLASSES = ["cat", "dog", "car"]
CNE = {"contradiction": 0, "neutral": 1, "entailment": 2}


@pytest.fixture(scope="module", autouse=True)
def _single_process_env(tmp_path_factory):
    tiny.single_process_env(str(tmp_path_factory.mktemp("kdcache")))


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    d = tmp_path_factory.mktemp("zs")
    make_nli_teacher(str(d / "nli"))
    lines = tiny.sentences(48)
    lines.insert(5, "")  # a blank line: skipped and counted
    tiny.write_lines(str(d / "train.txt"), lines)
    tiny.write_lines(str(d / "classes.txt"), CLASSES)
    return d


def make_nli_teacher(path: str) -> None:
    """Tiny random NLI BERT whose entailment logits really depend on the text (initializer_range 0.5: the
    default 0.02 gives the same logits for every input), saved with a fast BERT-style tokenizer."""
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=tiny.vocab_size(), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                     num_attention_heads=4, max_position_embeddings=128, num_labels=3, label2id=CNE,
                     id2label={v: k for k, v in CNE.items()}, initializer_range=0.5, hidden_dropout_prob=0.0,
                     attention_probs_dropout_prob=0.0)
    BertForSequenceClassification(cfg).save_pretrained(path)
    tiny.make_tokenizer(path, "bert")


def run(argv):
    from kd_engine.engine.trainer import Trainer

    tr = Trainer(build_config(argv))
    metrics = tr.fit()
    return tr, metrics


def args(assets, out, *extra):
    return ["--method", "zero_shot", "--teacher", str(assets / "nli"), "--data_file", str(assets / "train.txt"),
            "--class_names_file", str(assets / "classes.txt"), "--hypothesis_template", "the {}",
            "--temperature", "0.1", "--student.layers", "1", "--output_dir", str(out), "--max_steps", "150",
            "--per_device_train_batch_size", "8", "--learning_rate", "1e-2", "--logging_steps", "50",
            "--disable_tqdm", "true", "--label_cache_dir", str(out.parent / "labels"), *extra]


def test_soft_label_losses():
    s = torch.tensor([[2.0, 0.0, -1.0], [0.0, 0.0, 0.0]])
    p = torch.tensor([[0.7, 0.3, 0.0], [1 / 3, 1 / 3, 1 / 3]])
    logq = torch.log_softmax(s, -1)
    ce = -(p * logq).sum(-1).mean()
    torch.testing.assert_close(soft_label_loss(s, p, "soft_ce", False), ce)
    ent = -(0.7 * torch.log(torch.tensor(0.7)) + 0.3 * torch.log(torch.tensor(0.3))) + torch.log(torch.tensor(3.0))
    torch.testing.assert_close(soft_label_loss(s, p, "kl", False), ce - ent / 2)
    torch.testing.assert_close(soft_label_loss(logq, logq.exp(), "kl", False), torch.tensor(0.0), atol=1e-6,
                               rtol=0)
    m = torch.tensor([[0.9, 0.2, 0.5], [0.1, 0.0, 1.0]])
    torch.testing.assert_close(soft_label_loss(s, m, "soft_ce", True),
                               torch.nn.functional.binary_cross_entropy(torch.sigmoid(s), m))


@pytest.mark.slow
def test_student_learns_teacher_and_pipeline_returns_class_names(assets, tmp_path):
    from transformers import pipeline

    out = tmp_path / "run1"
    tr, metrics = run(args(assets, out))
    assert metrics["teacher_agreement"] >= 0.95, metrics  # ~100% train agreement on a tiny set (methods.md §5)
    assert tr.data.info["blank_lines_skipped"] == 1 and tr.data.info["train_texts"] == 48
    clf = pipeline("text-classification", model=str(out / "final"), top_k=None)
    scores = clf(["the cat runs", "a red car"])
    assert all(sorted(d["label"] for d in row) == sorted(CLASSES) for row in scores)
    caches = sorted((tmp_path / "labels").glob("*/labels.pt"))  # one folder per labeling key
    assert len(caches) == 1
    cache = caches[0]
    stamp = os.path.getmtime(cache)
    # a second run with another student reuses the labels (the cache file is not rewritten)
    tr2, _ = run(args(assets, tmp_path / "run2", "--max_steps", "2", "--student.layers", "2"))
    assert os.path.getmtime(cache) == stamp and len(list((tmp_path / "labels").glob("*/labels.pt"))) == 1
    assert tr.data.info["train_teacher_calls"] == 1 and tr2.data.info["train_teacher_calls"] == 0


def test_bad_inputs(assets, tmp_path):
    (tmp_path / "one.txt").write_text("cat\n")
    (tmp_path / "empty.txt").write_text("\n\n")
    cases = [
        (["--class_names_file", str(tmp_path / "one.txt")], "at least 2"),
        (["--data_file", str(tmp_path / "empty.txt")], "no text"),
        (["--hypothesis_template", "no placeholder"], "exactly once"),
    ]
    for extra, msg in cases:
        with pytest.raises(KDError, match=msg):
            run(args(assets, tmp_path / "bad", "--overwrite_output_dir", "true", *extra))


@pytest.mark.slow
@pytest.mark.multirank
def test_two_rank_run_labels_like_one_rank(assets, tmp_path):
    """torchrun, 2 ranks: labeling is sharded + gathered inside the engine's setup (no deadlock with its
    rank-0-first data building) and the cached labels equal a 1-process labeling."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from kd_engine.teachers.labeling import label_corpus
    from kd_engine.teachers.zero_shot import NLITeacher, read_texts

    out = tmp_path / "run"
    argv = [a for a in args(assets, out, "--max_steps", "2", "--teacher_batch_size", "8")]
    env = tiny.cpu_env({"KD_ENGINE_CACHE": str(tmp_path / "kdcache")})
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(free_port()), "launch/train.py", *argv]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    cached = sorted((tmp_path / "labels").glob("*/labels.pt"))
    assert len(cached) == 1
    labels = torch.load(cached[0], weights_only=True)["probs"]
    model = AutoModelForSequenceClassification.from_pretrained(str(assets / "nli")).eval()
    tok = AutoTokenizer.from_pretrained(str(assets / "nli"))
    texts, _ = read_texts(str(assets / "train.txt"))
    one = label_corpus(NLITeacher(model, tok, "the {}", CLASSES, temperature=0.1), texts, batch_size=8)
    torch.testing.assert_close(labels, one, atol=1e-5, rtol=1e-4)
    assert os.path.isfile(out / "final" / "config.json")


@pytest.mark.slow
def test_multi_label_run_learns_per_class_decisions(assets, tmp_path):
    """--multi_label: labels are per-class P(entail) in [0, 1] (rows need not sum to 1), the student learns the
    per-class decisions with BCE, and the exported pipeline gives independent sigmoid scores named by class."""
    from transformers import AutoConfig, pipeline

    out = tmp_path / "ml"
    _, metrics = run(args(assets, out, "--multi_label", "true", "--temperature", "1.0", "--max_steps", "200"))
    labels = torch.load(next((tmp_path / "labels").glob("*/labels.pt")), weights_only=True)["probs"]
    assert labels.shape == (48, len(CLASSES)) and bool(((labels >= 0) & (labels <= 1)).all())
    assert not torch.allclose(labels.sum(-1), torch.ones(48), atol=1e-3)  # independent per class, not a softmax
    assert metrics["teacher_agreement"] >= 0.9, metrics  # per (text, class) decision at 0.5
    assert 0 <= metrics["teacher_exact_match"] <= metrics["teacher_agreement"]
    assert AutoConfig.from_pretrained(str(out / "final")).problem_type == "multi_label_classification"
    row = pipeline("text-classification", model=str(out / "final"), top_k=None)(["the cat runs"])[0]
    assert sorted(d["label"] for d in row) == sorted(CLASSES)
    assert abs(sum(d["score"] for d in row) - 1.0) > 1e-3  # sigmoid scores, not a softmax


@pytest.mark.slow
def test_student_from_path_gets_a_new_head(assets, tmp_path):
    """--student PATH: an existing encoder of another shape (same tokenizer) gets a K-way head named by class."""
    from transformers import AutoConfig, BertConfig, BertModel, pipeline

    torch.manual_seed(1)
    cfg = BertConfig(vocab_size=tiny.vocab_size(), hidden_size=48, intermediate_size=96, num_hidden_layers=1,
                     num_attention_heads=4, max_position_embeddings=128)
    BertModel(cfg).save_pretrained(str(tmp_path / "enc"))
    tiny.make_tokenizer(str(tmp_path / "enc"), "bert")
    out = tmp_path / "run"
    _, metrics = run(args(assets, out, "--student", str(tmp_path / "enc")))
    assert metrics["teacher_agreement"] >= 0.9, metrics
    got = AutoConfig.from_pretrained(str(out / "final"))
    assert (got.hidden_size, got.num_hidden_layers, got.num_labels) == (48, 1, 3)
    assert [got.id2label[i] for i in range(3)] == CLASSES
    row = pipeline("text-classification", model=str(out / "final"), top_k=None)(["a red car"])[0]
    assert sorted(d["label"] for d in row) == sorted(CLASSES)


def test_embedding_teacher_end_to_end(assets, tmp_path):
    """A plain encoder (no NLI head) is used as a bi-encoder teacher (auto-detected); its labels are
    softmax(cos / T) over the templated class names, and training on them runs to an exported classifier."""
    from transformers import BertConfig, BertModel

    from kd_engine.teachers.zero_shot import EmbeddingTeacher

    torch.manual_seed(2)
    cfg = BertConfig(vocab_size=tiny.vocab_size(), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                     num_attention_heads=4, max_position_embeddings=128, initializer_range=0.5)
    BertModel(cfg).save_pretrained(str(tmp_path / "enc"))
    tiny.make_tokenizer(str(tmp_path / "enc"), "bert")
    out = tmp_path / "run"
    argv = args(assets, out, "--max_steps", "20")
    argv[argv.index("--teacher") + 1] = str(tmp_path / "enc")
    tr, metrics = run(argv)
    assert tr.data.info["teacher_type"] == "embedding" and 0 <= metrics["teacher_agreement"] <= 1
    labels = torch.load(next((tmp_path / "labels").glob("*/labels.pt")), weights_only=True)["probs"]
    torch.testing.assert_close(labels.sum(-1), torch.ones(48))
    from transformers import AutoTokenizer

    from kd_engine.teachers.labeling import label_corpus
    from kd_engine.teachers.zero_shot import read_texts

    enc = BertModel.from_pretrained(str(tmp_path / "enc")).eval()
    teacher = EmbeddingTeacher(enc, AutoTokenizer.from_pretrained(str(tmp_path / "enc")), "the {}", CLASSES,
                               temperature=0.1)
    texts, _ = read_texts(str(assets / "train.txt"))
    torch.testing.assert_close(labels, label_corpus(teacher, texts, batch_size=8), atol=1e-5, rtol=1e-4)
    assert os.path.isfile(out / "final" / "config.json")
