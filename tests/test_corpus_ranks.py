"""Corpus token cache across ranks (barrier, polling, concurrent builders, rank-0 failure), real data and the CLI."""
from __future__ import annotations

import json
import os
import threading

import pytest

from kd_engine.data import corpus as C
from kd_engine.data import corpus_encode as CE
from kd_engine.errors import KDError

from test_corpus import ENWIKI, _corpus, minilm_tok, tok  # noqa: F401  (fixtures)


# ---- ranks --------------------------------------------------------------------------------------------------
def _run_ranks(fn):
    results, errors = {}, {}

    def target(rank):
        try:
            results[rank] = fn(rank)
        except BaseException as exc:  # noqa: BLE001
            errors[rank] = exc

    threads = [threading.Thread(target=target, args=(r,)) for r in (1, 0)]  # rank 1 starts waiting first
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    return results, errors


def test_other_ranks_wait_for_rank0_with_barrier_and_by_polling(tmp_path, tok):
    f, _ = _corpus(tmp_path)
    for mode in ("barrier", "poll"):
        barrier = threading.Barrier(2, timeout=60).wait if mode == "barrier" else None
        cache_dir = tmp_path / mode
        results, errors = _run_ranks(lambda r: C.build_or_load(
            [str(f)], tok, cache_dir, num_workers=1, progress=False, rank=r, world_size=2, barrier=barrier,
            poll_interval=0.05))
        assert not errors
        assert results[0].built and not results[1].built
        assert results[0].path == results[1].path
        assert results[1].tokens.tolist() == results[0].tokens.tolist()


def test_concurrent_builders_of_one_key_build_once(tmp_path, tok, monkeypatch):
    f, _ = _corpus(tmp_path)
    monkeypatch.setattr(CE, "CHUNK_DOCS", 2)  # a longer build, so that the two really overlap
    results, errors = _run_ranks(lambda r: C.build_or_load([str(f)], tok, tmp_path / "cache", num_workers=1,
                                                           progress=False))  # two independent "rank 0" jobs
    assert not errors
    assert sorted(c.built for c in results.values()) == [False, True]
    assert results[0].path == results[1].path


def test_rank0_failure_reaches_the_other_ranks(tmp_path, tok):
    f = tmp_path / "blank.txt"
    f.write_text("\n\n")
    barrier = threading.Barrier(2, timeout=60).wait
    results, errors = _run_ranks(lambda r: C.build_or_load(
        [str(f)], tok, tmp_path / "cache", num_workers=1, progress=False, rank=r, world_size=2, barrier=barrier))
    assert "no usable text" in str(errors[0])
    assert isinstance(errors[1], KDError) and "rank 0 did not build" in str(errors[1])
    # a rank failing before the barrier (here: a file only rank 0 sees) does not leave rank 0 hanging either
    good, _ = _corpus(tmp_path)
    barrier = threading.Barrier(2, timeout=60).wait
    results, errors = _run_ranks(lambda r: C.build_or_load(
        [str(good) if r == 0 else str(tmp_path / "only_on_rank0.txt")], tok, tmp_path / "cache", num_workers=1,
        progress=False, rank=r, world_size=2, barrier=barrier))
    assert 0 not in errors, errors
    assert results[0].built and "not found" in str(errors[1])
    with pytest.raises(KDError, match="waited"):
        C.build_or_load([str(f)], tok, tmp_path / "cache", rank=1, world_size=2, wait_timeout=0.1,
                        poll_interval=0.05)


# ---- real data, CLI -----------------------------------------------------------------------------------------
def test_enwiki_two_files_counts_are_plausible(tmp_path, minilm_tok):
    files = [os.path.join(ENWIKI, f"wiki_{i:02d}") for i in (0, 1)]
    if not all(os.path.isfile(p) for p in files):
        pytest.skip(f"enwiki sample not found at {ENWIKI} (shared data folder absent)")
    raw = b"".join(open(p, "rb").read() for p in files)
    n_doc_tags = raw.count(b"<doc ")
    n_words = len(raw.split())
    cache = C.build_or_load(files, minilm_tok, tmp_path / "cache", num_workers=2, progress=False)
    assert set(cache.meta["formats"].values()) == {"wiki"}
    assert 0.9 * n_doc_tags <= cache.num_documents <= n_doc_tags  # title-only stubs may drop out
    ratio = (cache.num_tokens - cache.num_documents) / n_words  # wordpieces per whitespace word
    assert 1.0 < ratio < 1.6, ratio
    first = minilm_tok.decode(cache.document(0)[:6].tolist())
    assert first.startswith("anarchism is a political"), first  # title line dropped
    blocks = C.PackedBlocks(cache, 128)
    assert len(blocks) == cache.num_tokens // 126
    assert blocks[len(blocks) // 2]["input_ids"][0] == minilm_tok.cls_token_id


def test_cli_prints_stats_and_fails_cleanly(tmp_path, capsys, minilm_tok):
    from kd_engine.models.loading import offline_model_path

    f = tmp_path / "a.jsonl"
    f.write_text("\n".join(json.dumps({"text": f"sentence number {i} about cats."}) for i in range(50)) + "\n")
    argv = ["--tokenizer", offline_model_path("all-minilm-l6-v2"), "--files", str(f), "--block_size", "16",
            "--cache_dir", str(tmp_path / "cache"), "--num_workers", "1", "--no_progress"]
    assert C.main(argv) == 0
    out = capsys.readouterr().out
    stats = dict(line.split(": ", 1) for line in out.strip().splitlines())
    assert stats["documents"] == "50"
    n_tokens = int(stats["tokens"].split()[0])
    assert n_tokens == sum(len(minilm_tok(f"sentence number {i} about cats.", add_special_tokens=False)
                               ["input_ids"]) + 1 for i in range(50))
    assert stats["blocks"].startswith(f"{n_tokens // 14} of 16")
    assert stats["skipped lines (not UTF-8)"] == "0"
    assert "built" in stats["cache"]
    assert C.main(argv) == 0 and "(reused)" in capsys.readouterr().out
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    assert C.main(argv[:3] + [str(empty)] + argv[4:]) == 2
    assert "no usable text in corpus files" in capsys.readouterr().err
