"""Cross-tokenizer alignment and vocabulary map: hand-made offsets with known spans, and real tokenizers of three
families (byte-level BPE, WordPiece, SentencePiece) on unicode, digits, leading spaces, newlines and one-sided
truncation; span log-probabilities against the same text scored token by token."""
import pytest
import torch

import tiny
from kd_engine.data.token_alignment import Span, align_spans, cuts, span_log_probs, token_log_probs
from kd_engine.data.vocab_map import surfaces, vocab_map
from kd_engine.data.xtoken import encode_side, pair_texts

TEXTS = ["Hello  world,\n\ncafé 123 naïve! unbelievably", " leading space and 2024-12-03 digits",
         "line one\nline two\n\n\tindented ünïcödé 東京 tower", "the cat runs and the dog sleeps"]


def test_hand_made_offsets_give_the_known_spans():
    # teacher: "Hello" "Ġ" "Ġworld" (byte-level keeps every space); student: "hello" "world" (WordPiece drops them)
    t = [(0, 5), (5, 6), (6, 12)]
    s = [(0, 5), (7, 12)]
    assert align_spans(t, s) == [Span(0, 1, 0, 1, 0, 5), Span(1, 3, 1, 2, 5, 12)]
    # a multi-byte character split over two byte tokens (same offsets): no cut inside it
    assert align_spans([(0, 1), (0, 1), (1, 2)], [(0, 2)]) == [Span(0, 3, 0, 1, 0, 2)]
    # special tokens (zero-width, or flagged) are in no span; spans index the full sequences
    t2, s2 = [(0, 0), (0, 3), (3, 6)], [(0, 0), (0, 6), (0, 0)]
    assert align_spans(t2, s2, [True, False, False], [True, False, True]) == [Span(1, 3, 1, 2, 0, 6)]
    # one side truncated after 5 characters: nothing past its coverage is aligned
    assert align_spans(t, [(0, 5)]) == [Span(0, 1, 0, 1, 0, 5)]
    # nothing cut alike inside: one span over all of it; no common cut but 0: none
    assert align_spans([(0, 2), (2, 4)], [(0, 1), (1, 4)]) == [Span(0, 2, 0, 2, 0, 4)]
    assert align_spans([(0, 4)], [(0, 3)]) == []
    assert cuts([(0, 0)], [True]) == {}


def _wordpiece(path, texts):
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True, strip_accents=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece()
    tok.train_from_iterator(texts, trainers.WordPieceTrainer(vocab_size=300, special_tokens=[
        "[PAD]", "[UNK]", "[CLS]", "[SEP]"], show_progress=False))
    tok.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]", special_tokens=[
        ("[CLS]", tok.token_to_id("[CLS]")), ("[SEP]", tok.token_to_id("[SEP]"))])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]", cls_token="[CLS]",
                                   sep_token="[SEP]")
    fast.save_pretrained(path)
    return fast


def _sentencepiece(path, texts):
    """A T5 tokenizer (SentencePiece unigram with byte fallback) trained here; transformers converts it to fast."""
    import sentencepiece as spm
    from transformers import T5Tokenizer

    tiny.write_lines(str(path / "spm.txt"), texts)
    spm.SentencePieceTrainer.train(input=str(path / "spm.txt"), model_prefix=str(path / "spiece"), vocab_size=340,
                                   model_type="unigram", pad_id=0, eos_id=1, unk_id=2, bos_id=-1, minloglevel=2,
                                   byte_fallback=True, character_coverage=1.0)
    return T5Tokenizer.from_pretrained(str(path), extra_ids=0)


@pytest.fixture(scope="module")
def toks(tmp_path_factory):
    d = tmp_path_factory.mktemp("toks")
    corpus = tiny.sentences(300, seed=4) + TEXTS * 3
    (d / "sp").mkdir()
    return {"bpe": tiny.make_bpe_tokenizer(str(d / "bpe"), corpus, vocab_size=150),
            "wp": _wordpiece(str(d / "wp"), corpus), "sp": _sentencepiece(d / "sp", corpus),
            "word": tiny.make_tokenizer(str(d / "word"))}


def _decoded(tok, ids):
    return tok.decode(ids, clean_up_tokenization_spaces=False)


@pytest.mark.parametrize("teacher,student", [("bpe", "wp"), ("bpe", "sp"), ("sp", "wp"), ("wp", "bpe")])
def test_real_tokenizers_align_into_spans_of_the_same_characters(toks, teacher, student):
    from kd_engine.data.token_alignment import special_mask

    t_tok, s_tok = toks[teacher], toks[student]
    for text in TEXTS:
        (t_ids, t_off), (s_ids, s_off) = encode_side(t_tok, [text], 128)[0], encode_side(s_tok, [text], 128)[0]
        spans = align_spans(t_off, s_off, special_mask(t_ids, t_tok), special_mask(s_ids, s_tok))
        assert len(spans) >= 4
        assert spans[0].c0 == 0 and not text[spans[-1].c1:].strip()  # the whole text, up to trailing space
        for sp, nxt in zip(spans, spans[1:]):
            assert sp.c1 == nxt.c0 and sp.t1 <= nxt.t0 and sp.s1 <= nxt.s0  # contiguous, in order
        for sp in spans:
            for offs, lo, hi in ((t_off, sp.t0, sp.t1), (s_off, sp.s0, sp.s1)):
                inside = set()
                for k in range(lo, hi):
                    assert sp.c0 <= offs[k][0] and offs[k][1] <= sp.c1  # every token inside the span's characters
                    inside.update(range(*offs[k]))
                # what the span's tokens leave out is whitespace (WordPiece and T5 drop it), never text
                assert all(text[c].isspace() for c in range(sp.c0, sp.c1) if c not in inside)
            if t_tok is toks["bpe"]:  # lossless byte-level BPE spells exactly the span's characters
                assert _decoded(t_tok, t_ids[sp.t0:sp.t1]) == text[sp.c0:sp.c1]
        ex = pair_texts([text], s_tok, t_tok, 128, "t")[0]
        assert ex["span_t0"] == [sp.t0 for sp in spans if sp.t0 >= 1 and sp.s0 >= 1]


def test_bytelevel_span_text_is_exact_and_word_starts_are_flagged(toks):
    tok = toks["bpe"]
    text = "Hello  world, café 123!"
    ex = pair_texts([text], toks["wp"], tok, 128, "t")[0]
    pieces = [_decoded(tok, ex["teacher_input_ids"][a:b]) for a, b in zip(ex["span_t0"], ex["span_t1"])]
    assert "".join(pieces) == text[len(pieces[0]) - len(pieces[0]):][:len("".join(pieces))]
    assert "".join(pieces) == text  # the first span starts at the text's first character (after the start token)
    assert pieces[:3] == ["Hello", "  world", ","]
    words = [p for p, w in zip(pieces, ex["span_word"]) if w]
    assert "Hello" in words and "  world" in words and "," not in words


def test_truncation_on_one_side_only_stops_the_spans_at_the_shorter_coverage(toks):
    from kd_engine.data.xtoken import paired_example

    text = "the cat runs and the dog sleeps and the bird eats"
    s_tok, t_tok = toks["wp"], toks["bpe"]
    t = encode_side(t_tok, [text], 128)[0]
    full = paired_example(text, encode_side(s_tok, [text], 128)[0], t, s_tok, t_tok)
    cut = paired_example(text, encode_side(s_tok, [text], 6)[0], t, s_tok, t_tok)  # [CLS] + 4 words + [SEP]
    assert len(cut["input_ids"]) == 6 and cut["teacher_input_ids"] == full["teacher_input_ids"]
    assert len(cut["span_s0"]) == 4 < len(full["span_s0"])  # the 4 words the student kept (after its [CLS])
    assert max(cut["span_s1"]) <= 5 and max(cut["span_t1"]) < len(t[0])
    assert cut["n_bytes"] == len("the cat runs and") < full["n_bytes"] == len(text.encode())
    assert cut["t_bytes"] == full["t_bytes"]


def test_texts_with_no_common_span_are_one_clear_error(toks):
    from kd_engine.errors import KDError

    with pytest.raises(KDError, match="no text where the teacher's and the student's tokenizations share a span"):
        pair_texts(["   ", "\n"], toks["wp"], toks["bpe"], 32, "empty.txt")


def test_slow_tokenizer_is_refused_with_how_to_get_a_fast_one(toks):
    from kd_engine.data.token_alignment import check_fast
    from kd_engine.errors import KDError

    class Slow:
        is_fast = False
        name_or_path = "my/slow"

    with pytest.raises(KDError, match="needs a fast tokenizer.*use_fast=True"):
        check_fast(Slow(), "teacher")


def test_span_log_probs_equal_the_text_scored_token_by_token(toks, tmp_path):
    model = tiny.make_llama_for(str(tmp_path / "m"), toks["bpe"], layers=1).eval()
    text = "the cat runs quickly, naïve 42"
    ids, _ = encode_side(toks["bpe"], [text], 64)[0]
    x = torch.tensor([ids])
    with torch.no_grad():
        lp = token_log_probs(model(x).logits, x)
        one_by_one = [0.0] + [float(torch.log_softmax(model(x[:, :j]).logits[0, -1].float(), -1)[ids[j]])
                              for j in range(1, len(ids))]
    assert lp[0].tolist() == pytest.approx(one_by_one, abs=1e-5)
    spans = torch.tensor([[1, 3, 5]]), torch.tensor([[3, 5, len(ids)]])
    got = span_log_probs(lp, *spans)[0].tolist()
    want = [sum(one_by_one[a:b]) for a, b in zip(spans[0][0].tolist(), spans[1][0].tolist())]
    assert got == pytest.approx(want, abs=1e-5)


def test_vocabulary_map_same_text_tokens_and_identity_for_one_tokenizer(toks):
    bpe, wp, sp = toks["bpe"], toks["wp"], toks["sp"]
    t_ids, s_ids = vocab_map(bpe, bpe)
    assert t_ids.tolist() == s_ids.tolist() == list(range(len(bpe)))
    sb, ss, sw = surfaces(bpe), surfaces(sp), surfaces(wp)
    t_ids, s_ids = vocab_map(bpe, sp)
    pairs = dict(zip(t_ids.tolist(), s_ids.tolist()))
    assert pairs and all(sb[a] == ss[b] for a, b in pairs.items())
    assert len(set(pairs.values())) == len(pairs)  # one to one
    sp_vocab = sp.get_vocab()
    if "\u2581the" in sp_vocab and "Ġthe" in bpe.get_vocab():  # "Ġthe" (byte-level) and "▁the" (SentencePiece)
        assert pairs[bpe.convert_tokens_to_ids("Ġthe")] == sp_vocab["\u2581the"]
    # WordPiece: word-initial tokens read with a space in front, ## pieces without
    wp_vocab = wp.get_vocab()
    assert sw[wp_vocab["the"]] == " the"
    cont = next(t for t in wp_vocab if t.startswith("##") and len(t) > 3)
    assert sw[wp_vocab[cont]] == cont[2:]
    # byte pieces of a multi-byte character are named by their bytes, special tokens by their string
    assert sb[bpe.convert_tokens_to_ids("<s>")] == "\x00special:<s>"
    assert any(s and s.startswith("\x00bytes:") for s in sb)
    # bos and eos map by role when their strings differ
    t_ids, s_ids = vocab_map(bpe, wp)
    assert wp.eos_token_id is None or (bpe.eos_token_id, wp.eos_token_id) in zip(t_ids.tolist(), s_ids.tolist())


def test_paired_dataset_is_built_once_equals_pair_texts_and_counts_drops(toks, tmp_path, monkeypatch, caplog):
    from kd_engine.data.xtoken import _paired_dataset

    monkeypatch.setenv("KD_ENGINE_CACHE", str(tmp_path / "cache"))
    texts = TEXTS + ["!"]  # "!" has a span; a text is dropped only when nothing aligns after the start token
    ds = _paired_dataset(texts, None, toks["wp"], toks["bpe"], 64, "t")
    ref = pair_texts(texts, toks["wp"], toks["bpe"], 64, "t")
    assert len(ds) == len(ref) and all(ds[i] == ref[i] for i in range(len(ref)))
    files = list((tmp_path / "cache").rglob("pairs-*.arrow"))
    assert len(files) == 1
    stamp = files[0].stat().st_mtime_ns
    again = _paired_dataset(texts, None, toks["wp"], toks["bpe"], 64, "t")  # loaded, not rebuilt
    assert files[0].stat().st_mtime_ns == stamp and len(again) == len(ds)
    assert len(list((tmp_path / "cache").rglob("pairs-*.arrow"))) == 1
    other = _paired_dataset(texts, None, toks["wp"], toks["bpe"], 32, "t")  # another key: another file
    assert len(list((tmp_path / "cache").rglob("pairs-*.arrow"))) == 2 and len(other) == len(ds)
