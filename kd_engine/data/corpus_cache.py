"""The memory-mapped token cache of a corpus: keyed, built once under a file lock, published atomically, shared
by runs and ranks (layout in ``kd_engine/data/corpus.py``)."""
from __future__ import annotations

import contextlib
import glob as globlib
import hashlib
import json
import logging
import os
import shutil
import time
from typing import Callable, Optional, Sequence, Union

import numpy as np

from ..errors import KDError
from ..input_files import read_json, reading
from ..io import atomic_dir, fsync_dir, write_text

logger = logging.getLogger(__name__)

from . import corpus_encode
from .corpus_encode import _token_dtype, special_ids
from .corpus_read import FORMATS, ReadStats, resolve_files

CACHE_VERSION = 1
COMPLETE_MARKER = "COMPLETE"

# ---------------------------------------------------------------------------------------------------------------
# cache key, build, load
# ---------------------------------------------------------------------------------------------------------------
def tokenizer_identity(tokenizer) -> dict:
    """What identifies a tokenizer for the cache key (a hash of its full definition when it has one)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        definition = backend.to_str()
    else:
        definition = json.dumps(sorted(tokenizer.get_vocab().items()))
    return {
        "name_or_path": str(getattr(tokenizer, "name_or_path", "")),
        "class": type(tokenizer).__name__,
        "vocab_size": len(tokenizer),
        "definition_sha256": hashlib.sha256(definition.encode()).hexdigest(),
        "truncation_side": getattr(tokenizer, "truncation_side", "right"),
        "special": special_ids(tokenizer),
    }


def cache_key_fields(files: Sequence[str], tokenizer, *, format: str, text_field: str,
                     max_length: Optional[int]) -> dict:
    file_ids = []
    for p in files:
        st = os.stat(p)
        file_ids.append([os.path.realpath(p), st.st_size, st.st_mtime_ns])
    return {
        "version": CACHE_VERSION,
        "tokenizer": tokenizer_identity(tokenizer),
        "files": file_ids,
        "format": format,
        "text_field": text_field if format in ("auto", "jsonl") else None,
        "max_length": max_length,
    }


def cache_key(fields: dict) -> str:
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:24]


def _describe_files(files: Sequence[str], limit: int = 5) -> str:
    shown = ", ".join(files[:limit])
    return shown + (f" ... ({len(files)} files)" if len(files) > limit else "")


@contextlib.contextmanager
def _file_lock(path: str):
    try:
        import fcntl
    except ImportError:  # not POSIX: no cross-process lock
        yield
        return
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _is_complete(path: str) -> bool:
    return os.path.isfile(os.path.join(path, COMPLETE_MARKER))


def _default_workers() -> int:
    try:
        n = len(os.sched_getaffinity(0))
    except AttributeError:
        n = os.cpu_count() or 1
    return max(1, min(8, n))


def _build(files: Sequence[str], tokenizer, final: str, key: str, fields: dict, *, format: str, text_field: str,
           max_length: Optional[int], num_workers: int, progress: bool) -> None:
    from tqdm.auto import tqdm

    parent = os.path.dirname(final)
    for stale in globlib.glob(os.path.join(parent, f".{key}.tmp-*")):  # left by a crashed build (we hold the lock)
        shutil.rmtree(stale, ignore_errors=True)
    if os.path.exists(final):  # a folder without the marker: never trusted
        logger.warning("corpus cache %s is incomplete (no %s marker): rebuilding it", final, COMPLETE_MARKER)
        shutil.rmtree(final)
    spec = fields["tokenizer"]["special"]
    dtype = _token_dtype(tokenizer)
    stats = ReadStats()
    total_bytes = sum(os.path.getsize(p) for p in files)
    start = time.perf_counter()
    n_docs = n_tokens = n_empty = 0
    with atomic_dir(final, prefix=f".{key}.tmp-") as tmp:  # published complete, or not at all
        bar = tqdm(total=total_bytes, unit="B", unit_scale=True, desc="tokenizing corpus", disable=not progress,
                   mininterval=1.0)
        with open(os.path.join(tmp, "tokens.bin"), "wb") as ft, open(os.path.join(tmp, "offsets.bin"), "wb") as fo:
            fo.write(np.zeros(1, dtype=np.int64).tobytes())
            done = 0
            for (flat, lengths, empty), nbytes in corpus_encode.encode_documents(
                    files, format, text_field, stats, tokenizer, max_length, spec["separator"], dtype, num_workers):
                ft.write(flat.tobytes())
                fo.write((n_tokens + np.cumsum(lengths)).astype(np.int64).tobytes())
                n_docs += len(lengths)
                n_tokens += int(flat.size)
                n_empty += empty
                bar.update(nbytes - done)
                done = nbytes
                bar.set_postfix(docs=n_docs, tokens=n_tokens, refresh=False)
            ft.flush()
            fo.flush()
            os.fsync(ft.fileno())
            os.fsync(fo.fileno())
        bar.close()
        seconds = time.perf_counter() - start
        skipped = int(sum(stats.undecodable.values()))
        bad = int(sum(stats.bad_records.values()))
        if n_docs == 0:
            why = []
            if skipped:
                why.append(f"{skipped} lines skipped as not UTF-8")
            if bad:
                why.append(f"{bad} jsonl records skipped without a string '{text_field}' field")
            raise KDError(f"no usable text in corpus files {_describe_files(list(files))}"
                          + (f" ({'; '.join(why)})" if why else " (empty, or only blank lines)"))
        meta = {
            "key": key,
            "key_fields": fields,
            "dtype": dtype.name,
            "num_documents": n_docs,
            "num_tokens": n_tokens,
            "separator": spec["separator"],
            "style": spec["style"],
            "prefix": spec["prefix"],
            "suffix": spec["suffix"],
            "formats": stats.formats,
            "skipped_undecodable_lines": skipped,
            "skipped_undecodable_by_file": dict(stats.undecodable),
            "skipped_bad_records": bad,
            "skipped_bad_records_by_file": dict(stats.bad_records),
            "empty_after_tokenization": n_empty,
            "build_seconds": seconds,
            "num_workers": num_workers,
        }
        with open(os.path.join(tmp, "meta.json"), "w") as f:
            json.dump(meta, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
    # the marker last: a folder without it is never trusted (rebuilt)
    write_text(os.path.join(final, COMPLETE_MARKER), f"{n_docs} documents, {n_tokens} tokens\n")
    fsync_dir(final)
    logger.info("tokenized %d documents, %d tokens in %.1f s (%.0f tokens/s, %d workers) into %s", n_docs,
                n_tokens, seconds, n_tokens / max(seconds, 1e-9), num_workers, final)
    if skipped:
        logger.warning("skipped %d lines that are not UTF-8: %s", skipped,
                       ", ".join(f"{p}: {c}" for p, c in stats.undecodable.items()))
    if bad:
        logger.warning("skipped %d jsonl records without a string '%s' field: %s", bad, text_field,
                       ", ".join(f"{p}: {c}" for p, c in stats.bad_records.items()))


def build_or_load(files, tokenizer, cache_dir: Union[str, os.PathLike], *, format: str = "auto",
                  text_field: str = "text", max_length: Optional[int] = None, num_workers: Optional[int] = None,
                  rank: int = 0, world_size: int = 1, barrier: Optional[Callable[[], object]] = None,
                  progress: bool = True, wait_timeout: float = 6 * 3600.0,
                  poll_interval: float = 1.0) -> "TokenCache":
    """The token cache of ``files`` for ``tokenizer``, built once (by rank 0) and reused by every run and rank.

    Rank 0 builds the cache if no complete one exists; the other ranks wait: on ``barrier()`` when given (e.g.
    ``torch.distributed.barrier``; every rank calls it exactly once, also when rank 0 failed), otherwise by
    polling for the ``COMPLETE`` marker (``wait_timeout`` seconds at most). ``cache_dir`` must be shared by the
    ranks that use it (on nodes without a shared file system, pass the local rank as ``rank``).
    ``max_length``: tokens kept per document (None: whole documents, the right choice for packing).
    ``num_workers``: tokenizer processes (default min(8, available cores); 1 tokenizes in this process).
    """
    workers = _default_workers() if num_workers is None else max(1, int(num_workers))
    synced = barrier is not None and world_size > 1
    built = False
    final = ""
    error: Optional[BaseException] = None
    try:  # every rank reaches the barrier exactly once, whatever fails before it
        if format not in FORMATS:
            raise KDError(f"unknown corpus format '{format}' (known: {', '.join(FORMATS)})")
        if max_length is not None and max_length < 1:
            raise KDError(f"max_length must be a positive number of tokens, got {max_length}")
        files = resolve_files(files)
        fields = cache_key_fields(files, tokenizer, format=format, text_field=text_field, max_length=max_length)
        key = cache_key(fields)
        cache_dir = os.path.expanduser(os.fspath(cache_dir))
        final = os.path.join(cache_dir, key)
        if rank == 0:
            os.makedirs(cache_dir, exist_ok=True)
            with _file_lock(os.path.join(cache_dir, f".{key}.lock")):
                if not _is_complete(final):
                    _build(files, tokenizer, final, key, fields, format=format, text_field=text_field,
                           max_length=max_length, num_workers=workers, progress=progress)
                    built = True
    except BaseException as exc:  # noqa: BLE001 - re-raised after the barrier so that no rank hangs
        error = exc
    if synced:
        barrier()
    if error is not None:
        raise error
    if rank != 0:
        if synced:
            if not _is_complete(final):
                raise KDError(f"rank {rank}: rank 0 did not build the corpus cache {final} (see its error), or "
                              "the ranks do not share the cache directory")
        else:
            waited = 0.0
            while not _is_complete(final):
                if waited >= wait_timeout:
                    raise KDError(f"rank {rank}: waited {waited:.0f} s for rank 0 to build the corpus cache "
                                  f"{final}; prebuild it with python -m kd_engine.data.corpus")
                time.sleep(poll_interval)
                waited += poll_interval
    cache = TokenCache(final)
    cache.built = built
    if rank == 0 and not built:
        logger.info("corpus cache hit: %s (%d documents, %d tokens)", final, cache.num_documents, cache.num_tokens)
    return cache


class TokenCache:
    """A complete cache folder: token stream and document offsets as memmaps, opened lazily once per process."""

    def __init__(self, path: str) -> None:
        if not _is_complete(path):
            raise KDError(f"corpus cache {path} is not complete (no {COMPLETE_MARKER} marker)")
        self.path = path
        meta_path = os.path.join(path, "meta.json")
        self.meta = read_json(meta_path, "corpus cache meta")
        with reading("corpus cache meta", meta_path):
            self.num_documents: int = int(self.meta["num_documents"])
            self.num_tokens: int = int(self.meta["num_tokens"])
            self.separator: int = int(self.meta["separator"])
            self.prefix: list[int] = [int(t) for t in self.meta["prefix"]]
            self.suffix: list[int] = [int(t) for t in self.meta["suffix"]]
            np.dtype(self.meta["dtype"])
        self.built = False  # True when this process built it (set by build_or_load)
        self._pid: Optional[int] = None
        self._tokens: Optional[np.ndarray] = None
        self._offsets: Optional[np.ndarray] = None

    def _open(self) -> None:
        with reading("corpus cache", self.path):  # a file shorter than meta.json says: "mmap length is greater"
            self._tokens = np.memmap(os.path.join(self.path, "tokens.bin"), dtype=self.meta["dtype"], mode="r",
                                     shape=(self.num_tokens,))
            self._offsets = np.memmap(os.path.join(self.path, "offsets.bin"), dtype=np.int64, mode="r",
                                      shape=(self.num_documents + 1,))
        self._pid = os.getpid()

    @property
    def tokens(self) -> np.ndarray:
        """The whole token stream (documents each followed by the separator), memory-mapped."""
        if self._pid != os.getpid():
            self._open()
        return self._tokens

    @property
    def offsets(self) -> np.ndarray:
        if self._pid != os.getpid():
            self._open()
        return self._offsets

    def document(self, i: int) -> np.ndarray:
        """Token ids of document ``i`` (without its separator)."""
        off = self.offsets
        return self.tokens[int(off[i]):int(off[i + 1]) - 1]

    def document_lengths(self) -> np.ndarray:
        """Tokens per document, without separators (reads the offsets: 8 bytes per document)."""
        return np.diff(np.asarray(self.offsets)) - 1

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state.update(_pid=None, _tokens=None, _offsets=None)
        return state

    def __repr__(self) -> str:
        return f"TokenCache({self.path!r}, documents={self.num_documents}, tokens={self.num_tokens})"


