"""Corpus readers: resolve files/dirs/globs, stream documents (lines, paragraphs, jsonl, WikiExtractor), count
undecodable lines and bad records (see ``kd_engine/data/corpus.py`` for the formats)."""
from __future__ import annotations

import glob as globlib
import html
import json
import logging
import os
import re
from collections import Counter
from typing import Callable, Iterator, Optional, Sequence, Union

from ..errors import KDError
from ..input_files import reading

logger = logging.getLogger(__name__)

FORMATS = ("auto", "lines", "paragraphs", "jsonl", "wiki")
_JSON_EXTS = (".jsonl", ".json")
_GLOB_CHARS = re.compile(r"[*?\[]")
_DOC_OPEN = re.compile(r"^<doc(\s[^>]*)?>$")
_DOC_TITLE = re.compile(r'\btitle="([^"]*)"')

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
    with reading("corpus file", path), open(path, "rb") as f:
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
    with reading("corpus file", path), open(path, "rb") as f:
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


