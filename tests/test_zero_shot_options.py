"""Zero-shot teacher improvements (issue 25 part 2): label-prior calibration, several templates / class
descriptions per class, extra unlabeled text, a dev split with gold labels, and self-training with a distilled
student as the teacher."""
from __future__ import annotations

import json

import pytest
import torch

import tiny
from kd_engine.errors import KDError
from kd_engine.teachers.calibration import apply_weights, prior_weights, target_prior
from kd_engine.teachers.zero_shot import EmbeddingTeacher, NLITeacher, group_mean
from kd_engine.teachers.zero_shot_inputs import class_prompts, load_descriptions, load_templates
from test_zero_shot_method import CLASSES, args, make_nli_teacher, run


@pytest.fixture(scope="module", autouse=True)
def _single_process_env(tmp_path_factory):
    tiny.single_process_env(str(tmp_path_factory.mktemp("kdcache")))


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    d = tmp_path_factory.mktemp("zso")
    make_nli_teacher(str(d / "nli"))
    tiny.write_lines(str(d / "train.txt"), tiny.sentences(48))
    tiny.write_lines(str(d / "classes.txt"), CLASSES)
    rows = ["text\tlabel"] + [f"{s}\t{CLASSES[i % 3]}" for i, s in enumerate(tiny.sentences(40, seed=3))]
    tiny.write_lines(str(d / "labeled.tsv"), rows)
    tiny.write_lines(str(d / "templates.txt"), ["the {}", "a {} here", "{}"])
    (d / "desc.tsv").write_text("cat\tsmall cat\ndog\tbig dog\ndog\tthe dog runs\n")
    return d


# ------------------------------------------------------------------------------------ calibration (pure)

def test_prior_weights_hand_case():
    p = torch.tensor([[0.9, 0.1], [0.6, 0.4]])  # mean (0.75, 0.25): the teacher leans to class 0
    w = prior_weights(p, target_prior(2))
    # uniform mean needs w1/w0 = r with 0.1r/(0.9+0.1r) + 0.4r/(0.6+0.4r) = 1 -> 0.04 r^2 = 0.54 -> r = sqrt(13.5)
    r = 13.5 ** 0.5
    torch.testing.assert_close(w, torch.tensor([1 / r, 1.0], dtype=torch.float64), atol=1e-6, rtol=0)
    q = apply_weights(p, w)
    torch.testing.assert_close(q.mean(0), torch.tensor([0.5, 0.5]), atol=1e-6, rtol=0)
    torch.testing.assert_close(q.sum(-1), torch.ones(2))
    assert q.argmax(-1).tolist() == [0, 1]  # the second text changes class, the first does not
    assert bool((q[:, 1].argsort() == p[:, 1].argsort()).all())  # ranking within a class is kept


def test_prior_weights_target_and_no_op():
    p = torch.softmax(torch.randn(200, 4, generator=torch.Generator().manual_seed(0)) * 2, -1)
    prior = target_prior(4, [4, 3, 2, 1])
    torch.testing.assert_close(prior, torch.tensor([0.4, 0.3, 0.2, 0.1], dtype=torch.float64))
    q = apply_weights(p, prior_weights(p, prior))
    torch.testing.assert_close(q.mean(0).double(), prior, atol=1e-6, rtol=0)
    balanced = apply_weights(p, prior_weights(p, p.mean(0).double()))  # already at its prior: unchanged
    torch.testing.assert_close(balanced, p, atol=1e-5, rtol=0)


def test_prior_errors():
    with pytest.raises(KDError, match="3 values for 2 classes"):
        target_prior(2, [1, 2, 3])
    with pytest.raises(KDError, match="> 0"):
        target_prior(2, [1, 0])
    with pytest.raises(KDError, match=r"no probability to class\(es\) \[1\]"):
        prior_weights(torch.tensor([[1.0, 0.0], [1.0, 0.0]]), target_prior(2))


# ------------------------------------------------------------------------------------------ prompts

def test_prompts_files_and_grouping(tmp_path, assets):
    assert load_templates(str(assets / "templates.txt")) == ["the {}", "a {} here", "{}"]
    desc = load_descriptions(str(assets / "desc.tsv"), CLASSES)
    assert desc == {"cat": ["small cat"], "dog": ["big dog", "the dog runs"]}
    hyps, group = class_prompts(CLASSES, ["the {}", "{}"], desc)
    assert hyps == ["the cat", "cat", "the small cat", "small cat", "the dog", "dog", "the big dog", "big dog",
                    "the the dog runs", "the dog runs", "the car", "car"]
    assert group == [0] * 4 + [1] * 6 + [2] * 2
    x = torch.arange(2 * 12, dtype=torch.float32).view(2, 12)
    m = group_mean(x.unsqueeze(-1), group, 3)[..., 0]
    torch.testing.assert_close(m[0], torch.tensor([1.5, 6.5, 10.5]))
    (tmp_path / "bad.tsv").write_text("cow\tmilk\n")
    with pytest.raises(KDError, match="'cow' is not a class name"):
        load_descriptions(str(tmp_path / "bad.tsv"), CLASSES)
    (tmp_path / "notab.tsv").write_text("cat small\n")
    with pytest.raises(KDError, match="line 1: expected"):
        load_descriptions(str(tmp_path / "notab.tsv"), CLASSES)
    (tmp_path / "t.txt").write_text("the {}\nno field\n")
    with pytest.raises(KDError, match="exactly once"):
        load_templates(str(tmp_path / "t.txt"))


def test_nli_teacher_averages_logits_over_each_class_prompts(assets):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    model = AutoModelForSequenceClassification.from_pretrained(str(assets / "nli")).eval()
    tok = AutoTokenizer.from_pretrained(str(assets / "nli"))
    texts = tiny.sentences(5, seed=9)
    templates = ["the {}", "a {} here"]
    desc = {"dog": ["big dog"]}
    many = NLITeacher(model, tok, templates, CLASSES, name="t", descriptions=desc)
    ref = []  # one single-template teacher per (template, description), averaged by hand
    for k, c in enumerate(CLASSES):
        rows = [NLITeacher(model, tok, t, [d, "zz" + d], name="t").logits(texts)[:, 0]
                for d in [c] + desc.get(c, []) for t in templates]
        ref.append(torch.stack(rows).mean(0))
    torch.testing.assert_close(many.logits(texts), torch.stack(ref, 1), atol=1e-5, rtol=1e-4)
    assert "hypotheses" in many.cache_key()
    assert "hypotheses" not in NLITeacher(model, tok, "the {}", CLASSES, name="t").cache_key()  # key unchanged


def test_embedding_teacher_uses_class_centroids(assets):
    from transformers import BertModel, AutoTokenizer

    enc = BertModel.from_pretrained(str(assets / "nli")).eval()
    tok = AutoTokenizer.from_pretrained(str(assets / "nli"))
    texts = tiny.sentences(4, seed=5)
    t = EmbeddingTeacher(enc, tok, ["the {}", "{}"], CLASSES, temperature=0.1, descriptions={"car": ["red car"]})
    e = t.embed(["the cat", "cat", "the dog", "dog", "the car", "car", "the red car", "red car"])
    cents = torch.stack([e[0:2].mean(0), e[2:4].mean(0), e[4:8].mean(0)])
    cents = torch.nn.functional.normalize(cents, dim=-1)
    ref = torch.softmax(t.embed(texts) @ cents.T / 0.1, -1)
    torch.testing.assert_close(t(texts), ref, atol=1e-5, rtol=1e-4)


# ------------------------------------------------------------------------------------- the method

def _zs(assets, out, *extra):
    argv = args(assets, out, "--max_steps", "10", *extra)
    return argv


def test_dev_split_with_gold_labels_calibration_and_extra_text(assets, tmp_path):
    """--eval_split of a labeled table: accuracy on the held-out rows (same rows for two seeds with --split_seed);
    calibration makes the training labels' mean uniform; extra texts train, an extra text equal to a dev text is
    dropped."""
    from kd_engine.config import TrainConfig
    from kd_engine.data.split import split_rows

    labeled = assets / "labeled.tsv"
    dev_row = split_rows(TrainConfig(eval_split=0.25, seed=99, split_seed=3), 40).eval[0]
    dev_text = open(labeled).read().splitlines()[1 + dev_row].split("\t")[0]
    (tmp_path / "extra.txt").write_text("\n".join(tiny.sentences(6, seed=11) + [dev_text]) + "\n")
    common = ["--data_file", str(labeled), "--label_column", "label", "--eval_split", "0.25", "--split_seed",
              "3", "--extra_text_files", str(tmp_path / "extra.txt"), "--prior_calibration", "uniform",
              "--hypothesis_templates_file", str(assets / "templates.txt"), "--class_descriptions_file",
              str(assets / "desc.tsv")]
    tr, m = run(_zs(assets, tmp_path / "a", *common))
    info = tr.data.info
    assert info["train_texts"] == 30 + 6 and info["extra_texts"] == 6 and info["extra_dropped_as_eval"] == 1
    assert info["eval_texts"] == 10 and 0 <= m["accuracy"] <= 1 and 0 <= m["teacher_accuracy"] <= 1
    assert info["hypotheses_per_class"] == 3 * (1 + 1)  # templates x (name + one description), averaged
    soft = torch.tensor(tr.data.train.columns["soft_labels"])
    torch.testing.assert_close(soft.mean(0), torch.full((3,), 1 / 3), atol=1e-5, rtol=0)
    assert info["prior_weights"] != [1.0, 1.0, 1.0] and "teacher_accuracy_uncalibrated" in info
    tr2, _ = run(_zs(assets, tmp_path / "b", *common, "--seed", "7"))
    assert _dev(tr2) == _dev(tr)  # one dev set across training seeds
    tr3, _ = run(_zs(assets, tmp_path / "c", *common, "--split_seed", "4"))  # the last value counts
    assert _dev(tr3) != _dev(tr)


def _dev(tr) -> list:
    return [tuple(x) for x in tr.data.eval.columns["input_ids"]]


def test_self_training_round_with_a_classifier_teacher(assets, tmp_path):
    """Round 2: the round-1 student (auto-detected as a classifier over the class names) labels the corpus;
    a fresh student built from --student_base learns those labels."""
    tr1, _ = run(_zs(assets, tmp_path / "r1", "--max_steps", "30"))
    final = tmp_path / "r1" / "final"
    cfg = json.loads((final / "config.json").read_text())
    cfg["id2label"] = {"0": "car", "1": "cat", "2": "dog"}  # columns in another order: put back in class order
    cfg["label2id"] = {"car": 0, "cat": 1, "dog": 2}
    (final / "config.json").write_text(json.dumps(cfg))
    argv = _zs(assets, tmp_path / "r2", "--student_base", str(assets / "nli"), "--temperature", "1.0",
               "--student.layers", "2")
    argv[argv.index("--teacher") + 1] = str(final)
    tr2, _ = run(argv)
    assert tr2.data.info["teacher_type"] == "classifier"
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from kd_engine.teachers.zero_shot import read_texts

    texts, _ = read_texts(str(assets / "train.txt"))
    model = AutoModelForSequenceClassification.from_pretrained(str(final)).eval()
    tok = AutoTokenizer.from_pretrained(str(final))
    with torch.no_grad():
        logits = model(**tok(texts, padding=True, return_tensors="pt")).logits[:, [1, 2, 0]]
    torch.testing.assert_close(torch.tensor(tr2.data.train.columns["soft_labels"]), torch.softmax(logits, -1),
                               atol=1e-5, rtol=1e-4)
    assert tr2.student.module.config.num_hidden_layers == 2  # built from the 2-layer base (round 1 has 1 layer)


@pytest.mark.parametrize("extra, msg", [
    (["--hypothesis_templates_file", "nope.txt"], "hypothesis templates file not found"),
    (["--class_descriptions_file", "{d}/bad.tsv"], "'cow' is not a class name"),
    (["--class_prior", "1,2"], "2 values for 3 classes"),
    (["--prior_calibration", "uniformly"], "prior_calibration must be none or uniform"),
    (["--extra_text_files", "{d}/train.txt,missing.txt"], "extra text file not found: missing.txt"),
    (["--label_column", "label", "--eval_split", "0.2"], "needs a table"),
])
def test_bad_input_is_one_clear_error_before_any_write(assets, tmp_path, extra, msg):
    import subprocess
    import sys

    (tmp_path / "bad.tsv").write_text("cow\tmilk\n")
    out = tmp_path / "out"
    argv = args(assets, out) + [x.replace("{d}", str(assets)) if x.startswith("{d}") else x for x in extra]
    argv = [x if x != f"{assets}/bad.tsv" else str(tmp_path / "bad.tsv") for x in argv]
    r = subprocess.run([sys.executable, "launch/train.py", *argv], capture_output=True, text=True,
                       env=tiny.cpu_env(), cwd=str(tiny_root()))
    assert r.returncode == 2, r.stderr[-2000:]
    assert msg in r.stderr and r.stderr.count("error:") == 1
    assert not out.exists() and not (tmp_path / "labels").exists()


def tiny_root():
    import os

    return os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
