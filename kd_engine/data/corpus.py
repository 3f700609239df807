"""Pretraining corpora far bigger than RAM: stream text files, tokenize once into a memory-mapped cache, pack.

Usage::

    cache = build_or_load(["corpus/*.txt"], tokenizer, cache_dir, rank=rank, world_size=world_size,
                          barrier=torch.distributed.barrier)
    train = PackedBlocks(cache, block_size=128)      # map-style Dataset, O(1) __getitem__ from the memmap
    train = DocumentBlocks(cache, max_length=512)    # or: one (truncated) document per example

Inputs: a file, a directory (all files below it, sorted, hidden ones skipped), a glob, or a list of these.

Readers (``format``), all streaming line by line, never holding a whole file:
  ``lines``       one document per non-blank line;
  ``paragraphs``  documents separated by blank lines (a document's lines are joined with "\\n");
  ``jsonl``       one JSON object per line, the document is the string in ``text_field``;
  ``wiki``        WikiExtractor output, ``<doc id=.. url=.. title=..>`` ... ``</doc>``; the first line of a
                  document is dropped when it repeats the title; text outside ``<doc>`` is ignored;
  ``auto``        per file: ``.jsonl``/``.json`` -> jsonl; first non-blank line ``<doc ...>`` -> wiki;
                  first non-blank line a JSON object -> jsonl; otherwise lines (never paragraphs: say so).

Bytes that are not UTF-8: each line is decoded as strict UTF-8 and a line that fails is **skipped, never
repaired** (no ``errors="replace"``); the number of skipped lines per file is logged as a warning at the end of
the build and stored in the cache's ``meta.json`` (``skipped_undecodable_lines``). jsonl lines that are not a JSON
object with a string ``text_field`` are skipped and counted the same way (``skipped_bad_records``). A corpus that
yields no document raises ``KDError`` naming the files.

Token cache: one folder per key under ``cache_dir``::

    tokens.bin   every document's token ids followed by one separator ([SEP], else eos); uint16 when the
                 tokenizer has <= 65536 ids, else uint32
    offsets.bin  int64, num_documents + 1 entries: where each document starts in tokens.bin
    meta.json    counts, dtype, special ids, the fields the key was made of
    COMPLETE     written last; a folder without it is rebuilt

The key is a hash of the tokenizer (name_or_path, class, len, a hash of its full definition, special ids), the
files (real path, size, mtime), ``max_length`` (tokens kept per document; None keeps whole documents), the format
options and a version. The block size is deliberately not in the key: packing is a view computed at load time,
so one cache serves every block size. A build writes into a temporary folder, which is moved into place with
``os.replace``, then the marker is written: a crash never leaves a folder that looks complete. Builders of the
same key on one file system are serialised by a file lock.
"""
from __future__ import annotations

import argparse
import contextlib
import glob as globlib
import hashlib
import html
import json
import logging
import multiprocessing as mp
import operator
import os
import re
import shutil
import sys
import tempfile
import time
from collections import Counter, deque
from typing import Callable, Iterable, Iterator, Optional, Sequence, Union

import numpy as np
import torch

from ..errors import KDError

logger = logging.getLogger(__name__)

CACHE_VERSION = 1
FORMATS = ("auto", "lines", "paragraphs", "jsonl", "wiki")
COMPLETE_MARKER = "COMPLETE"
_JSON_EXTS = (".jsonl", ".json")
_GLOB_CHARS = re.compile(r"[*?\[]")
_DOC_OPEN = re.compile(r"^<doc(\s[^>]*)?>$")
_DOC_TITLE = re.compile(r'\btitle="([^"]*)"')
CHUNK_DOCS = 1024  # documents per tokenization task ...
CHUNK_CHARS = 1 << 20  # ... or this many characters, whichever comes first


# ---------------------------------------------------------------------------------------------------------------
# input files
# ---------------------------------------------------------------------------------------------------------------
def resolve_files(spec: Union[str, os.PathLike, Sequence[Union[str, os.PathLike]]]) -> list[str]:
    """Expand files, directories (recursively, sorted, hidden entries skipped) and globs; order kept, no repeats."""
    items = [spec] if isinstance(spec, (str, os.PathLike)) else list(spec)
    if not items:
        raise KDError("no corpus files given")
    out: list[str] = []
    for item in items:
        item = os.path.expanduser(os.fspath(item))
        if os.path.isdir(item):
            found = []
            for root, dirs, files in os.walk(item):
                dirs[:] = sorted(d for d in dirs if not d.startswith("."))
                found += [os.path.join(root, f) for f in sorted(files) if not f.startswith(".")]
            if not found:
                raise KDError(f"corpus directory {item} contains no files")
        elif os.path.isfile(item):
            found = [item]
        elif _GLOB_CHARS.search(item):
            found = sorted(p for p in globlib.glob(item, recursive=True) if os.path.isfile(p))
            if not found:
                raise KDError(f"corpus pattern {item} matches no file")
        else:
            raise KDError(f"corpus file not found: {item}")
        out += found
    seen: set[str] = set()
    unique = []
    for p in out:
        real = os.path.realpath(p)
        if real not in seen:
            seen.add(real)
            unique.append(p)
    return unique


# ---------------------------------------------------------------------------------------------------------------
# readers
# ---------------------------------------------------------------------------------------------------------------
class ReadStats:
    """What the readers saw: bytes read (for progress), skipped lines and records per file."""

    def __init__(self) -> None:
        self.bytes_read = 0
        self.undecodable: Counter = Counter()
        self.bad_records: Counter = Counter()
        self.formats: dict[str, str] = {}


def _decoded_lines(path: str, stats: ReadStats) -> Iterator[str]:
    """Lines of ``path`` without their line ending; lines that are not valid UTF-8 are skipped and counted."""
    with open(path, "rb") as f:
        first = True
        for raw in f:
            stats.bytes_read += len(raw)
            if first:
                first = False
                if raw.startswith(b"\xef\xbb\xbf"):
                    raw = raw[3:]
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError:
                stats.undecodable[path] += 1
                continue
            yield line.rstrip("\r\n")


def _read_lines(path: str, stats: ReadStats, text_field: str) -> Iterator[str]:
    for line in _decoded_lines(path, stats):
        text = line.strip()
        if text:
            yield text


def _read_paragraphs(path: str, stats: ReadStats, text_field: str) -> Iterator[str]:
    buf: list[str] = []
    for line in _decoded_lines(path, stats):
        text = line.strip()
        if text:
            buf.append(text)
        elif buf:
            yield "\n".join(buf)
            buf = []
    if buf:
        yield "\n".join(buf)


def _read_jsonl(path: str, stats: ReadStats, text_field: str) -> Iterator[str]:
    for line in _decoded_lines(path, stats):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except ValueError:
            stats.bad_records[path] += 1
            continue
        text = rec.get(text_field) if isinstance(rec, dict) else None
        if not isinstance(text, str):
            stats.bad_records[path] += 1
            continue
        text = text.strip()
        if text:
            yield text


def _read_wiki(path: str, stats: ReadStats, text_field: str) -> Iterator[str]:
    buf: list[str] = []
    in_doc = False
    title: Optional[str] = None
    first = True
    for line in _decoded_lines(path, stats):
        text = line.strip()
        if text.startswith("<doc") and _DOC_OPEN.match(text):
            if in_doc and buf:  # previous document never closed: keep what it had
                yield "\n".join(buf)
            m = _DOC_TITLE.search(text)
            title = html.unescape(m.group(1)).strip() if m else None
            buf, in_doc, first = [], True, True
            continue
        if text == "</doc>":
            if in_doc and buf:
                yield "\n".join(buf)
            buf, in_doc = [], False
            continue
        if not in_doc or not text:
            continue
        if first:
            first = False
            if title is not None and text == title:
                continue
        buf.append(text)
    if in_doc and buf:
        yield "\n".join(buf)


_READERS: dict[str, Callable[[str, ReadStats, str], Iterator[str]]] = {
    "lines": _read_lines,
    "paragraphs": _read_paragraphs,
    "jsonl": _read_jsonl,
    "wiki": _read_wiki,
}


def detect_format(path: str, text_field: str = "text") -> str:
    """The ``auto`` rule: extension first, then the first non-blank line (read from the first 64 KiB)."""
    if path.lower().endswith(_JSON_EXTS):
        return "jsonl"
    with open(path, "rb") as f:
        head = f.read(1 << 16)
    for raw in head.splitlines():
        line = raw.decode("utf-8", errors="ignore").lstrip("\ufeff").strip()
        if not line:
            continue
        if line.startswith("<doc") and _DOC_OPEN.match(line):
            return "wiki"
        if line.startswith("{"):
            try:
                if isinstance(json.loads(line), dict):
                    return "jsonl"
            except ValueError:
                pass
        return "lines"
    return "lines"


def iter_documents(files: Sequence[str], format: str = "auto", text_field: str = "text",
                   stats: Optional[ReadStats] = None) -> Iterator[str]:
    """Stream the non-empty documents of ``files`` in order."""
    if format not in FORMATS:
        raise KDError(f"unknown corpus format '{format}' (known: {', '.join(FORMATS)})")
    stats = stats if stats is not None else ReadStats()
    for path in files:
        fmt = detect_format(path, text_field) if format == "auto" else format
        stats.formats[path] = fmt
        yield from _READERS[fmt](path, stats, text_field)


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


def _fsync_dir(path: str) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


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
    tmp = tempfile.mkdtemp(prefix=f".{key}.tmp-", dir=parent)
    os.chmod(tmp, 0o755)  # mkdtemp makes it private; the cache is meant to be shared
    start = time.perf_counter()
    n_docs = n_tokens = n_empty = 0
    try:
        chunks = _chunks(iter_documents(files, format, text_field, stats), stats, CHUNK_DOCS, CHUNK_CHARS)
        bar = tqdm(total=total_bytes, unit="B", unit_scale=True, desc="tokenizing corpus", disable=not progress,
                   mininterval=1.0)
        with open(os.path.join(tmp, "tokens.bin"), "wb") as ft, open(os.path.join(tmp, "offsets.bin"), "wb") as fo:
            fo.write(np.zeros(1, dtype=np.int64).tobytes())
            done = 0
            for (flat, lengths, empty), nbytes in _encoded_chunks(chunks, tokenizer, max_length,
                                                                  spec["separator"], dtype, num_workers):
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
        _fsync_dir(tmp)
        os.replace(tmp, final)
        with open(os.path.join(final, COMPLETE_MARKER), "w") as f:
            f.write(f"{n_docs} documents, {n_tokens} tokens\n")
            f.flush()
            os.fsync(f.fileno())
        _fsync_dir(final)
        _fsync_dir(parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
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
        with open(os.path.join(path, "meta.json")) as f:
            self.meta = json.load(f)
        self.num_documents: int = self.meta["num_documents"]
        self.num_tokens: int = self.meta["num_tokens"]
        self.separator: int = self.meta["separator"]
        self.prefix: list[int] = list(self.meta["prefix"])
        self.suffix: list[int] = list(self.meta["suffix"])
        self.built = False  # True when this process built it (set by build_or_load)
        self._pid: Optional[int] = None
        self._tokens: Optional[np.ndarray] = None
        self._offsets: Optional[np.ndarray] = None

    def _open(self) -> None:
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


class DocumentBlocks(torch.utils.data.Dataset):
    """One document per example, truncated so that with its special tokens it has at most ``max_length`` ids:
    [CLS] doc [SEP] (BERT-like) or [bos] doc eos (others). Variable length: pad per batch (dynamic padding).
    ``lengths`` gives every example's length (for length-grouped batching)."""

    def __init__(self, cache: TokenCache, max_length: int, add_special_tokens: bool = True) -> None:
        self.cache = cache
        self.max_length = int(max_length)
        self.prefix = list(cache.prefix) if add_special_tokens else []
        self.suffix = [cache.separator] if add_special_tokens else []
        self.body = self.max_length - len(self.prefix) - len(self.suffix)
        if self.body < 1:
            raise KDError(f"max_length {max_length} leaves no room for text after the special tokens")

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


# ---------------------------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------------------------
def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m kd_engine.data.corpus",
                                description="Pre-build the token cache of a pretraining corpus and print its stats.")
    p.add_argument("--tokenizer", required=True, help="tokenizer folder, hub id, or offline:<name>")
    p.add_argument("--files", required=True, nargs="+", help="files, directories or globs")
    p.add_argument("--cache_dir", default=None, help="default: $KD_ENGINE_CACHE/corpus (~/.cache/kd_engine/corpus)")
    p.add_argument("--block_size", type=int, default=128, help="only for the block count printed")
    p.add_argument("--format", default="auto", choices=FORMATS)
    p.add_argument("--text_field", default="text")
    p.add_argument("--max_length", type=int, default=None, help="tokens kept per document (default: all)")
    p.add_argument("--num_workers", type=int, default=None)
    p.add_argument("--no_progress", action="store_true")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        from ..models.loading import cache_root, load_tokenizer

        tok = load_tokenizer(args.tokenizer)
        cache_dir = args.cache_dir or os.path.join(cache_root(), "corpus")
        t0 = time.perf_counter()
        cache = build_or_load(args.files, tok, cache_dir, format=args.format, text_field=args.text_field,
                              max_length=args.max_length, num_workers=args.num_workers,
                              progress=not args.no_progress)
        seconds = time.perf_counter() - t0
        blocks = PackedBlocks(cache, args.block_size)
    except KDError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    m = cache.meta
    print(f"cache: {cache.path} ({'built' if cache.built else 'reused'})")
    print(f"files: {len(m['key_fields']['files'])} ({', '.join(sorted(set(m['formats'].values())))})")
    print(f"documents: {cache.num_documents}")
    print(f"tokens: {cache.num_tokens} (incl. one separator per document)")
    print(f"blocks: {len(blocks)} of {args.block_size} tokens")
    print(f"skipped lines (not UTF-8): {m['skipped_undecodable_lines']}")
    print(f"skipped jsonl records: {m['skipped_bad_records']}")
    print(f"seconds: {seconds:.2f}")
    if cache.built:
        print(f"tokens/s: {cache.num_tokens / m['build_seconds']:.0f} ({m['num_workers']} workers)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
