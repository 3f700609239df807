"""Data of the cross-tokenizer methods: each text tokenized by the student's and by the teacher's tokenizer, aligned.

One example per text row: plain causal-LM text (``--text_column``), or a prompt (``--text_column``) and its
response (``--target_column``) joined as they stand (no separator added; the loss, the spans and the byte count
cover the response only; a token crossing the seam belongs to the prompt). Each side gets its own tokenization with
character offsets, truncated at ``--max_length`` tokens on its own, with a start token in front when its tokenizer
adds none (its BOS, else its EOS: every content token is then predicted by some row). ``data.token_alignment``
finds the spans; an example keeps:

- ``input_ids`` / ``attention_mask`` / ``labels`` (student; labels on content tokens only, specials -100) and
  ``teacher_input_ids`` / ``teacher_attention_mask`` / ``teacher_labels``;
- ``span_t0, span_t1, span_s0, span_s1``: the spans that both models predict (both start after a first token);
- ``span_word``: 1 where the span's text begins a word (whitespace before it, or the text's start);
- ``pos_t, pos_s``: ULD's own alignment, the prediction rows of the i-th content token of each side;
- ``n_bytes`` / ``t_bytes``: UTF-8 bytes of the text each side's tokens cover (bits per byte).

Rows with no span (nothing both tokenizers cut alike, e.g. one character) are dropped and counted; data in which
no row keeps one is an error naming the file.
"""
from __future__ import annotations

import logging
import os
from typing import Optional

import torch

from ..errors import KDError
from .bundle import DataBundle
from .files import require_columns
from .split import load_split_tables
from .token_alignment import align_spans, check_fast, position_pairs, special_mask

logger = logging.getLogger(__name__)

def _start_id(tokenizer) -> Optional[int]:
    probe = tokenizer("a")["input_ids"]
    if probe != tokenizer("a", add_special_tokens=False)["input_ids"]:
        return None  # the tokenizer adds its own special tokens
    return tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id


def encode_side(tokenizer, texts: list[str], max_length: int) -> list[tuple[list[int], list[tuple[int, int]]]]:
    """Per text, (ids, offsets) with a start token in front when the tokenizer adds none (offsets (0, 0))."""
    start = _start_id(tokenizer)
    limit = max(max_length - (1 if start is not None else 0), 1)
    enc = tokenizer(texts, return_offsets_mapping=True, truncation=True, max_length=limit)
    out = []
    for ids, offs in zip(enc["input_ids"], enc["offset_mapping"]):
        offs = [tuple(o) for o in offs]
        if start is not None:
            ids, offs = [start] + list(ids), [(0, 0)] + offs
        out.append((list(ids)[:max_length], offs[:max_length]))
    return out


def _covered_bytes(text: str, offsets, special, from_char: int = 0) -> int:
    ends = [b for (a, b), sp in zip(offsets, special) if b > a and not sp]
    return len(text[from_char:max(ends)].encode("utf-8")) if ends and max(ends) > from_char else 0


def _content_labels(ids, offsets, special, from_char: int = 0) -> list[int]:
    """The ids of the tokens a model is scored on (content after the first position, from character ``from_char``
    on: a response after its prompt), -100 elsewhere."""
    return [-100 if (k == 0 or special[k] or offsets[k][1] <= offsets[k][0] or offsets[k][0] < from_char) else i
            for k, i in enumerate(ids)]


def paired_example(text: str, s: tuple, t: tuple, s_tok, t_tok, from_char: int = 0,
                   keep_empty: bool = False) -> Optional[dict]:
    """One aligned example (module docstring); only spans starting at character ``from_char`` or later (an
    on-policy row: its generated part). None when no span is left, unless ``keep_empty``."""
    (s_ids, s_off), (t_ids, t_off) = s, t
    s_sp, t_sp = special_mask(s_ids, s_tok), special_mask(t_ids, t_tok)
    spans = [sp for sp in align_spans(t_off, s_off, t_sp, s_sp) if sp.t0 >= 1 and sp.s0 >= 1 and sp.c0 >= from_char]
    if not spans and not keep_empty:
        return None
    s_content = [k for k, (a, b) in enumerate(s_off) if b > a and not s_sp[k] and a >= from_char]
    t_content = [k for k, (a, b) in enumerate(t_off) if b > a and not t_sp[k] and a >= from_char]
    pos = [(ti - 1, si - 1) for ti, si in position_pairs(t_content[0], t_content[-1] + 1, s_content[0],
                                                           s_content[-1] + 1) if ti >= 1 and si >= 1] \
        if s_content and t_content else []
    labels = _content_labels(s_ids, s_off, s_sp, from_char)
    return {
        "input_ids": s_ids, "attention_mask": [1] * len(s_ids), "labels": labels,
        "teacher_input_ids": t_ids, "teacher_attention_mask": [1] * len(t_ids),
        "teacher_labels": _content_labels(t_ids, t_off, t_sp, from_char),
        "span_t0": [sp.t0 for sp in spans], "span_t1": [sp.t1 for sp in spans],
        "span_s0": [sp.s0 for sp in spans], "span_s1": [sp.s1 for sp in spans],
        "span_word": [int(sp.c0 == 0 or text[sp.c0 - 1].isspace() or text[sp.c0].isspace()) for sp in spans],
        "pos_t": [p[0] for p in pos], "pos_s": [p[1] for p in pos],
        "n_bytes": _covered_bytes(text, s_off, s_sp, from_char), "t_bytes": _covered_bytes(text, t_off, t_sp, from_char),
        "length": len(s_ids),
    }


def pair_texts(texts: list[str], s_tok, t_tok, max_length: int, where: str,
               from_chars: Optional[list[int]] = None) -> list[dict]:
    """The paired examples of ``texts`` (scored from ``from_chars[i]`` on: prompt lengths); KDError when none
    aligns."""
    check_fast(s_tok, "student")
    check_fast(t_tok, "teacher")
    out = []
    for lo in range(0, len(texts), 256):
        chunk = texts[lo:lo + 256]
        starts = from_chars[lo:lo + 256] if from_chars is not None else [0] * len(chunk)
        for text, s, t, c in zip(chunk, encode_side(s_tok, chunk, max_length), encode_side(t_tok, chunk, max_length),
                                 starts):
            ex = paired_example(text, s, t, s_tok, t_tok, from_char=c)
            if ex is not None:
                out.append(ex)
    _report_drops(where, len(texts), len(out))
    return out


def _report_drops(where: str, n_texts: int, n_kept: int) -> None:
    """Warn about texts with no span; KDError when none is left."""
    if n_kept < n_texts:
        logger.warning("%s: %d of %d text(s) dropped: no span both tokenizers cut alike", where, n_texts - n_kept,
                       n_texts)
    if n_kept == 0:
        raise KDError(f"{where}: no text where the teacher's and the student's tokenizations share a span (the "
                      f"texts are empty after tokenization, or shorter than two aligned pieces)")


def _identity(tokenizer) -> str:
    """A tokenizer's definition without the truncation/padding state that encoding with it leaves behind."""
    import hashlib
    import json

    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    spec.pop("truncation", None)
    spec.pop("padding", None)
    return hashlib.sha256(json.dumps([spec, str(tokenizer.name_or_path), len(tokenizer)], sort_keys=True).encode()
                          ).hexdigest()


def _paired_dataset(texts: list[str], starts: Optional[list[int]], s_tok, t_tok, max_length: int, where: str):
    """``pair_texts`` as a cached ``datasets.Dataset``: built once (rank 0 first, in worker processes for large
    inputs) under the kd_engine cache, keyed by the texts, both tokenizers and ``max_length``; the other ranks and
    later runs load it."""
    import hashlib
    import json

    from datasets import Dataset

    from ..dist import main_process_first
    from ..paths import cache_dir
    from .corpus_cache import _default_workers

    check_fast(s_tok, "student")
    check_fast(t_tok, "teacher")
    starts = starts if starts is not None else [0] * len(texts)
    digest = hashlib.sha256()
    for text in texts:
        digest.update(text.encode("utf-8") + b"\x00")
    key = hashlib.sha256(json.dumps({"v": 1, "texts": digest.hexdigest(),
                                     "starts": starts, "s": _identity(s_tok), "t": _identity(t_tok),
                                     "max_length": max_length}, sort_keys=True, default=str).encode()).hexdigest()[:32]
    path = os.path.join(cache_dir("xtoken"), f"pairs-{key}.arrow")

    def encode(batch):
        out: dict[str, list] = {}
        for text, c, s, t in zip(batch["text"], batch["start"], encode_side(s_tok, batch["text"], max_length),
                                 encode_side(t_tok, batch["text"], max_length)):
            ex = paired_example(text, s, t, s_tok, t_tok, from_char=c)
            for k, v in (ex or {}).items():
                out.setdefault(k, []).append(v)
        return out

    with main_process_first():
        raw = Dataset.from_dict({"text": texts, "start": starts})
        workers = _default_workers() if len(texts) >= 20000 else None
        ds = raw.map(encode, batched=True, batch_size=256, remove_columns=["text", "start"], num_proc=workers,
                     cache_file_name=path, new_fingerprint=key, desc="aligning")
    _report_drops(where, len(texts), len(ds))
    return ds


def _texts(ds, cfg, where: str) -> tuple[list[str], Optional[list[int]]]:
    """Plain texts, or prompt + response texts and the prompts' lengths (``--target_column``)."""
    if not cfg.target_column:
        require_columns(ds, [cfg.text_column], where)
        return [t for t in ds[cfg.text_column] if isinstance(t, str) and t.strip()], None
    require_columns(ds, [cfg.text_column, cfg.target_column], where)
    rows = [(p if isinstance(p, str) else "", r) for p, r in zip(ds[cfg.text_column], ds[cfg.target_column])
            if isinstance(r, str) and r.strip()]
    return [p + r for p, r in rows], [len(p) for p, _ in rows]


def build_paired_data(cfg, s_tok, t_tok) -> DataBundle:
    if not cfg.train_file:
        raise KDError("no training data: pass --train_file PATH (txt, jsonl, json, csv or tsv with --text_column)")
    if cfg.messages_column or cfg.text_pair_column:
        raise KDError("the cross-tokenizer methods train on plain text (--text_column) or prompt + response "
                      "(--target_column); --messages_column and --text_pair_column are not supported by them yet")
    train_raw, eval_raw = load_split_tables(cfg)
    texts, starts = _texts(train_raw, cfg, cfg.train_file)
    train = _paired_dataset(texts, starts, s_tok, t_tok, cfg.max_length, cfg.train_file)
    ev = None
    if eval_raw is not None:
        name = cfg.eval_file or f"{cfg.train_file} (held-out {cfg.eval_split:.0%})"
        texts, starts = _texts(eval_raw, cfg, name)
        ev = _paired_dataset(texts, starts, s_tok, t_tok, cfg.max_length, name)
    lengths = train.with_format("arrow")["length"].to_pylist()
    info = {"train_examples": len(train), "eval_examples": len(ev) if ev is not None else 0}
    return DataBundle(train=train, eval=ev, collate_fn=PairCollator(s_tok.pad_token_id, t_tok.pad_token_id),
                      train_lengths=lengths, info=info)


class PairCollator:
    """Right-pads each per-token list of a batch: student ids with the student's pad id, teacher ids with the
    teacher's, labels with -100, masks with 0, span and pair indices with -1; ints become ``LongTensor[B]``."""

    def __init__(self, student_pad: Optional[int], teacher_pad: Optional[int]):
        self.pads = {"input_ids": student_pad if student_pad is not None else 0,
                     "teacher_input_ids": teacher_pad if teacher_pad is not None else 0, "labels": -100,
                     "teacher_labels": -100, "attention_mask": 0, "teacher_attention_mask": 0}

    def __call__(self, examples: list[dict]) -> dict[str, torch.Tensor]:
        batch = {}
        for key, first in examples[0].items():
            if key == "length":
                continue
            if isinstance(first, int):
                batch[key] = torch.tensor([ex[key] for ex in examples], dtype=torch.long)
                continue
            value = self.pads.get(key, -1)
            width = max(max(len(ex[key]) for ex in examples), 1)
            batch[key] = torch.tensor([ex[key] + [value] * (width - len(ex[key])) for ex in examples],
                                      dtype=torch.long)
        return batch
