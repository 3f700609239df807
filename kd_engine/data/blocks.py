"""Map-style datasets over a token cache: packed fixed-length blocks, one truncated block per document, or every
document cut into blocks that never cross a document boundary."""
from __future__ import annotations

import logging
import operator

import numpy as np
import torch

from ..errors import KDError

logger = logging.getLogger(__name__)

from .corpus_cache import TokenCache

# ---------------------------------------------------------------------------------------------------------------
# datasets
# ---------------------------------------------------------------------------------------------------------------
def _index(i, n: int) -> int:
    i = operator.index(i)
    if i < 0:
        i += n
    if not 0 <= i < n:
        raise IndexError(f"index {i} out of range for {n} examples")
    return i


class PackedBlocks(torch.utils.data.Dataset):
    """Fixed-length blocks cut from the token stream (documents joined by the separator; last partial block
    dropped). With ``add_special_tokens`` a block is [CLS] body [SEP] (BERT-like) or [bos] body (others), so the
    body is ``block_size`` minus those; without, a block is a plain slice of the stream.
    Item: {"input_ids": list[int], "attention_mask": list[int]}, both of length ``block_size``."""

    def __init__(self, cache: TokenCache, block_size: int, add_special_tokens: bool = True) -> None:
        self.cache = cache
        self.block_size = int(block_size)
        self.prefix = list(cache.prefix) if add_special_tokens else []
        self.suffix = list(cache.suffix) if add_special_tokens else []
        self.body = self.block_size - len(self.prefix) - len(self.suffix)
        if self.body < 1:
            raise KDError(f"block_size {block_size} leaves no room for text after the special tokens")
        self.num_blocks = cache.num_tokens // self.body
        if self.num_blocks == 0:
            raise KDError(f"corpus cache {cache.path} has {cache.num_tokens} tokens: fewer than one block of "
                          f"{block_size}")
        self._mask = [1] * self.block_size

    def __len__(self) -> int:
        return self.num_blocks

    def __getitem__(self, i) -> dict:
        i = _index(i, self.num_blocks)
        body = self.cache.tokens[i * self.body:(i + 1) * self.body].tolist()
        return {"input_ids": self.prefix + body + self.suffix, "attention_mask": list(self._mask)}


class _PerDocument(torch.utils.data.Dataset):
    """Examples cut from single documents: [CLS] part [SEP] (BERT-like) or [bos] part eos (others), at most
    ``max_length`` ids, so ``body`` tokens of text each."""

    def __init__(self, cache: TokenCache, max_length: int, add_special_tokens: bool = True) -> None:
        self.cache = cache
        self.max_length = int(max_length)
        self.prefix = list(cache.prefix) if add_special_tokens else []
        self.suffix = [cache.separator] if add_special_tokens else []
        self.body = self.max_length - len(self.prefix) - len(self.suffix)
        if self.body < 1:
            raise KDError(f"max_length {max_length} leaves no room for text after the special tokens")


class DocumentBlocks(_PerDocument):
    """One document per example, truncated so that with its special tokens it has at most ``max_length`` ids:
    [CLS] doc [SEP] (BERT-like) or [bos] doc eos (others). Variable length: pad per batch (dynamic padding).
    ``lengths`` gives every example's length (for length-grouped batching)."""

    def __len__(self) -> int:
        return self.cache.num_documents

    def __getitem__(self, i) -> dict:
        i = _index(i, self.cache.num_documents)
        ids = self.prefix + self.cache.document(i)[:self.body].tolist() + self.suffix
        return {"input_ids": ids, "attention_mask": [1] * len(ids)}

    @property
    def lengths(self) -> list[int]:
        extra = len(self.prefix) + len(self.suffix)
        return (np.minimum(self.cache.document_lengths(), self.body) + extra).tolist()


class DocumentChunks(_PerDocument):
    """Every document cut into consecutive blocks of at most ``max_length`` ids with its special tokens
    ([CLS] part [SEP] or [bos] part eos), no block crossing a document boundary (a document's last block is shorter:
    pad per batch). All the text is used, as with packed blocks, but no block mixes two documents."""

    def __init__(self, cache: TokenCache, max_length: int, add_special_tokens: bool = True) -> None:
        super().__init__(cache, max_length, add_special_tokens)
        doc_len = cache.document_lengths()
        per_doc = -(-doc_len // self.body)  # ceil; an empty document has no block
        self._ends = np.cumsum(per_doc)  # block index where each document's blocks end (exclusive)
        self._doc_len = doc_len
        if len(self) == 0:
            raise KDError(f"corpus cache {cache.path} has no text for a block")

    def __len__(self) -> int:
        return int(self._ends[-1]) if len(self._ends) else 0

    def _locate(self, i: int) -> tuple[int, int]:
        doc = int(np.searchsorted(self._ends, i, side="right"))
        first = int(self._ends[doc - 1]) if doc > 0 else 0
        return doc, i - first

    def __getitem__(self, i) -> dict:
        doc, part = self._locate(_index(i, len(self)))
        body = self.cache.document(doc)[part * self.body:(part + 1) * self.body].tolist()
        ids = self.prefix + body + self.suffix
        return {"input_ids": ids, "attention_mask": [1] * len(ids)}

    @property
    def lengths(self) -> list[int]:
        extra = len(self.prefix) + len(self.suffix)
        out = np.full(len(self), self.body + extra, dtype=np.int64)
        docs = self._doc_len[self._doc_len > 0]
        out[self._ends[self._doc_len > 0] - 1] = docs - (-(-docs // self.body) - 1) * self.body + extra  # last parts
        return out.tolist()
