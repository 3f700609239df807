"""One rule for evaluation splits and data limits (kd_engine/data/split.py), followed by every method's data:
deterministic seeded hold-out, limits after the split, unsupported options are errors; caches follow
KD_ENGINE_CACHE."""
import json
import os
from types import SimpleNamespace

import pytest
import torch

import tiny
from kd_engine.config import TrainConfig, build_config
from kd_engine.data.split import split_rows
from kd_engine.errors import ConfigError, KDError
from kd_engine.methods.base import Method, register

N = 20  # line i has i + 1 words: the word count of a row names the row


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("rule")
    lines = [" ".join(tiny.WORDS[:i + 1]) for i in range(N)]
    tiny.write_lines(str(d / "train.txt"), lines)
    with open(d / "prompts.jsonl", "w") as fh:
        for line in lines:
            fh.write(json.dumps({"text": line}) + "\n")
    tok = tiny.make_tokenizer(str(d / "tok"), "bert")
    return d, tok


def test_split_is_seeded_and_limits_apply_after_it():
    cfg = TrainConfig(eval_split=0.25, seed=7, max_train_samples=5, max_eval_samples=3)
    a = split_rows(cfg, N)
    assert a == split_rows(cfg, N) and a.held_out
    full = split_rows(TrainConfig(eval_split=0.25, seed=7), N)
    assert len(full.eval) == 5 and sorted(full.eval + full.train) == list(range(N))  # a partition
    assert full.train == sorted(full.train)  # training rows keep their order
    assert a.train == full.train[:5] and a.eval == full.eval[:3]  # limits after the split
    assert split_rows(TrainConfig(eval_split=0.25, seed=8), N).eval != full.eval
    fixed = split_rows(TrainConfig(eval_split=0.25, seed=8, split_seed=7), N)  # one dev set, another seed
    assert fixed.eval == full.eval and fixed.train == full.train
    b = split_rows(TrainConfig(max_train_samples=4, max_eval_samples=2), N, n_eval_file=9)
    assert b.train == [0, 1, 2, 3] and b.eval == [0, 1] and not b.held_out
    assert split_rows(TrainConfig(), N).eval is None
    with pytest.raises(KDError, match="leaves none to train on"):
        split_rows(TrainConfig(eval_split=0.99), 3)


def test_eval_file_and_eval_split_exclude_each_other():
    with pytest.raises(ConfigError, match="exclude each other"):
        build_config(["--method", "kd", "--eval_file", "e.txt", "--eval_split", "0.1"])
    with pytest.raises(ConfigError, match="max_train_samples must be >= 1"):
        build_config(["--method", "kd", "--max_train_samples", "0"])


@register("toy_no_split")
class _NoSplit(Method):
    """Reads its own fixed evaluation data: --eval_split and the limits cannot apply."""

    data_options = ("eval_file",)


def test_an_option_a_method_cannot_honour_is_an_error():
    with pytest.raises(ConfigError, match="method 'toy_no_split' does not support --eval_split"):
        build_config(["--method", "toy_no_split", "--eval_split", "0.1"])
    with pytest.raises(ConfigError, match="does not support --max_train_samples"):
        build_config(["--method", "toy_no_split", "--max_train_samples", "3"])
    build_config(["--method", "toy_no_split", "--eval_file", "x.txt"])  # supported


def _row(tok, ids) -> int:
    ids = ids.tolist() if torch.is_tensor(ids) else list(ids)
    return len(tok.decode(ids, skip_special_tokens=True).split()) - 1


LIMITS = ["--eval_split", "0.25", "--seed", "7", "--max_train_samples", "5", "--max_eval_samples", "3"]


def _expected():
    return split_rows(TrainConfig(eval_split=0.25, seed=7, max_train_samples=5, max_eval_samples=3), N)


def _ctx(tok):
    return SimpleNamespace(tokenizer=tok, rank=0, world_size=1, is_main=True, device=torch.device("cpu"))


def test_supervised_methods_follow_the_rule(files, tmp_path, monkeypatch):
    from kd_engine.data.supervised import build_supervised_data

    d, tok = files
    monkeypatch.setenv("KD_ENGINE_CACHE", str(tmp_path / "cache"))
    parsed = build_config(["--method", "kd", "--train_file", str(d / "train.txt"), *LIMITS])
    data = build_supervised_data(parsed.train, tok, "causal_lm")
    exp = _expected()
    assert [_row(tok, r["input_ids"]) for r in data.train] == exp.train
    assert [_row(tok, r["input_ids"]) for r in data.eval] == exp.eval
    assert os.listdir(tmp_path / "cache" / "tokenized")  # the tokenized cache follows KD_ENGINE_CACHE


def test_minilmv2_follows_the_rule_and_caches_under_kd_engine_cache(files, tmp_path, monkeypatch):
    d, tok = files
    monkeypatch.setenv("KD_ENGINE_CACHE", str(tmp_path / "cache"))
    parsed = build_config(["--method", "minilmv2", "--train_file", str(d / "train.txt"), "--pack_blocks", "false",
                           "--corpus_format", "lines", *LIMITS])
    method = parsed.method_cls(parsed.train, parsed.method_options)
    data = method.build_data(_ctx(tok))
    exp = _expected()
    assert [_row(tok, data.train[i]["input_ids"]) for i in range(len(data.train))] == exp.train
    assert [_row(tok, data.eval[i]["input_ids"]) for i in range(len(data.eval))] == exp.eval
    assert data.train_lengths == [len(data.train[i]["input_ids"]) for i in range(len(data.train))]
    assert os.listdir(tmp_path / "cache" / "corpus")  # not ~/.cache


def test_minillm_follows_the_rule(files, tmp_path):
    d, tok = files
    parsed = build_config(["--method", "minillm", "--task", "causal_lm", "--train_file", str(d / "prompts.jsonl"),
                           *LIMITS])
    method = parsed.method_cls(parsed.train, parsed.method_options)
    data = method.build_data(_ctx(tok))
    exp = _expected()
    assert [_row(tok, r["input_ids"]) for r in data.train] == exp.train
    assert [_row(tok, r["input_ids"]) for r in data.eval] == exp.eval  # eval_split used to be ignored here
