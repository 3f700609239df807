"""Align two tokenizations of one text by character offsets: the spans both tokenizers cut at the same place.

Both tokenizers encode the same string (fast tokenizers' ``offset_mapping``: byte-level BPE, SentencePiece and
WordPiece all report character offsets into the original text). A *cut* of one tokenization is a character
position where its tokens split the text: between tokens k-1 and k when no earlier token reaches past token k's
start. Characters no token covers (WordPiece drops spaces, some tokenizers drop newlines) belong to the token
after them, so the cut sits at the end of the previous token's coverage; characters split over several tokens (a
multi-byte character in byte-level BPE, whose byte tokens carry the same offsets) allow no cut inside them.

The common cuts of both tokenizations delimit the spans: span ``i`` covers characters ``[cut_i, cut_{i+1})`` with
teacher tokens ``[t0, t1)`` and student tokens ``[s0, s1)`` (indices into each ``input_ids``). Within a span both
models spell out the same characters, so the chain rule gives each model's probability of that text given the
same text before it (``span_log_probs``); at a span's first token both models predict a next token after the same
prefix text, which is where next-token distributions are compared.

Special tokens (BOS, EOS, CLS, SEP, pads: zero-width offsets or ids in ``special_mask``) are in no span; a span
that would contain one in its middle is dropped. Text one side truncated (``max_length``) is in no span: the last
common cut is at most the shorter coverage. Lossy tokenizers (uncased WordPiece lowercases and strips accents and
never sees spaces) still align by offsets; their spans cover the same characters, but what the model predicts of
them is less than the text (README: cross-tokenizer distillation).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from ..errors import KDError


@dataclass(frozen=True)
class Span:
    t0: int
    t1: int
    s0: int
    s1: int
    c0: int  # characters [c0, c1) of the text
    c1: int


def check_fast(tokenizer, who: str) -> None:
    """KDError unless the tokenizer reports character offsets (a Rust-backed "fast" tokenizer)."""
    if not getattr(tokenizer, "is_fast", False):
        name = getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__
        raise KDError(f"the {who} tokenizer ({name}, {type(tokenizer).__name__}) gives no character offsets: "
                      f"cross-tokenizer alignment needs a fast tokenizer; load it with AutoTokenizer.from_pretrained"
                      f"(..., use_fast=True) and save_pretrained it (a tokenizer.json), or convert it with "
                      f"transformers.convert_slow_tokenizer")


def _content(offsets: Sequence[Sequence[int]], special: Sequence[bool]) -> list[int]:
    return [k for k, (a, b) in enumerate(offsets) if b > a and not special[k]]


def cuts(offsets: Sequence[Sequence[int]], special: Sequence[bool]) -> dict[int, int]:
    """``{character position: index of the first token after it}`` for every cut of one tokenization, including
    position 0 (before the first content token) and the end of its coverage (mapped to one past the last content
    token). Token indices are into the full sequence (special tokens included)."""
    content = _content(offsets, special)
    if not content:
        return {}
    out = {0: content[0]}
    reach = offsets[content[0]][1]
    for k in content[1:]:
        a, b = offsets[k]
        if reach <= a:  # no earlier token reaches into token k: a cut where the previous coverage ends
            out[reach] = k
        reach = max(reach, b)
    out[reach] = content[-1] + 1
    return out


def align_spans(t_offsets, s_offsets, t_special: Optional[Sequence[bool]] = None,
                s_special: Optional[Sequence[bool]] = None) -> list[Span]:
    """The spans between consecutive common cuts of a teacher and a student tokenization of the same text."""
    t_special = t_special if t_special is not None else [False] * len(t_offsets)
    s_special = s_special if s_special is not None else [False] * len(s_offsets)
    tc, sc = cuts(t_offsets, t_special), cuts(s_offsets, s_special)
    common = sorted(set(tc) & set(sc))
    spans = []
    for c0, c1 in zip(common, common[1:]):
        t0, t1, s0, s1 = tc[c0], tc[c1], sc[c0], sc[c1]
        if any(t_special[t0:t1]) or any(s_special[s0:s1]):
            continue
        spans.append(Span(t0, t1, s0, s1, c0, c1))
    return spans


def special_mask(ids: Sequence[int], tokenizer) -> list[bool]:
    special = set(getattr(tokenizer, "all_special_ids", []) or [])
    return [i in special for i in ids]


def token_log_probs(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """``[B, L]``: log p(ids[:, j] | ids[:, :j]) at j >= 1 (fp32), 0 at j = 0 (nothing predicts it)."""
    lp = torch.log_softmax(logits[:, :-1].float(), dim=-1).gather(-1, ids[:, 1:, None])[..., 0]
    return torch.cat([lp.new_zeros(lp.shape[0], 1), lp], dim=1)


def span_log_probs(tok_lp: torch.Tensor, starts: torch.Tensor, ends: torch.Tensor) -> torch.Tensor:
    """Chain rule: ``[B, K]`` sums of ``tok_lp`` ``[B, L]`` over tokens ``[starts, ends)`` (padding: start = end)."""
    prefix = torch.cat([tok_lp.new_zeros(tok_lp.shape[0], 1), tok_lp.cumsum(1)], dim=1)
    return prefix.gather(1, ends) - prefix.gather(1, starts)


def position_pairs(t_first: int, t_end: int, s_first: int, s_end: int) -> list[tuple[int, int]]:
    """ULD's own alignment: the i-th content token of each side paired, cut to the shorter side (token indices)."""
    n = min(t_end - t_first, s_end - s_first)
    return [(t_first + i, s_first + i) for i in range(max(n, 0))]
