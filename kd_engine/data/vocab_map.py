"""The part of two vocabularies that maps one to one: tokens that spell the same text.

A token's *surface* is the text it stands for with the tokenizer's space markers made real: byte-level BPE's
byte alphabet decoded (``Ġ`` is a space, ``Ċ`` a newline; a token holding part of a multi-byte character has no
surface; it is named by its bytes, ``\x00bytes:<hex>``), SentencePiece's ``▁`` a space and its ``<0xNN>``
byte-fallback tokens bytes, WordPiece's ``##`` prefix a continuation (``##ing`` -> ``ing``) and its word-initial
tokens preceded by a space (``the`` -> `` the``, the spelling they have inside running text). A special token's
surface is ``\x00special:<its string>``. Teacher and student tokens with the same surface map to each other; then
special tokens of the same role (bos, eos) that are still unmapped; where several tokens of one side
share a surface (an uncased vocabulary), the lowest id is the one mapped. With one tokenizer on both sides every
token maps to itself. Computed once per pair of tokenizers and process (``vocab_map``).
"""
from __future__ import annotations

import functools
import json
from typing import Optional

import torch


@functools.lru_cache(maxsize=1)
def _byte_decoder() -> dict[str, int]:
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs)}


def _decoder_kinds(tokenizer) -> set[str]:
    """The decoder step types of a fast tokenizer (``ByteLevel``, ``Metaspace``, ``WordPiece``, ``Replace`` ...)."""
    spec = json.loads(tokenizer.backend_tokenizer.to_str()).get("decoder") or {}
    kinds, todo = set(), [spec]
    while todo:
        d = todo.pop()
        kinds.add(d.get("type"))
        todo.extend(d.get("decoders") or [])
    return kinds


def surfaces(tokenizer) -> list[Optional[str]]:
    """Per token id, its surface text (see the module docstring) or None."""
    kinds = _decoder_kinds(tokenizer)
    vocab = tokenizer.get_vocab()
    special = set(getattr(tokenizer, "all_special_ids", []) or [])
    out: list[Optional[str]] = [None] * (max(vocab.values()) + 1)
    bytes_of = _byte_decoder()
    for token, i in vocab.items():
        if i in special:
            out[i] = "\x00special:" + token
        elif "ByteLevel" in kinds:
            try:
                raw = bytes(bytes_of[c] for c in token)
            except KeyError:  # not in the byte alphabet (an added token): its own spelling
                out[i] = token
                continue
            try:
                out[i] = raw.decode("utf-8")
            except UnicodeDecodeError:  # part of a multi-byte character
                out[i] = "\x00bytes:" + raw.hex()
        elif "WordPiece" in kinds:
            out[i] = token[2:] if token.startswith("##") else " " + token
        else:  # SentencePiece (Metaspace, or Replace '▁' -> ' ' with byte fallback) and anything plain
            if token.startswith("<0x") and token.endswith(">") and len(token) == 6:
                b = int(token[3:5], 16)
                out[i] = chr(b) if b < 128 else "\x00bytes:" + token[3:5].lower()
            else:
                out[i] = token.replace("\u2581", " ")
    return out


def _first_ids(surf: list[Optional[str]]) -> dict[str, int]:
    first: dict[str, int] = {}
    for i, s in enumerate(surf):
        if s and s not in first:
            first[s] = i
    return first


_MAPS: dict[tuple[str, str], tuple[torch.Tensor, torch.Tensor]] = {}


def vocab_map(teacher_tok, student_tok) -> tuple[torch.Tensor, torch.Tensor]:
    """``(teacher_ids, student_ids)``: equal-length LongTensors, teacher token ``teacher_ids[j]`` spells what student
    token ``student_ids[j]`` spells; every id appears at most once on its side."""
    from .corpus_cache import tokenizer_identity

    key = tuple(json.dumps(tokenizer_identity(t), sort_keys=True, default=str) for t in (teacher_tok, student_tok))
    if key not in _MAPS:
        t_first, s_first = _first_ids(surfaces(teacher_tok)), _first_ids(surfaces(student_tok))
        pairs = [(i, s_first[s]) for s, i in t_first.items() if s in s_first]
        used_t, used_s = {p[0] for p in pairs}, {p[1] for p in pairs}
        for role in ("bos_token_id", "eos_token_id"):
            a, b = getattr(teacher_tok, role, None), getattr(student_tok, role, None)
            if a is not None and b is not None and a not in used_t and b not in used_s:
                pairs.append((a, b))
                used_t.add(a)
                used_s.add(b)
        pairs.sort()
        _MAPS[key] = (torch.tensor([p[0] for p in pairs], dtype=torch.long),
                      torch.tensor([p[1] for p in pairs], dtype=torch.long))
    return _MAPS[key]


def word_ids(tokenizer, table: dict[str, int]) -> torch.Tensor:
    """Per token id, an integer for its surface with surrounding whitespace removed (ids shared through ``table``
    between tokenizers; -1 for tokens with no such text): two models' top tokens "name the same word" when these
    agree."""
    out = []
    for s in surfaces(tokenizer):
        w = s.strip() if s and not s.startswith("\x00") else ""
        out.append(table.setdefault(w, len(table)) if w else -1)
    return torch.tensor(out, dtype=torch.long)
