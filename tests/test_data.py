"""Data pipeline: loaders, bad-input errors, cached tokenization, dynamic padding (the sampler: test_sampler.py)."""
from __future__ import annotations

import json
import logging
import os

import pytest
import torch

from kd_engine.data import PadCollator, load_table, require_columns, tokenize_dataset
from kd_engine.errors import KDError

SST2 = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "sst2", "train.tsv")
VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "the", "a", "movie", "was", "good", "bad", "great", "plot",
         "is", "not", "very", "fun", "dull", "and", "it", "what", "?", ".", "!"]


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    from transformers import BertTokenizer

    path = tmp_path_factory.mktemp("tok") / "vocab.txt"
    path.write_text("\n".join(VOCAB) + "\n")
    return BertTokenizer(vocab=str(path))


def write(path, text: str | bytes):
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text, encoding="utf-8")
    return str(path)


# ---------------------------------------------------------------------------------------------- loading


def test_txt_one_example_per_line_blank_lines_skipped(tmp_path, caplog):
    p = write(tmp_path / "a.txt", "the movie was good\n\n   \nthe plot is dull\nfun\n")
    with caplog.at_level(logging.WARNING):
        ds = load_table(p)
    assert ds.column_names == ["text"]
    assert ds["text"] == ["the movie was good", "the plot is dull", "fun"]
    assert "skipped 2 blank line(s)" in caplog.text


def test_jsonl_json_csv_tsv(tmp_path):
    recs = [{"premise": "a movie", "hypothesis": "it was good", "label": 0},
            {"premise": "the plot", "hypothesis": "dull", "label": 2}]
    p = write(tmp_path / "a.jsonl", "".join(json.dumps(r) + "\n" for r in recs))
    assert load_table(p).to_list() == recs
    p = write(tmp_path / "b.json", json.dumps(recs))
    assert load_table(p).to_list() == recs
    # csv: header row, quoted field with a comma; "NA" stays a string
    p = write(tmp_path / "c.csv", 'text,label\n"good, very good",pos\nNA,neg\n')
    ds = load_table(p)
    assert ds.column_names == ["text", "label"]
    assert ds["text"] == ["good, very good", "NA"] and ds["label"] == ["pos", "neg"]
    # tsv, GLUE style: quotes are plain characters
    p = write(tmp_path / "d.tsv", 'sentence\tlabel\n"it \'s a fun movie\t1\nthe plot is dull " \t0\n')
    ds = load_table(p)
    assert ds.column_names == ["sentence", "label"]
    assert ds["sentence"] == ['"it \'s a fun movie', 'the plot is dull " '] and ds["label"] == [1, 0]


def test_utf8_bom_not_in_column_name(tmp_path):
    p = write(tmp_path / "bom.csv", "\ufefftext,label\ngood,1\n")
    assert load_table(p).column_names == ["text", "label"]
    p = write(tmp_path / "bom.txt", "\ufeffgood\nbad\n")
    assert load_table(p)["text"] == ["good", "bad"]


def test_tsv_without_header_takes_column_names(tmp_path):
    p = write(tmp_path / "ag.tsv", "wall street falls\tBusiness\nteam wins\tSports\n")
    ds = load_table(p, column_names=["text", "label"])
    assert ds.to_list() == [{"text": "wall street falls", "label": "Business"},
                            {"text": "team wins", "label": "Sports"}]


def test_real_sst2_tsv():
    if not os.path.exists(SST2):
        pytest.skip(f"{SST2} absent (shared data folder not present on this machine)")
    ds = load_table(SST2)
    assert ds.column_names == ["sentence", "label"]
    assert len(ds) == 67349
    assert set(ds.unique("label")) == {0, 1}


def test_missing_file_and_unknown_extension(tmp_path):
    with pytest.raises(KDError, match=r"data file '.*nope\.jsonl' does not exist"):
        load_table(str(tmp_path / "nope.jsonl"))
    with pytest.raises(KDError, match="does not exist"):
        load_table("data/train.txt")  # relative path with extension: not a hub id
    p = write(tmp_path / "a.parquetx", "x")
    with pytest.raises(KDError, match=r"a\.parquetx' has an unknown extension '\.parquetx'"):
        load_table(p)


def test_empty_files(tmp_path):
    for name, text in [("e.txt", ""), ("e.jsonl", ""), ("b.txt", "\n \n\n"), ("h.csv", "text,label\n")]:
        p = write(tmp_path / name, text)
        with pytest.raises(KDError, match=rf"data file '.*{name}' (is empty|has no rows)"):
            load_table(p)


def test_non_utf8_names_file_and_line(tmp_path):
    p = write(tmp_path / "latin.txt", "good movie\nfine\ncaf\xe9 au lait\n".encode("latin-1"))
    with pytest.raises(KDError, match=r"latin\.txt' is not UTF-8: line 3, byte 4") as e:
        load_table(p)
    assert "0xe9" in str(e.value)
    p = write(tmp_path / "l.csv", "text,label\nok,1\n".encode() + b"\xff\xfe,0\n")
    with pytest.raises(KDError, match=r"l\.csv' is not UTF-8: line 3"):
        load_table(p)


def test_bad_json_line_named(tmp_path):
    p = write(tmp_path / "bad.jsonl", '{"text": "ok"}\n{"text": "broken"\n')
    with pytest.raises(KDError, match=r"could not parse data file '.*bad\.jsonl': line 2"):
        load_table(p)
    p = write(tmp_path / "bad.json", '[\n {"text": "ok"},\n {"text": }\n]\n')
    with pytest.raises(KDError, match=r"could not parse data file '.*bad\.json': line 3, column 11"):
        load_table(p)


def test_require_columns_lists_available(tmp_path):
    ds = load_table(write(tmp_path / "a.jsonl", '{"premise": "a", "label": 1}\n'))
    require_columns(ds, ["premise", None], "a.jsonl")
    with pytest.raises(KDError, match=r"'a\.jsonl' has no column 'sentence'; available columns: 'premise', 'label'"):
        require_columns(ds, ["sentence", "label"], "a.jsonl")


# ---------------------------------------------------------------------------------------------- tokenizing


def _cls_ds():
    import datasets

    return datasets.Dataset.from_dict({
        "text": ["the movie was good", "the plot is very dull and it was bad", "", "great fun !", None],
        "pair": ["it was good", "bad", "x", "fun", "y"],
        "label": ["Positive", "negative", "positive", "POSITIVE", "negative"],
    })


def test_tokenize_classification(tokenizer, caplog):
    with caplog.at_level(logging.WARNING):
        out = tokenize_dataset(_cls_ds(), tokenizer, text_column="text", label_column="label",
                               label2id={"negative": 0, "positive": 1}, max_length=6)
    assert "dropped 2 of 5 row(s)" in caplog.text
    assert sorted(out.column_names) == ["attention_mask", "input_ids", "labels", "length", "token_type_ids"]
    assert out["labels"] == [1, 0, 1]
    ids = out["input_ids"]
    assert ids[0] == tokenizer("the movie was good")["input_ids"]  # no padding
    assert len(ids[1]) == 6 and ids[1][-1] == tokenizer.sep_token_id  # truncated to max_length
    assert out["length"] == [len(x) for x in ids]
    assert all(len(m) == len(x) and set(m) == {1} for m, x in zip(out["attention_mask"], ids))


def test_tokenize_pairs_and_numeric_labels(tokenizer):
    import datasets

    ds = datasets.Dataset.from_dict({"a": ["the movie", "a plot"], "b": ["was good", "is dull"], "y": ["1", "0"]})
    out = tokenize_dataset(ds, tokenizer, text_column="a", text_pair_column="b", label_column="y", max_length=16)
    assert out["labels"] == [1, 0]
    assert out["input_ids"][0] == tokenizer("the movie", "was good")["input_ids"]
    assert out["token_type_ids"][0] == [0, 0, 0, 0, 1, 1, 1]


def test_tokenize_unknown_label_and_missing_column(tokenizer):
    with pytest.raises(KDError, match=r"unknown label 'Positive' in column 'label'"):
        tokenize_dataset(_cls_ds(), tokenizer, text_column="text", label_column="label", max_length=8)
    with pytest.raises(KDError, match=r"unknown label '\w+' in column 'label'; known labels: pos, neg"):
        tokenize_dataset(_cls_ds(), tokenizer, text_column="text", label_column="label",
                         label2id={"pos": 1, "neg": 0}, max_length=8)
    import datasets

    ds = datasets.Dataset.from_dict({"text": ["a", "the"], "label": [0, 3]})
    with pytest.raises(KDError, match=r"unknown label 3 in column 'label'"):
        tokenize_dataset(ds, tokenizer, text_column="text", label_column="label", label2id={"a": 0, "b": 1},
                         max_length=8)
    with pytest.raises(KDError, match=r"'train\.jsonl' has no column 'sentence'; available columns: 'text', 'label'"):
        tokenize_dataset(ds, tokenizer, text_column="sentence", max_length=8, name="train.jsonl")


def test_tokenize_nothing_left(tokenizer):
    import datasets

    ds = datasets.Dataset.from_dict({"text": ["", "  ", None]})
    with pytest.raises(KDError, match="no rows left"):
        tokenize_dataset(ds, tokenizer, text_column="text", max_length=8)


def test_tokenize_causal_lm(tokenizer):
    import datasets

    ds = datasets.Dataset.from_dict({"text": ["the movie was very very good", "fun"]})
    out = tokenize_dataset(ds, tokenizer, text_column="text", max_length=5, task="causal_lm")
    assert sorted(out.column_names) == ["attention_mask", "input_ids", "labels", "length"]
    assert out["labels"] == out["input_ids"]
    assert out["length"] == [5, 3]


class CountingTokenizer:
    """Wraps a tokenizer and counts calls (the cache key uses its name_or_path, vocab size and class)."""

    def __init__(self, tok):
        self.tok, self.calls = tok, 0
        self.name_or_path = tok.name_or_path

    def __len__(self):
        return len(self.tok)

    def __call__(self, *a, **k):
        self.calls += 1
        return self.tok(*a, **k)


def test_tokenize_cache_hit(tmp_path, tokenizer):
    ds = load_table(write(tmp_path / "t.jsonl", "".join(
        json.dumps({"text": f"the movie was {w}", "label": i % 2}) + "\n" for i, w in enumerate(VOCAB[5:]))))
    cache = str(tmp_path / "cache")
    kw = dict(text_column="text", label_column="label", max_length=8, cache_dir=cache)
    tok = CountingTokenizer(tokenizer)
    first = tokenize_dataset(ds, tok, **kw)
    assert tok.calls == 1
    files = [f for f in os.listdir(cache) if f.startswith("tok-") and f.endswith(".arrow")]
    assert len(files) == 1
    second = tokenize_dataset(ds, tok, **kw)
    assert tok.calls == 1, "second identical call re-ran the tokenizer instead of loading the cache"
    assert second.to_list() == first.to_list()
    assert os.path.basename(second.cache_files[0]["filename"]) == files[0]
    # any option change is a miss
    tokenize_dataset(ds, tok, **{**kw, "max_length": 4})
    assert tok.calls == 2
    assert len([f for f in os.listdir(cache) if f.startswith("tok-")]) == 2
    # a different data file is a miss too
    ds2 = load_table(write(tmp_path / "u.jsonl", json.dumps({"text": "a movie", "label": 1}) + "\n"))
    tokenize_dataset(ds2, tok, **kw)
    assert tok.calls == 3


# ---------------------------------------------------------------------------------------------- collator


def test_collator_right_padding_all_keys():
    ex = [
        {"input_ids": [5, 6, 7], "attention_mask": [1, 1, 1], "token_type_ids": [0, 0, 1], "labels": 1,
         "length": 3, "text": "abc"},
        {"input_ids": [5], "attention_mask": [1], "token_type_ids": [0], "labels": 0, "length": 1, "text": "a"},
    ]
    b = PadCollator(pad_token_id=9)(ex)
    assert set(b) == {"input_ids", "attention_mask", "token_type_ids", "labels"}
    assert b["input_ids"].tolist() == [[5, 6, 7], [5, 9, 9]]
    assert b["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert b["token_type_ids"].tolist() == [[0, 0, 1], [0, 0, 0]]
    assert b["labels"].dtype == torch.long and b["labels"].tolist() == [1, 0]
    assert b["input_ids"].dtype == torch.long


def test_collator_token_labels_left_padding_multiple_of():
    ex = [{"input_ids": [1, 2, 3], "attention_mask": [1, 1, 1], "labels": [1, 2, 3]},
          {"input_ids": [4], "attention_mask": [1], "labels": [4]}]
    b = PadCollator(pad_token_id=0, padding_side="left", pad_to_multiple_of=4)(ex)
    assert b["input_ids"].tolist() == [[0, 1, 2, 3], [0, 0, 0, 4]]
    assert b["attention_mask"].tolist() == [[0, 1, 1, 1], [0, 0, 0, 1]]
    assert b["labels"].tolist() == [[-100, 1, 2, 3], [-100, -100, -100, 4]]
    r = PadCollator(pad_token_id=0, label_pad_id=-1)(ex)
    assert r["labels"].tolist() == [[1, 2, 3], [4, -1, -1]]


def test_collator_soft_labels_and_scalars():
    ex = [{"input_ids": [1, 2], "soft_labels": [0.25, 0.75], "weight": 0.5, "flag": True, "meta": None},
          {"input_ids": [3], "soft_labels": [1.0, 0.0], "weight": 2.0, "flag": False, "meta": None}]
    b = PadCollator(pad_token_id=0)(ex)
    assert set(b) == {"input_ids", "soft_labels", "weight", "flag"}
    assert b["soft_labels"].dtype == torch.float32 and b["soft_labels"].shape == (2, 2)
    assert torch.equal(b["soft_labels"], torch.tensor([[0.25, 0.75], [1.0, 0.0]]))
    assert b["weight"].dtype == torch.float32 and b["flag"].dtype == torch.bool
    soft = PadCollator(pad_token_id=0)([{"labels": [0.1, 0.9]}, {"labels": [0.5, 0.5]}])
    assert soft["labels"].dtype == torch.float32 and soft["labels"].shape == (2, 2)


def test_collator_on_tokenized_dataset(tokenizer):
    out = tokenize_dataset(_cls_ds(), tokenizer, text_column="text", label_column="label",
                           label2id={"negative": 0, "positive": 1}, max_length=32)
    b = PadCollator(tokenizer.pad_token_id)([out[i] for i in range(len(out))])
    assert b["input_ids"].shape == (3, max(out["length"]))
    assert b["attention_mask"].sum(1).tolist() == out["length"]
    assert (b["input_ids"][b["attention_mask"] == 0] == tokenizer.pad_token_id).all()
