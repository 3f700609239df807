"""Compiled zero-shot teachers (``--teacher_compile``): torch.compile with frozen weights, labels equal to eager."""
from __future__ import annotations

import pytest
import torch

from kd_engine.errors import KDError
from kd_engine.models.compiled import CompiledInference, check_compile_toolchain
from kd_engine.teachers.labeling import labeling_key
from kd_engine.teachers.zero_shot import EmbeddingTeacher, NLITeacher
from test_zero_shot_teacher import CLASSES, TEMPLATE, TEXTS, WORDS, tiny_nli


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    from transformers import BertTokenizer

    path = tmp_path_factory.mktemp("vocab") / "vocab.txt"
    path.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + WORDS) + "\n")
    return BertTokenizer(vocab=str(path))


@pytest.mark.slow
def test_compiled_nli_and_embedding_teachers_equal_eager(tok):
    import torch._dynamo

    torch._dynamo.reset()
    model = tiny_nli(tok, seed=3).requires_grad_(False)
    eager = NLITeacher(model, tok, TEMPLATE, CLASSES)
    compiled_model = CompiledInference(model)
    compiled = NLITeacher(compiled_model, tok, TEMPLATE, CLASSES)
    frames0 = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    for bs in (3, 7):  # batches of several widths and sizes: one dynamic graph, not one per shape
        torch.testing.assert_close(compiled(TEXTS, bs), eager(TEXTS, bs), atol=1e-6, rtol=1e-5)
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"] - frames0
    assert 1 <= graphs <= 3, graphs  # it did compile, and did not recompile for every batch shape
    # the compiled teacher is the same teacher for the label cache (same weights fingerprint, same key)
    assert labeling_key(compiled, TEXTS) == labeling_key(eager, TEXTS)
    assert compiled_model.config is model.config and compiled_model.training is False
    # the embedding teacher reads last_hidden_state through the same wrapper
    enc = model.base_model
    e_eager = EmbeddingTeacher(enc, tok, TEMPLATE, CLASSES)
    e_comp = EmbeddingTeacher(CompiledInference(enc), tok, TEMPLATE, CLASSES)
    torch.testing.assert_close(e_comp(TEXTS, 4), e_eager(TEXTS, 4), atol=1e-6, rtol=1e-5)


def test_compiled_inference_refuses_a_trainable_model(tok):
    with pytest.raises(KDError, match="must be frozen"):
        CompiledInference(tiny_nli(tok))


def test_missing_cpp_compiler_is_named(monkeypatch):
    monkeypatch.setattr("shutil.which", lambda name: None)
    monkeypatch.delenv("CXX", raising=False)
    with pytest.raises(KDError, match="C\\+\\+ compiler"):
        check_compile_toolchain(torch.device("cpu"))
    check_compile_toolchain(torch.device("meta"))  # only CPU inductor builds C++ here


@pytest.mark.slow
def test_teacher_compile_run_labels_like_eager(tmp_path):
    """``--teacher_compile true`` end to end: the compiled teacher's labels equal the eager run's, and the
    student built from it (--student.layers) is the same."""
    import tiny
    from test_zero_shot_method import CLASSES as ZS_CLASSES, args, make_nli_teacher, run

    tiny.single_process_env(str(tmp_path / "kdcache"))
    make_nli_teacher(str(tmp_path / "nli"))
    tiny.write_lines(str(tmp_path / "train.txt"), tiny.sentences(24))
    tiny.write_lines(str(tmp_path / "classes.txt"), ZS_CLASSES)
    eager, _ = run(args(tmp_path, tmp_path / "eager" / "out", "--max_steps", "1"))
    comp, _ = run(args(tmp_path, tmp_path / "comp" / "out", "--max_steps", "1", "--teacher_compile", "true"))
    soft = [torch.tensor(t.data.train.columns["soft_labels"]) for t in (eager, comp)]
    torch.testing.assert_close(soft[1], soft[0], atol=1e-5, rtol=1e-4)  # temperature 0.1 sharpens 1e-7 logit gaps
    assert comp.data.info["train_teacher_calls"] == 1  # labeled by the compiled teacher, not from a cache
    assert (tmp_path / "comp" / "labels").is_dir() and (tmp_path / "eager" / "labels").is_dir()
