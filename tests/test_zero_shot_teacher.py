"""Zero-shot teachers (methods.md §5) and corpus labeling: tiny random NLI BERTs, the real all-MiniLM-L6-v2."""
from __future__ import annotations

import json
import os
import socket

import pytest
import torch
import torch.multiprocessing as mp
from transformers import BertConfig, BertForSequenceClassification, BertTokenizer

from kd_engine.errors import KDError
from kd_engine.teachers.labeling import default_cache_dir, label_corpus, labeling_key
from kd_engine.teachers.zero_shot import (EmbeddingTeacher, NLITeacher, check_template, load_class_names,
                                          read_texts, resolve_nli_ids)

WORDS = ("this text is about the world sports business science tech a match team won lost stocks fell rose "
         "market new phone chip launched in an election vote minister goals league season shares profit "
         "quarter software computer rocket space , . ! ?").split()
TEMPLATE = "this text is about {} ."
CLASSES = ["the world", "sports", "business", "science"]
TEXTS = ["the team won the match", "stocks fell !", "a new phone chip launched in the market",
         "minister won the election vote , the world", "goals", "the league season ? shares rose . profit rose",
         "rocket space", "computer software is new", "team lost", "quarter profit fell in the market ."]
CNE = {"contradiction": 0, "neutral": 1, "entailment": 2}
ENC = {"entailment": 0, "neutral": 1, "contradiction": 2}


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    path = tmp_path_factory.mktemp("vocab") / "vocab.txt"
    path.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + WORDS) + "\n")
    return BertTokenizer(vocab=str(path))


def tiny_nli(tok, label2id=CNE, seed=0):
    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=37, max_position_embeddings=64, num_labels=len(label2id),
                     label2id=dict(label2id), id2label={v: k for k, v in label2id.items()})
    return BertForSequenceClassification(cfg).eval()


def reference_logits(model, tok, texts, max_length=None):
    """Logits of every pair, tokenized by the tokenizer itself one pair at a time (no padding)."""
    out = []
    for t in texts:
        row = []
        for c in CLASSES:
            kw = dict(truncation="only_first", max_length=max_length) if max_length else {}
            enc = tok(t, TEMPLATE.format(c), return_tensors="pt", **kw)
            with torch.no_grad():
                row.append(model(**enc).logits[0].float())
        out.append(torch.stack(row))
    return torch.stack(out)  # N x K x C


# ---------------------------------------------------------------------------------------------- inputs


def test_entail_and_contradiction_ids_both_orders():
    assert resolve_nli_ids(BertConfig(label2id=CNE, id2label={v: k for k, v in CNE.items()})) == (2, 0)
    assert resolve_nli_ids(BertConfig(label2id=ENC, id2label={v: k for k, v in ENC.items()})) == (0, 2)
    upper = {"CONTRADICTION": 0, "NEUTRAL": 1, "ENTAILMENT": 2}
    assert resolve_nli_ids(BertConfig(label2id=upper, id2label={v: k for k, v in upper.items()})) == (2, 0)
    two = {"not_entailment": 1, "entailment": 0}
    assert resolve_nli_ids(BertConfig(label2id=two, id2label={v: k for k, v in two.items()})) == (0, 1)


def test_no_entailment_label_is_an_error(tok):
    with pytest.raises(KDError, match="entailment"):
        resolve_nli_ids(BertConfig(num_labels=3))  # LABEL_0..2
    model = tiny_nli(tok, {"positive": 0, "negative": 1})
    with pytest.raises(KDError, match="entailment"):
        NLITeacher(model, tok, TEMPLATE, CLASSES)


def test_multi_label_needs_contradiction(tok):
    model = tiny_nli(tok, {"entailment": 0, "neutral": 1, "other": 2})
    NLITeacher(model, tok, TEMPLATE, CLASSES)  # single-label is fine
    with pytest.raises(KDError, match="contradiction"):
        NLITeacher(model, tok, TEMPLATE, CLASSES, multi_label=True)


@pytest.mark.parametrize("template", ["no placeholder", "{} and {}", "{0} x", "{} {name}"])
def test_bad_templates(template):
    with pytest.raises(KDError):
        check_template(template)


def test_class_names_file(tmp_path):
    p = tmp_path / "classes.txt"
    p.write_text("sports\n\n business \n")
    assert load_class_names(str(p)) == ["sports", "business"]
    for content, msg in [("", "empty"), ("\n\n", "empty"), ("a\nb\na\n", "duplicate"), ("only\n", "at least 2")]:
        p.write_text(content)
        with pytest.raises(KDError, match=msg):
            load_class_names(str(p))
    with pytest.raises(KDError, match="not found"):
        load_class_names(str(tmp_path / "missing.txt"))


def test_read_texts_counts_blank_lines(tmp_path):
    p = tmp_path / "data.txt"
    p.write_text("one\n\n  \ntwo\n\n")
    assert read_texts(str(p)) == (["one", "two"], 3)
    p.write_text("\n \n")
    with pytest.raises(KDError, match="no text"):
        read_texts(str(p))


def test_bad_teacher_options(tok):
    model = tiny_nli(tok)
    with pytest.raises(KDError):
        NLITeacher(model, tok, TEMPLATE, ["sports"])
    with pytest.raises(KDError):
        NLITeacher(model, tok, TEMPLATE, ["sports", "sports"])
    with pytest.raises(KDError):
        NLITeacher(model, tok, TEMPLATE, ["sports", " "])
    with pytest.raises(KDError):
        NLITeacher(model, tok, TEMPLATE, CLASSES, temperature=0)
    with pytest.raises(KDError, match="no room"):
        NLITeacher(model, tok, TEMPLATE, CLASSES, max_length=8)


# ---------------------------------------------------------------------------------------------- NLI teacher


@pytest.mark.parametrize("max_length", [None, 12])
def test_pair_assembly_equals_tokenizer_pair_encoding(tok, max_length):
    teacher = NLITeacher(tiny_nli(tok), tok, TEMPLATE, CLASSES, max_length=max_length)
    assert teacher.pair is not None  # the fast path (no per-pair tokenization) is in use
    ids, types = teacher.encode_pairs(TEXTS)
    assert len(ids) == len(TEXTS) * len(CLASSES)
    truncated = 0
    for n, t in enumerate(TEXTS):
        for k, c in enumerate(CLASSES):
            kw = dict(truncation="only_first", max_length=max_length) if max_length else {}
            ref = tok(t, TEMPLATE.format(c), **kw)
            assert ids[n * len(CLASSES) + k] == ref["input_ids"], (t, c)
            assert types[n * len(CLASSES) + k] == ref["token_type_ids"], (t, c)
            truncated += len(tok(t, TEMPLATE.format(c))["input_ids"]) > len(ref["input_ids"])
    assert (truncated > 0) == (max_length is not None)  # the truncating case really truncates premises


def roberta_style_tokenizer(path):
    """A fast tokenizer with RoBERTa's pair layout <s> A </s></s> B </s> (two tokens between the segments)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(["<pad>", "<unk>", "<s>", "</s>"] + WORDS)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A </s>", pair="<s> $A </s> </s> $B </s>",
        special_tokens=[("<s>", vocab["<s>"]), ("</s>", vocab["</s>"])])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>", bos_token="<s>",
                                   eos_token="</s>", model_input_names=["input_ids", "attention_mask"])
    fast.save_pretrained(path)
    return fast


@pytest.mark.parametrize("truncation_side", ["right", "left"])
def test_pair_assembly_roberta_layout(tok, tmp_path, truncation_side):
    rtok = roberta_style_tokenizer(str(tmp_path / "rtok"))
    rtok.truncation_side = truncation_side
    model = tiny_nli(tok)  # ids only need to be < vocab size; the layout is what is tested
    teacher = NLITeacher(model, rtok, TEMPLATE, CLASSES, max_length=13)
    assert teacher.pair is not None and len(teacher.pair.middle) == 2
    ids, types = teacher.encode_pairs(TEXTS)
    assert types is None  # this tokenizer has no token_type_ids
    for n, t in enumerate(TEXTS):
        for k, c in enumerate(CLASSES):
            ref = rtok(t, TEMPLATE.format(c), truncation="only_first", max_length=13)["input_ids"]
            assert ids[n * len(CLASSES) + k] == ref, (t, c)


@pytest.mark.parametrize("label2id", [CNE, ENC], ids=["c-n-e", "e-n-c"])
def test_single_label_probs_match_hand_computation(tok, label2id):
    model = tiny_nli(tok, label2id)
    teacher = NLITeacher(model, tok, TEMPLATE, CLASSES, temperature=0.5)
    probs = teacher(TEXTS, batch_size=3)  # 40 pairs in sorted, padded batches of 3
    assert probs.dtype == torch.float32 and probs.shape == (len(TEXTS), len(CLASSES))
    torch.testing.assert_close(probs.sum(1), torch.ones(len(TEXTS)))
    e = label2id["entailment"]
    ref = torch.softmax(reference_logits(model, tok, TEXTS)[..., e] / 0.5, dim=1)
    torch.testing.assert_close(probs, ref, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("label2id", [CNE, ENC], ids=["c-n-e", "e-n-c"])
def test_multi_label_probs_match_hand_computation(tok, label2id):
    model = tiny_nli(tok, label2id, seed=1)
    teacher = NLITeacher(model, tok, TEMPLATE, CLASSES, multi_label=True, temperature=2.0)
    probs = teacher(TEXTS, batch_size=5)
    assert ((probs >= 0) & (probs <= 1)).all()
    logits = reference_logits(model, tok, TEXTS)
    c, e = label2id["contradiction"], label2id["entailment"]
    ref = torch.sigmoid((logits[..., e] - logits[..., c]) / 2.0)  # 2-way softmax = sigmoid of the difference
    torch.testing.assert_close(probs, ref, atol=1e-5, rtol=1e-4)
    assert not torch.allclose(probs.sum(1), torch.ones(len(TEXTS)))  # not normalised across classes


def test_sorted_batching_keeps_original_order(tok):
    model = tiny_nli(tok, seed=2)
    teacher = NLITeacher(model, tok, TEMPLATE, CLASSES)
    one_by_one = teacher.logits(TEXTS, batch_size=1)  # no padding at all
    for bs in (2, 7, 64):
        torch.testing.assert_close(teacher.logits(TEXTS, batch_size=bs), one_by_one, atol=1e-5, rtol=1e-4)
    shuffled = [TEXTS[i] for i in (3, 0, 9, 1)]
    torch.testing.assert_close(teacher.logits(shuffled, 4), one_by_one[[3, 0, 9, 1]], atol=1e-5, rtol=1e-4)
    assert model.training is False


# ---------------------------------------------------------------------------------------------- labeling + cache


def test_cache_hit_skips_teacher(tok, tmp_path):
    teacher = NLITeacher(tiny_nli(tok), tok, TEMPLATE, CLASSES)
    first = label_corpus(teacher, TEXTS, batch_size=4, cache_dir=str(tmp_path / "c"), chunk_size=3)
    assert teacher.calls == 4  # ceil(10 / 3) chunks
    assert sorted(os.listdir(tmp_path / "c")) == ["key.json", "labels.pt"]  # chunks merged and removed
    again = NLITeacher(tiny_nli(tok), tok, TEMPLATE, CLASSES)
    second = label_corpus(again, TEXTS, batch_size=4, cache_dir=str(tmp_path / "c"), chunk_size=3)
    assert again.calls == 0
    torch.testing.assert_close(second, first)
    torch.testing.assert_close(first, teacher(TEXTS, 4))


def test_cache_with_other_key_is_detected(tok, tmp_path):
    cache = str(tmp_path / "c")
    label_corpus(NLITeacher(tiny_nli(tok), tok, TEMPLATE, CLASSES), TEXTS, cache_dir=cache)
    variants = {
        "template": NLITeacher(tiny_nli(tok), tok, "a text about {} .", CLASSES),
        "class_names": NLITeacher(tiny_nli(tok), tok, TEMPLATE, CLASSES[::-1]),
        "weights": NLITeacher(tiny_nli(tok, seed=5), tok, TEMPLATE, CLASSES),
        "multi_label": NLITeacher(tiny_nli(tok), tok, TEMPLATE, CLASSES, multi_label=True),
        "temperature": NLITeacher(tiny_nli(tok), tok, TEMPLATE, CLASSES, temperature=2.0),
    }
    for field, teacher in variants.items():
        with pytest.raises(KDError, match=field):
            label_corpus(teacher, TEXTS, cache_dir=cache)
        assert teacher.calls == 0
    same = NLITeacher(tiny_nli(tok), tok, TEMPLATE, CLASSES)
    with pytest.raises(KDError, match="corpus_sha256"):
        label_corpus(same, TEXTS[:-1] + ["another text"], cache_dir=cache)
    # one folder per key: different labelings coexist
    a = default_cache_dir(str(tmp_path / "root"), labeling_key(same, TEXTS))
    b = default_cache_dir(str(tmp_path / "root"), labeling_key(variants["template"], TEXTS))
    assert a != b


class Interrupted(RuntimeError):
    pass


class FlakyTeacher:
    """Wraps a teacher; raises on call number ``fail_at`` (a crash mid-labeling)."""

    def __init__(self, inner, fail_at=None):
        self.inner, self.fail_at, self.calls, self.texts_seen = inner, fail_at, 0, 0
        self.class_names = inner.class_names

    def cache_key(self):
        return self.inner.cache_key()

    def __call__(self, texts, batch_size):
        self.calls += 1
        if self.calls == self.fail_at:
            raise Interrupted()
        self.texts_seen += len(texts)
        return self.inner(texts, batch_size)


def test_interrupted_labeling_resumes(tok, tmp_path):
    cache = str(tmp_path / "c")
    teacher = NLITeacher(tiny_nli(tok), tok, TEMPLATE, CLASSES)
    reference = teacher(TEXTS, 4)
    crashing = FlakyTeacher(teacher, fail_at=3)
    with pytest.raises(Interrupted):
        label_corpus(crashing, TEXTS, batch_size=4, cache_dir=cache, chunk_size=3)
    assert len([f for f in os.listdir(cache) if f.startswith("chunk_")]) == 2
    assert not [f for f in os.listdir(cache) if f.startswith(".tmp")]
    resumed = FlakyTeacher(teacher)
    labels = label_corpus(resumed, TEXTS, batch_size=4, cache_dir=cache, chunk_size=3)
    assert resumed.texts_seen == len(TEXTS) - 6  # the two finished chunks were not labeled again
    torch.testing.assert_close(labels, reference)
    assert json.load(open(os.path.join(cache, "key.json")))["template"] == TEMPLATE


# ---------------------------------------------------------------------------------------------- 2 ranks


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(rank, world, port, model_dir, vocab, cache, out):
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        tok = BertTokenizer(vocab=vocab)
        model = BertForSequenceClassification.from_pretrained(model_dir).eval()
        teacher = NLITeacher(model, tok, TEMPLATE, CLASSES)
        labels = label_corpus(teacher, TEXTS, batch_size=4, cache_dir=cache if rank == 0 else None,
                              rank=rank, world_size=world, chunk_size=4)  # gather: torch.distributed
        torch.save({"labels": labels, "texts_labeled": teacher.calls}, f"{out}_{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.multirank
@pytest.mark.slow  # two fresh interpreters importing torch + transformers: 54 s on the shared 2-core machine
def test_two_rank_labeling_equals_one_rank(tok, tmp_path):
    model = tiny_nli(tok, seed=3)
    model.save_pretrained(tmp_path / "nli")
    one = label_corpus(NLITeacher(model, tok, TEMPLATE, CLASSES), TEXTS, batch_size=4, chunk_size=4)
    vocab = str(tmp_path / "vocab.txt")
    with open(vocab, "w") as f:
        f.write("\n".join(tok.convert_ids_to_tokens(list(range(len(tok))))) + "\n")
    out = str(tmp_path / "rank")
    mp.spawn(_rank_main, args=(2, _free_port(), str(tmp_path / "nli"), vocab, str(tmp_path / "c"), out), nprocs=2)
    r0, r1 = torch.load(f"{out}_0.pt"), torch.load(f"{out}_1.pt")
    torch.testing.assert_close(r0["labels"], one, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(r1["labels"], r0["labels"])  # every rank gets the full labels
    assert r0["texts_labeled"] == r1["texts_labeled"] == 3  # both ranks worked on each of the 3 chunks
    assert os.path.exists(tmp_path / "c" / "labels.pt")  # rank 0 wrote the cache


# ---------------------------------------------------------------------------------------------- embedding teacher


@pytest.fixture(scope="module")
def minilm():
    try:
        from kd_engine.models.loading import offline_model_path

        path = offline_model_path("all-minilm-l6-v2")
    except KDError as e:
        pytest.skip(f"all-MiniLM-L6-v2 offline package not installed: {e}")
    from transformers import AutoModel, AutoTokenizer

    return AutoModel.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path)


def test_embedding_teacher_real_minilm(minilm):
    model, tok = minilm
    classes = ["the world", "sports", "business", "science/tech"]
    texts = ["The striker scored twice as the club won the league title on Sunday.",
             "Shares of the bank fell 5% after quarterly profit missed analyst forecasts.",
             "Researchers unveiled a faster computer chip and new software for smartphones.",
             "The prime minister met foreign leaders to discuss the ceasefire and refugees."]
    teacher = EmbeddingTeacher(model, tok, "This text is about {}.", classes)
    probs = teacher(texts, batch_size=3)
    torch.testing.assert_close(probs.sum(1), torch.ones(len(texts)))
    assert probs.argmax(1).tolist() == [1, 2, 3, 0]
    # hand computation: mean pooling over real tokens, cosine, softmax(cos / T), one text at a time
    with torch.no_grad():
        def emb(s):
            h = model(**tok(s, return_tensors="pt")).last_hidden_state[0].mean(0)
            return h / h.norm()
        cls = torch.stack([emb(f"This text is about {c}.") for c in classes])
        ref = torch.softmax(torch.stack([emb(t) for t in texts]) @ cls.T / teacher.temperature, dim=1)
    torch.testing.assert_close(probs, ref, atol=1e-4, rtol=1e-3)
    flat = EmbeddingTeacher(model, tok, "This text is about {}.", classes, temperature=1.0)(texts)
    assert flat.max() < probs.max()  # a higher temperature gives flatter targets
