"""Load a training / evaluation table from a local file (txt, jsonl, json, csv, tsv) or a hub id.

Local files go through ``datasets.load_dataset`` ("text" / "json" / "csv" builders); every bad input is a
``KDError`` naming the file: missing, empty, not UTF-8 (with the line of the first bad byte), unknown extension,
unparsable records.
"""
from __future__ import annotations

import csv
import json
import logging
import os
import re
from typing import Optional, Sequence

from ..errors import KDError
from ..input_files import reading

logger = logging.getLogger(__name__)

TEXT_EXTS = (".txt", ".raw")
JSON_EXTS = (".jsonl", ".json")
CSV_EXTS = (".csv", ".tsv")
KNOWN_EXTS = TEXT_EXTS + JSON_EXTS + CSV_EXTS

# "name" or "org/name" (letters, digits, - _ .), as on the Hugging Face hub
_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]*(/[A-Za-z0-9][A-Za-z0-9_.\-]*)?$")


def _looks_like_hub_id(path: str) -> bool:
    if not _HUB_ID.match(path) or path.endswith(KNOWN_EXTS) or path.startswith("."):
        return False
    return True


def _check_utf8(path: str) -> None:
    """KDError naming the file and line of the first byte that is not UTF-8."""
    with reading("data file", f"'{path}'"), open(path, "rb") as f:
        for lineno, line in enumerate(f, 1):
            try:
                line.decode("utf-8")
            except UnicodeDecodeError as e:
                raise KDError(
                    f"data file '{path}' is not UTF-8: line {lineno}, byte {e.start + 1} of that line "
                    f"(0x{line[e.start]:02x}); re-encode it as UTF-8 (e.g. iconv -f latin1 -t utf-8)"
                ) from None


def _first_bad_json_line(path: str) -> Optional[str]:
    with reading("data file", f"'{path}'"), open(path, encoding="utf-8-sig") as f:
        head = f.read(4096).lstrip()
        f.seek(0)
        if head.startswith("["):  # one JSON document (a list of records)
            try:
                json.load(f)
            except json.JSONDecodeError as e:
                return f"line {e.lineno}, column {e.colno}: {e.msg}"
            return None
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                return f"line {lineno}: {e.msg}"
            if not isinstance(rec, dict):
                return f"line {lineno}: expected a JSON object, got {type(rec).__name__}"
    return None


def _count_nonblank_lines(path: str, limit: int) -> int:
    n = 0
    with reading("data file", f"'{path}'"), open(path, encoding="utf-8") as f:
        for line in f:
            n += bool(line.strip())
            if n >= limit:
                break
    return n


def _has_bom(path: str) -> bool:
    with reading("data file", f"'{path}'"), open(path, "rb") as f:
        return f.read(3) == b"\xef\xbb\xbf"


def _load_local(path: str, ext: str, column_names: Optional[Sequence[str]]):
    import datasets

    encoding = "utf-8-sig" if _has_bom(path) else "utf-8"  # a BOM must not end up in the first column name
    if ext in TEXT_EXTS:
        builder, kwargs = "text", dict(encoding=encoding)
    elif ext in JSON_EXTS:
        builder, kwargs = "json", {}
    else:
        builder = "csv"
        kwargs = dict(keep_default_na=False, encoding=encoding)  # "NA", "null", "None" in a text column stay text
        if ext == ".tsv":
            kwargs.update(delimiter="\t", quoting=csv.QUOTE_NONE)  # GLUE style: quotes are plain characters
        if column_names is not None:
            kwargs.update(column_names=list(column_names), header=None)
    with reading("data file", f"'{path}'", explain=lambda e: _parse_error(path, ext, column_names, e)):
        return datasets.load_dataset(builder, data_files=path, split="train", **kwargs)


def _parse_error(path: str, ext: str, column_names: Optional[Sequence[str]], e: Exception) -> str:
    """The message for a local file ``datasets`` could not parse (it wraps parser errors in DatasetGenerationError)."""
    header_lines = 1 if ext in CSV_EXTS and column_names is None else 0
    if _count_nonblank_lines(path, header_lines + 1) <= header_lines:
        return f"data file '{path}' has no rows (only blank lines or a header?)"
    detail = _first_bad_json_line(path) if ext in JSON_EXTS else None
    cause = e.__cause__ or e
    return f"could not parse data file '{path}': {detail or f'{type(cause).__name__}: {cause}'}"


def load_table(path: str, *, split: str = "train", column_names: Optional[Sequence[str]] = None):
    """Load ``path`` as a ``datasets.Dataset``.

    - ``.txt`` / ``.raw``: one example per line in column ``text``; blank lines are skipped (counted, warned).
    - ``.jsonl`` / ``.json``: one record per line (or a JSON list of records).
    - ``.csv``: header row; ``.tsv``: tab-separated with a header row, quoting off (GLUE style).
      ``column_names`` names the columns of a csv/tsv file that has no header row (e.g. AG News).
    - anything else that is not a local path but looks like a hub id (``name`` or ``org/name``):
      ``datasets.load_dataset(id, split=split)``.
    """
    if not isinstance(path, str) or not path:
        raise KDError(f"data file must be a path or a hub dataset id, got {path!r}")
    if not os.path.exists(path):
        if _looks_like_hub_id(path):
            return _load_hub(path, split)
        raise KDError(f"data file '{path}' does not exist")
    if os.path.isdir(path):
        raise KDError(f"data file '{path}' is a directory; give a .txt, .jsonl, .json, .csv or .tsv file")
    ext = os.path.splitext(path)[1].lower()
    if ext not in KNOWN_EXTS:
        raise KDError(
            f"data file '{path}' has an unknown extension '{ext or '(none)'}'; "
            f"expected one of {', '.join(KNOWN_EXTS)}"
        )
    if os.path.getsize(path) == 0:
        raise KDError(f"data file '{path}' is empty")
    _check_utf8(path)
    if column_names is not None and ext not in CSV_EXTS:
        raise KDError(f"column_names only applies to .csv/.tsv files, not '{path}'")

    ds = _load_local(path, ext, column_names)

    if ext in TEXT_EXTS:
        n_before = len(ds)
        ds = ds.filter(lambda batch: [bool(t.strip()) for t in batch["text"]], batched=True)
        n_blank = n_before - len(ds)
        if n_blank:
            logger.warning("%s: skipped %d blank line(s) of %d", path, n_blank, n_before)
    if len(ds) == 0:
        raise KDError(f"data file '{path}' has no rows (only blank lines or a header?)")
    return ds


def _load_hub(name: str, split: str):
    import datasets

    with reading("hub dataset", name, explain=lambda e: (
            f"could not load dataset '{name}' from the hub (offline?), and no local file of that name exists: "
            f"{type(e).__name__}: {' '.join(str(e).split())[:300]}")):
        return datasets.load_dataset(name, split=split)


def require_columns(ds, columns: Sequence[Optional[str]], path: str) -> None:
    """KDError listing the available columns when any of ``columns`` (None entries ignored) is missing."""
    have = list(ds.column_names)
    missing = [c for c in columns if c is not None and c not in have]
    if missing:
        raise KDError(
            f"data file '{path}' has no column{'s' if len(missing) > 1 else ''} "
            f"{', '.join(repr(c) for c in missing)}; available columns: {', '.join(repr(c) for c in have)}"
        )
