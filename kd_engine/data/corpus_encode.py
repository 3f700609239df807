"""Corpus tokenization: documents -> token id chunks, in order, optionally in worker processes (bounded RAM)."""
from __future__ import annotations

import contextlib
import logging
import multiprocessing as mp
import os
from collections import deque
from typing import Iterable, Iterator, Optional, Sequence

import numpy as np

from ..errors import KDError

logger = logging.getLogger(__name__)

from .corpus_read import ReadStats, iter_documents

CHUNK_DOCS = 1024  # documents per tokenization task ...
CHUNK_CHARS = 1 << 20  # ... or this many characters, whichever comes first

# ---------------------------------------------------------------------------------------------------------------
# tokenization
# ---------------------------------------------------------------------------------------------------------------
def special_ids(tokenizer) -> dict:
    """Separator between documents and the tokens framing a block / a document, chosen from the tokenizer.

    BERT-like (cls and sep): separator [SEP]; a block is [CLS] body [SEP]; a document [CLS] doc [SEP].
    Otherwise (GPT/Llama-like): separator eos; a block is [bos] body (no bos: body only); a document [bos] doc eos.
    """
    cls_id, sep_id = tokenizer.cls_token_id, tokenizer.sep_token_id
    bos_id, eos_id = tokenizer.bos_token_id, tokenizer.eos_token_id
    if cls_id is not None and sep_id is not None:
        return {"style": "cls_sep", "separator": sep_id, "prefix": [cls_id], "suffix": [sep_id]}
    if eos_id is None:
        raise KDError(f"tokenizer {getattr(tokenizer, 'name_or_path', '') or type(tokenizer).__name__} has "
                      "neither a sep nor an eos token to separate documents")
    return {"style": "bos_eos", "separator": eos_id, "prefix": [] if bos_id is None else [bos_id], "suffix": []}


def _token_dtype(tokenizer) -> np.dtype:
    return np.dtype(np.uint16) if len(tokenizer) <= 1 << 16 else np.dtype(np.uint32)


def encode_chunk(tokenizer, texts: list[str], max_length: Optional[int], separator: int,
                 dtype: np.dtype) -> tuple[np.ndarray, np.ndarray, int]:
    """Token ids of ``texts``, each followed by ``separator``, flattened; lengths (with separator); empty count."""
    kwargs = dict(truncation=True, max_length=max_length) if max_length else {}
    ids = tokenizer(texts, add_special_tokens=False, return_attention_mask=False, return_token_type_ids=False,
                    verbose=False, **kwargs)["input_ids"]
    lengths = np.fromiter((len(x) + 1 for x in ids if x), dtype=np.int64)
    flat = np.empty(int(lengths.sum()), dtype=dtype)
    pos = 0
    for x in ids:
        if x:
            flat[pos:pos + len(x)] = x
            flat[pos + len(x)] = separator
            pos += len(x) + 1
    return flat, lengths, len(ids) - len(lengths)


_WORKER: dict = {}


def _worker_init(tokenizer, max_length, separator, dtype) -> None:
    _WORKER.update(tokenizer=tokenizer, max_length=max_length, separator=separator, dtype=dtype)


def _worker_encode(texts: list[str]):
    w = _WORKER
    return encode_chunk(w["tokenizer"], texts, w["max_length"], w["separator"], w["dtype"])


def _chunks(docs: Iterable[str], stats: ReadStats, max_docs: int, max_chars: int) -> Iterator[tuple[list, int]]:
    """Groups of documents, each with the number of corpus bytes read once it is complete (for progress)."""
    buf: list[str] = []
    chars = 0
    for doc in docs:
        buf.append(doc)
        chars += len(doc)
        if len(buf) >= max_docs or chars >= max_chars:
            yield buf, stats.bytes_read
            buf, chars = [], 0
    if buf:
        yield buf, stats.bytes_read


@contextlib.contextmanager
def _no_tokenizers_threads_in_children():
    """Forked workers must not use the tokenizers thread pool (and should not warn about it): set the env var
    the Rust library checks at fork time, only while the pool starts."""
    old = os.environ.get("TOKENIZERS_PARALLELISM")
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("TOKENIZERS_PARALLELISM", None)
        else:
            os.environ["TOKENIZERS_PARALLELISM"] = old


def _encoded_chunks(chunks: Iterator[tuple[list, int]], tokenizer, max_length, separator, dtype,
                    num_workers: int) -> Iterator[tuple[tuple, int]]:
    """Encoded chunks in input order; with workers, at most 2 x num_workers chunks are in flight (bounded RAM)."""
    if num_workers <= 1:
        for texts, nbytes in chunks:
            yield encode_chunk(tokenizer, texts, max_length, separator, dtype), nbytes
        return
    method = "fork" if "fork" in mp.get_all_start_methods() else "spawn"
    with _no_tokenizers_threads_in_children():
        pool = mp.get_context(method).Pool(num_workers, initializer=_worker_init,
                                           initargs=(tokenizer, max_length, separator, dtype))
    try:
        pending: deque = deque()
        for texts, nbytes in chunks:
            pending.append((pool.apply_async(_worker_encode, (texts,)), nbytes))
            if len(pending) >= 2 * num_workers:
                res, nb = pending.popleft()
                yield res.get(), nb
        while pending:
            res, nb = pending.popleft()
            yield res.get(), nb
        pool.close()
        pool.join()
    finally:
        pool.terminate()



def encode_documents(files: Sequence[str], format: str, text_field: str, stats: ReadStats, tokenizer,
                     max_length: Optional[int], separator: int, dtype, num_workers: int) -> Iterator[tuple[tuple, int]]:
    """The corpus' documents as encoded chunks ``((flat ids, lengths, empty count), bytes read so far)``."""
    chunks = _chunks(iter_documents(files, format, text_field, stats), stats, CHUNK_DOCS, CHUNK_CHARS)
    return _encoded_chunks(chunks, tokenizer, max_length, separator, dtype, num_workers)
