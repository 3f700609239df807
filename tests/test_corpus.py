"""Pretraining-corpus pipeline: readers, token cache (key, reuse, atomicity), packing, workers (ranks and CLI:
test_corpus_ranks.py)."""
from __future__ import annotations

import json
import logging
import os
import pickle
import string

import numpy as np
import pytest
import torch

from kd_engine.data import corpus as C
from kd_engine.data import corpus_encode as CE
from kd_engine.errors import KDError

ENWIKI = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "enwiki_2015_sample")
SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def _tiny_tokenizer(tmp_path, words=("the", "cat", "sat", "on", "mat", "dog"), name="vocab.txt"):
    """A WordPiece tokenizer where every lowercase ASCII word tokenizes (whole word or letter pieces)."""
    from transformers import BertTokenizer

    letters = list(string.ascii_lowercase)
    vocab = SPECIALS + list(words) + letters + ["##" + c for c in letters] + list(".,!?")
    path = tmp_path / name
    path.write_text("\n".join(vocab) + "\n")
    return BertTokenizer(vocab=str(path))


@pytest.fixture
def tok(tmp_path):
    return _tiny_tokenizer(tmp_path)


@pytest.fixture(scope="module")
def minilm_tok():
    from transformers import AutoTokenizer

    from kd_engine.models.loading import offline_model_path

    try:
        path = offline_model_path("all-minilm-l6-v2")
    except KDError as exc:
        pytest.skip(f"all-MiniLM-L6-v2 package not installed: {exc}")
    return AutoTokenizer.from_pretrained(path)


def _docs(path, fmt, text_field="text"):
    stats = C.ReadStats()
    return list(C.iter_documents([str(path)], fmt, text_field, stats)), stats


def _encode(tokenizer, text):
    return tokenizer(text, add_special_tokens=False)["input_ids"]


# ---- readers ------------------------------------------------------------------------------------------------
def test_lines_reader_skips_blank_lines_and_strips(tmp_path):
    f = tmp_path / "a.txt"
    f.write_text("  first doc \n\n\t\nsecond doc\r\n   \nthird\n")
    docs, _ = _docs(f, "lines")
    assert docs == ["first doc", "second doc", "third"]


def test_paragraphs_reader_splits_on_blank_lines(tmp_path):
    f = tmp_path / "a.txt"
    f.write_text("\n\npara one line one\npara one line two\n\n\n  \npara two\n\npara three a\npara three b")
    docs, _ = _docs(f, "paragraphs")
    assert docs == ["para one line one\npara one line two", "para two", "para three a\npara three b"]


def test_jsonl_reader_text_field_and_bad_records(tmp_path):
    f = tmp_path / "a.jsonl"
    lines = [json.dumps({"body": "doc one", "id": 1}), "", "{not json", json.dumps({"other": "x"}),
             json.dumps({"body": 3}), json.dumps(["a list"]), json.dumps({"body": "  "}),
             json.dumps({"body": "doc\n\ntwo"})]
    f.write_text("\n".join(lines) + "\n")
    docs, stats = _docs(f, "jsonl", text_field="body")
    assert docs == ["doc one", "doc\n\ntwo"]
    assert stats.bad_records[str(f)] == 4  # bad json, missing field, non-string, not an object


WIKI = """<doc id="1" url="http://x?curid=1" title="Cats">
Cats

Cats are small animals.
They purr.
</doc>
stray text outside any document
<doc id="2" url="http://x?curid=2" title="Tom &amp; Jerry">
Tom &amp; Jerry is not the title line: kept.
Tom & Jerry
</doc>
<doc id="3" url="http://x?curid=3" title="Empty">
Empty
</doc>
<doc id="4" url="http://x?curid=4" title="Dogs">
Dogs bark.
Dogs
</doc>
"""


def test_wiki_reader_drops_repeated_title_line(tmp_path):
    f = tmp_path / "wiki_00"
    f.write_text(WIKI)
    docs, _ = _docs(f, "wiki")
    assert docs == [
        "Cats are small animals.\nThey purr.",
        # the first line differs from the unescaped title "Tom & Jerry": kept; the later one is text, kept too
        "Tom &amp; Jerry is not the title line: kept.\nTom & Jerry",
        # doc 3 has only its title: no document
        "Dogs bark.\nDogs",  # only the *first* line is compared with the title
    ]


def test_wiki_reader_title_with_entity_is_dropped(tmp_path):
    f = tmp_path / "wiki_01"
    f.write_text('<doc id="5" url="u" title="A &quot;B&quot; &amp; C">\nA "B" & C\n\nBody.\n</doc>\n')
    assert _docs(f, "wiki")[0] == ["Body."]


def test_auto_format_detection(tmp_path):
    (tmp_path / "w").write_text(WIKI)
    (tmp_path / "j.jsonl").write_text('{"text": "x"}\n')
    (tmp_path / "j.txt").write_text('\n{"text": "jsonl inside a txt"}\n')
    (tmp_path / "p.txt").write_text("plain {text}\nline two\n")
    assert C.detect_format(str(tmp_path / "w")) == "wiki"
    assert C.detect_format(str(tmp_path / "j.jsonl")) == "jsonl"
    assert C.detect_format(str(tmp_path / "j.txt")) == "jsonl"
    assert C.detect_format(str(tmp_path / "p.txt")) == "lines"
    docs = list(C.iter_documents([str(tmp_path / n) for n in ("w", "j.txt", "p.txt")], "auto"))
    assert docs[-3:] == ["jsonl inside a txt", "plain {text}", "line two"]
    with pytest.raises(KDError, match="unknown corpus format"):
        list(C.iter_documents([str(tmp_path / "w")], "csv"))


def test_resolve_files_dir_glob_list(tmp_path):
    d = tmp_path / "corpus"
    (d / "sub").mkdir(parents=True)
    for name in ("b.txt", "a.txt", "sub/c.txt", ".hidden"):
        (d / name).write_text("x\n")
    got = C.resolve_files(str(d))
    assert [os.path.relpath(p, d) for p in got] == ["a.txt", "b.txt", os.path.join("sub", "c.txt")]
    assert C.resolve_files(str(d / "*.txt")) == [str(d / "a.txt"), str(d / "b.txt")]
    # repeats removed, order kept
    assert C.resolve_files([str(d / "b.txt"), str(d / "*.txt")]) == [str(d / "b.txt"), str(d / "a.txt")]
    with pytest.raises(KDError, match="not found"):
        C.resolve_files(str(d / "missing.txt"))
    with pytest.raises(KDError, match="matches no file"):
        C.resolve_files(str(d / "*.jsonl"))
    (tmp_path / "emptydir").mkdir()
    with pytest.raises(KDError, match="contains no files"):
        C.resolve_files(str(tmp_path / "emptydir"))


# ---- bad input ----------------------------------------------------------------------------------------------
def test_non_utf8_line_is_skipped_counted_and_logged(tmp_path, tok, caplog):
    f = tmp_path / "mixed.txt"
    f.write_bytes(b"the cat sat\n\xff\xfe latin1 caf\xe9\nthe dog\n\xef\xbb\xbfnot a bom here \xc3\n")
    docs, stats = _docs(f, "lines")
    assert docs == ["the cat sat", "the dog"]
    assert stats.undecodable[str(f)] == 2
    with caplog.at_level(logging.WARNING, logger="kd_engine.data.corpus"):
        cache = C.build_or_load([str(f)], tok, tmp_path / "cache", num_workers=1, progress=False)
    assert cache.num_documents == 2
    assert cache.meta["skipped_undecodable_lines"] == 2
    assert cache.meta["skipped_undecodable_by_file"] == {str(f): 2}
    assert any("skipped 2 lines that are not UTF-8" in r.getMessage() for r in caplog.records)


def test_utf8_bom_is_not_text(tmp_path):
    f = tmp_path / "bom.txt"
    f.write_bytes(b"\xef\xbb\xbfhello\n")
    assert _docs(f, "lines")[0] == ["hello"]


@pytest.mark.parametrize("content", [b"", b"\n\n  \n", b"\xff\xfe\n\xc3\n"])
def test_empty_corpus_raises_kderror_naming_the_file(tmp_path, tok, content):
    f = tmp_path / "empty_corpus.txt"
    f.write_bytes(content)
    cache_dir = tmp_path / "cache"
    with pytest.raises(KDError, match="no usable text in corpus files .*empty_corpus.txt") as ei:
        C.build_or_load([str(f)], tok, cache_dir, num_workers=1, progress=False)
    if content.startswith(b"\xff"):
        assert "2 lines skipped as not UTF-8" in str(ei.value)
    # nothing that looks like a cache (or a leftover temp folder) remains
    assert [p for p in os.listdir(cache_dir) if not p.endswith(".lock")] == []


def test_jsonl_without_text_field_raises(tmp_path, tok):
    f = tmp_path / "a.jsonl"
    f.write_text('{"content": "the cat"}\n')
    with pytest.raises(KDError, match="1 jsonl records skipped without a string 'text' field"):
        C.build_or_load([str(f)], tok, tmp_path / "cache", num_workers=1, progress=False)


def test_bad_block_sizes(tmp_path, tok):
    f = tmp_path / "a.txt"
    f.write_text("the cat\n")
    cache = C.build_or_load([str(f)], tok, tmp_path / "cache", num_workers=1, progress=False)
    with pytest.raises(KDError, match="leaves no room"):
        C.PackedBlocks(cache, 2)
    with pytest.raises(KDError, match="fewer than one block"):
        C.PackedBlocks(cache, 64)
    with pytest.raises(KDError, match="max_length must be"):
        C.build_or_load([str(f)], tok, tmp_path / "cache", max_length=0)


# ---- cache ----------------------------------------------------------------------------------------------------
def _corpus(tmp_path, n=40):
    rng = np.random.default_rng(0)
    words = ["the", "cat", "sat", "on", "mat", "dog", "zebra", "quick", "fox", "jumps"]
    (tmp_path / "corpus").mkdir(exist_ok=True)
    f = tmp_path / "corpus" / "corpus.txt"
    lines = [" ".join(rng.choice(words, size=int(rng.integers(1, 30)))) + "." for _ in range(n)]
    f.write_text("\n".join(lines) + "\n")
    return f, lines


def test_cache_hit_then_key_changes(tmp_path, tok):
    f, _ = _corpus(tmp_path)
    cache_dir = tmp_path / "cache"
    kw = dict(num_workers=1, progress=False)
    first = C.build_or_load([str(f)], tok, cache_dir, **kw)
    assert first.built
    stamp = os.stat(os.path.join(first.path, "tokens.bin")).st_mtime_ns
    again = C.build_or_load([str(f)], tok, cache_dir, **kw)
    assert not again.built and again.path == first.path
    assert os.stat(os.path.join(first.path, "tokens.bin")).st_mtime_ns == stamp  # not rewritten
    # also reused through a different spelling of the same file (glob, relative path)
    assert C.build_or_load(str(tmp_path / "corpus" / "*.txt"), tok, cache_dir, **kw).path == first.path

    other_tok = _tiny_tokenizer(tmp_path, words=("the", "cat", "sat", "on", "mat", "cow"), name="vocab2.txt")
    assert len(other_tok) == len(tok)  # same size and class: the definition hash tells them apart
    by_tok = C.build_or_load([str(f)], other_tok, cache_dir, **kw)
    by_len = C.build_or_load([str(f)], tok, cache_dir, max_length=5, **kw)
    by_fmt = C.build_or_load([str(f)], tok, cache_dir, format="paragraphs", **kw)
    assert by_tok.built and by_len.built and by_fmt.built
    assert len({first.path, by_tok.path, by_len.path, by_fmt.path}) == 4
    assert by_fmt.num_documents == 1
    assert max(by_len.document_lengths()) == 5 and by_len.num_documents == first.num_documents

    with open(f, "a") as fh:
        fh.write("the fox\n")
    changed = C.build_or_load([str(f)], tok, cache_dir, **kw)
    assert changed.built and changed.path != first.path
    assert changed.num_documents == first.num_documents + 1


def test_cache_without_marker_is_rebuilt_and_stale_temp_removed(tmp_path, tok):
    f, _ = _corpus(tmp_path)
    cache_dir = tmp_path / "cache"
    first = C.build_or_load([str(f)], tok, cache_dir, num_workers=1, progress=False)
    expected = np.array(first.tokens)
    key = os.path.basename(first.path)
    os.remove(os.path.join(first.path, C.COMPLETE_MARKER))
    with open(os.path.join(first.path, "tokens.bin"), "r+b") as fh:  # damaged half-written data
        fh.truncate(4)
    stale = cache_dir / f".{key}.tmp-crashed"
    stale.mkdir()
    with pytest.raises(KDError, match="not complete"):
        C.TokenCache(first.path)
    rebuilt = C.build_or_load([str(f)], tok, cache_dir, num_workers=1, progress=False)
    assert rebuilt.built and rebuilt.path == first.path
    assert np.array_equal(np.array(rebuilt.tokens), expected)
    assert not stale.exists()


def test_crash_mid_build_leaves_no_cache(tmp_path, tok, monkeypatch):
    f, _ = _corpus(tmp_path)
    cache_dir = tmp_path / "cache"
    monkeypatch.setattr(CE, "CHUNK_DOCS", 5)
    real = CE.encode_chunk
    calls = {"n": 0}

    def dying(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("simulated crash")
        return real(*args, **kwargs)

    monkeypatch.setattr(CE, "encode_chunk", dying)
    with pytest.raises(RuntimeError, match="simulated crash"):
        C.build_or_load([str(f)], tok, cache_dir, num_workers=1, progress=False)
    assert [p for p in os.listdir(cache_dir) if not p.endswith(".lock")] == []
    monkeypatch.setattr(CE, "encode_chunk", real)
    cache = C.build_or_load([str(f)], tok, cache_dir, num_workers=1, progress=False)
    assert cache.built and cache.num_documents == 40


# ---- contents, packing ------------------------------------------------------------------------------------------
def test_stream_and_packing_equal_the_tokenized_documents(tmp_path, tok):
    f, lines = _corpus(tmp_path)
    cache = C.build_or_load([str(f)], tok, tmp_path / "cache", num_workers=1, progress=False)
    sep, cls = tok.sep_token_id, tok.cls_token_id
    expected = []
    for line in lines:
        expected += _encode(tok, line) + [sep]
    assert cache.tokens.dtype == np.uint16
    assert cache.tokens.tolist() == expected
    assert cache.num_documents == len(lines)
    assert cache.document(3).tolist() == _encode(tok, lines[3])

    block = 16
    plain = C.PackedBlocks(cache, block, add_special_tokens=False)
    assert len(plain) == len(expected) // block
    flat = [t for i in range(len(plain)) for t in plain[i]["input_ids"]]
    assert flat == expected[:len(plain) * block]  # blocks concatenate to the stream prefix
    assert plain[-1] == plain[len(plain) - 1]
    with pytest.raises(IndexError):
        plain[len(plain)]

    framed = C.PackedBlocks(cache, block)
    body = block - 2
    assert len(framed) == len(expected) // body
    for i in (0, 1, len(framed) - 1):
        item = framed[i]
        assert item["input_ids"] == [cls] + expected[i * body:(i + 1) * body] + [sep]
        assert item["attention_mask"] == [1] * block
        assert all(type(t) is int for t in item["input_ids"])


def test_document_blocks_truncate_and_frame(tmp_path, tok):
    f, lines = _corpus(tmp_path)
    cache = C.build_or_load([str(f)], tok, tmp_path / "cache", num_workers=1, progress=False)
    ds = C.DocumentBlocks(cache, max_length=10)
    assert len(ds) == len(lines)
    lengths = ds.lengths
    for i, line in enumerate(lines):
        ids = _encode(tok, line)
        item = ds[i]
        assert item["input_ids"] == [tok.cls_token_id] + ids[:8] + [tok.sep_token_id]
        assert item["attention_mask"] == [1] * len(item["input_ids"])
        assert lengths[i] == len(item["input_ids"]) <= 10


def test_bos_eos_tokenizer_framing():
    class GPTLike:
        cls_token_id = sep_token_id = None
        bos_token_id, eos_token_id = 1, 2

    spec = C.special_ids(GPTLike())
    assert spec == {"style": "bos_eos", "separator": 2, "prefix": [1], "suffix": []}
    GPTLike.eos_token_id = None
    with pytest.raises(KDError, match="neither a sep nor an eos"):
        C.special_ids(GPTLike())


def test_two_workers_give_the_same_cache_as_one(tmp_path, tok, monkeypatch):
    files = []
    for k in range(3):
        f = tmp_path / f"part{k}.txt"
        f.write_text("\n".join(f"the cat {k} sat on mat number {i} " + "fox " * (i % 7) for i in range(60)))
        files.append(str(f))
    monkeypatch.setattr(CE, "CHUNK_DOCS", 7)  # many chunks, several in flight at once
    one = C.build_or_load(files, tok, tmp_path / "c1", num_workers=1, progress=False)
    two = C.build_or_load(files, tok, tmp_path / "c2", num_workers=2, progress=False)
    assert two.built and two.meta["num_workers"] == 2
    for name in ("tokens.bin", "offsets.bin"):
        with open(os.path.join(one.path, name), "rb") as a, open(os.path.join(two.path, name), "rb") as b:
            assert a.read() == b.read()
    assert os.path.basename(one.path) == os.path.basename(two.path)  # workers are not part of the key


def test_dataset_after_pickle_and_in_dataloader_workers(tmp_path, tok):
    f, _ = _corpus(tmp_path)
    cache = C.build_or_load([str(f)], tok, tmp_path / "cache", num_workers=1, progress=False)
    ds = C.PackedBlocks(cache, 8)
    direct = [ds[i]["input_ids"] for i in range(len(ds))]
    clone = pickle.loads(pickle.dumps(ds))
    assert clone.cache._tokens is None  # memmaps are not pickled, reopened lazily
    assert [clone[i]["input_ids"] for i in range(len(ds))] == direct
    loader = torch.utils.data.DataLoader(ds, batch_size=4, num_workers=2,
                                         collate_fn=lambda b: [x["input_ids"] for x in b])
    assert [ids for batch in loader for ids in batch] == direct
