"""MiniLMv2 defaults that match the paper: random student init, the upper-middle teacher layer for deep teachers,
and per-document blocks (no block crosses a document boundary) next to packed and truncated ones."""
from types import SimpleNamespace

import pytest
import torch

import tiny
from kd_engine.config import build_config
from kd_engine.data.corpus import DocumentChunks, build_or_load
from kd_engine.errors import ConfigError


def test_student_init_defaults_per_method():
    assert build_config(["--method", "minilmv2"]).train.student.init == "random"
    assert build_config(["--method", "kd"]).train.student.init == "teacher_layers"
    assert build_config(["--method", "minilmv2", "--student.init", "teacher_layers"]).train.student.init \
        == "teacher_layers"


def test_minilmv2_builds_a_random_student_by_default(tmp_path):
    from transformers import AutoModel

    tiny.make_bert_classifier(str(tmp_path / "t"), layers=4, hidden=32)
    teacher = AutoModel.from_pretrained(str(tmp_path / "t"))

    def student(*extra):
        parsed = build_config(["--method", "minilmv2", "--teacher", str(tmp_path / "t"), "--student.layers", "2",
                               "--relation_heads", "8", *extra])
        m = parsed.method_cls(parsed.train, parsed.method_options)
        return m.load_student(SimpleNamespace(), teacher)

    copied = student("--student.init", "teacher_layers")
    random = student()
    t_layer = teacher.encoder.layer[0].attention.self.query.weight
    assert torch.equal(copied.encoder.layer[0].attention.self.query.weight, t_layer)
    assert not torch.equal(random.encoder.layer[0].attention.self.query.weight, t_layer)


@pytest.mark.parametrize("layers,expected", [(4, 4), (12, 12), (24, 21), (16, 14)])
def test_default_teacher_layer(layers, expected):
    parsed = build_config(["--method", "minilmv2"])
    m = parsed.method_cls(parsed.train, parsed.method_options)
    assert m._teacher_index(SimpleNamespace(num_layers=layers)) == expected - 1  # 0-based index


def test_blocks_option_and_its_old_name():
    assert build_config(["--method", "minilmv2", "--pack_blocks", "false"]).method_options.blocks == "truncated"
    assert build_config(["--method", "minilmv2", "--blocks", "documents"]).method_options.blocks == "documents"
    with pytest.raises(ConfigError, match="contradicts"):
        build_config(["--method", "minilmv2", "--pack_blocks", "false", "--blocks", "documents"])
    with pytest.raises(ConfigError, match="blocks must be one of"):
        build_config(["--method", "minilmv2", "--blocks", "pack"])


def test_document_chunks_cover_every_token_and_never_cross_documents(tmp_path):
    tok = tiny.make_tokenizer(str(tmp_path / "tok"), "bert")
    docs = [" ".join(tiny.WORDS[:n]) for n in (1, 7, 8, 15, 3)]
    tiny.write_lines(str(tmp_path / "c.txt"), docs)
    cache = build_or_load([str(tmp_path / "c.txt")], tok, tmp_path / "cache", num_workers=1, progress=False)
    ds = DocumentChunks(cache, max_length=7)  # [CLS] + 5 tokens + [SEP]
    items = [ds[i]["input_ids"] for i in range(len(ds))]
    assert len(ds) == 1 + 2 + 2 + 3 + 1
    assert all(len(x) <= 7 and x[0] == tok.cls_token_id and x[-1] == tok.sep_token_id for x in items)
    assert ds.lengths == [len(x) for x in items]
    # concatenating a document's blocks gives back the document, and no block mixes two documents
    bodies = [tok.decode(x[1:-1]) for x in items]
    per_doc, k = [], 0
    for d in docs:
        n = -(-len(d.split()) // 5)
        per_doc.append(" ".join(bodies[k:k + n]))
        k += n
    assert per_doc == docs
