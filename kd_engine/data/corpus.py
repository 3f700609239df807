"""Pretraining corpora far bigger than RAM: stream text files, tokenize once into a memory-mapped cache, pack.

Usage::

    cache = build_or_load(["corpus/*.txt"], tokenizer, cache_dir, rank=rank, world_size=world_size,
                          barrier=torch.distributed.barrier)
    train = PackedBlocks(cache, block_size=128)      # map-style Dataset, O(1) __getitem__ from the memmap
    train = DocumentBlocks(cache, max_length=512)    # or: one (truncated) document per example
    train = DocumentChunks(cache, max_length=512)    # or: every document in blocks, none crossing a boundary

Modules: ``corpus_read`` (files and readers), ``corpus_encode`` (tokenization, worker processes),
``corpus_cache`` (the keyed memory-mapped cache), ``blocks`` (the datasets); this module re-exports them and is
the command line (``python -m kd_engine.data.corpus``).

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
import logging
import sys
import time
from typing import Optional, Sequence

from ..errors import KDError

logger = logging.getLogger(__name__)

from .blocks import DocumentBlocks, DocumentChunks, PackedBlocks  # noqa: F401
from .corpus_cache import COMPLETE_MARKER, TokenCache, build_or_load  # noqa: F401
from .corpus_encode import encode_chunk, special_ids  # noqa: F401
from .corpus_read import FORMATS, ReadStats, detect_format, iter_documents, resolve_files  # noqa: F401

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
        from ..model_files import load_tokenizer
        from ..paths import cache_dir as default_cache_dir

        tok = load_tokenizer(args.tokenizer)
        cache_dir = args.cache_dir or default_cache_dir("corpus")
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
