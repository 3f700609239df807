"""Tokenize a table for classification or causal LM, with truncation, no padding, and an on-disk cache.

The cache file is ``<cache_dir>/tok-<hash>.arrow``; the hash covers the tokenizer (name_or_path, vocab size,
class), the dataset fingerprint and every option, so a second identical call loads the file instead of
re-running the tokenizer.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
from typing import Any, Optional

from ..errors import KDError
from .files import require_columns

logger = logging.getLogger(__name__)

_CACHE_VERSION = 1  # bump when the produced columns change
TASKS = ("classification", "causal_lm")


def _is_blank(x: Any) -> bool:
    return x is None or (isinstance(x, str) and not x.strip())


def _has_blank(ds, column: str) -> bool:
    """Whether ``column`` has a None or whitespace-only value (vectorised in Arrow; iterating is slow)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    arr = ds.with_format("arrow")[column]
    if arr.null_count:
        return True
    if not (pa.types.is_string(arr.type) or pa.types.is_large_string(arr.type)):
        raise KDError(f"text column '{column}' holds {arr.type} values, not text")
    return bool(pc.any(pc.equal(pc.utf8_trim_whitespace(arr), "")).as_py())


def _label_map(values: list, label2id: Optional[dict], column: str) -> dict:
    """Map every distinct raw label value to an int id; KDError naming the first unknown one."""
    lowered = {str(k).strip().lower(): int(v) for k, v in (label2id or {}).items()}
    valid_ids = set(lowered.values()) if label2id else None
    out = {}
    for v in values:
        if v is None:
            raise KDError(f"label column '{column}' has an empty label")
        if isinstance(v, bool):
            i = int(v)
        elif isinstance(v, int):
            i = v
        elif isinstance(v, float) and v.is_integer():
            i = int(v)
        elif isinstance(v, str) and v.strip().lower() in lowered:
            i = lowered[v.strip().lower()]
        elif isinstance(v, str) and v.strip().lstrip("-").isdigit():
            i = int(v.strip())
        else:
            known = f"; known labels: {', '.join(map(str, label2id))}" if label2id else ""
            raise KDError(f"unknown label {v!r} in column '{column}'{known}")
        if i < 0 or (valid_ids is not None and i not in valid_ids):
            known = f"; known label ids: {sorted(valid_ids)}" if valid_ids is not None else ""
            raise KDError(f"unknown label {v!r} in column '{column}' (id {i}){known}")
        out[v] = i
    return out


def _cache_key(ds, tokenizer, options: dict) -> str:
    tok_id = {
        "name_or_path": str(getattr(tokenizer, "name_or_path", "")),
        "vocab": len(tokenizer),
        "class": type(tokenizer).__name__,
        "truncation_side": getattr(tokenizer, "truncation_side", None),
    }
    blob = json.dumps(
        {"v": _CACHE_VERSION, "tok": tok_id, "ds": ds._fingerprint, "n": len(ds), "opts": options},
        sort_keys=True,
        default=str,
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:32]


def tokenize_dataset(
    ds,
    tokenizer,
    *,
    text_column: str,
    text_pair_column: Optional[str] = None,
    label_column: Optional[str] = None,
    label2id: Optional[dict] = None,
    max_length: int,
    task: str = "classification",
    cache_dir: Optional[str] = None,
    name: Optional[str] = None,
):
    """Tokenize ``ds`` (a ``datasets.Dataset``) into ``input_ids``, ``attention_mask`` (+ ``token_type_ids``
    when the tokenizer makes them for classification), ``labels`` and ``length``. Rows with an empty or missing
    text are dropped (counted, warned). No padding: the collator pads each batch.

    classification: ``labels`` is an int (strings go through ``label2id`` case-insensitively, numeric strings
    become ints); no ``labels`` when ``label_column`` is None. causal_lm: ``labels`` = ``input_ids``.
    ``name`` (e.g. the data file's path) is used in error messages.
    """
    if task not in TASKS:
        raise KDError(f"unknown task '{task}'; expected one of {', '.join(TASKS)}")
    if max_length is None or int(max_length) < 1:
        raise KDError(f"max_length must be a positive integer, got {max_length!r}")
    max_length = int(max_length)
    where = f"data file '{name}'" if name else "dataset"
    require_columns(ds, [text_column, text_pair_column, label_column if task == "classification" else None],
                    name or "(in-memory dataset)")

    # drop rows without text
    text_cols = [c for c in (text_column, text_pair_column) if c is not None]
    n_before = len(ds)
    if any(_has_blank(ds, c) for c in text_cols):
        ds = ds.filter(
            lambda b: [not any(_is_blank(b[c][i]) for c in text_cols) for i in range(len(b[text_cols[0]]))],
            batched=True,
            new_fingerprint=hashlib.sha256(f"{ds._fingerprint}-dropblank-{text_cols}".encode()).hexdigest()[:32],
        )
        dropped = n_before - len(ds)
        logger.warning("%s: dropped %d of %d row(s) with an empty text in column(s) %s", where, dropped, n_before,
                       ", ".join(text_cols))
    if len(ds) == 0:
        raise KDError(f"{where}: no rows left after dropping empty texts in column(s) {', '.join(text_cols)}")

    label_map = None
    if task == "classification" and label_column is not None:
        label_map = _label_map(ds.unique(label_column), label2id, label_column)

    options = {
        "text_column": text_column,
        "text_pair_column": text_pair_column,
        "label_column": label_column,
        "label_map": sorted((repr(k), v) for k, v in label_map.items()) if label_map else None,
        "max_length": max_length,
        "task": task,
    }
    key = _cache_key(ds, tokenizer, options)

    def encode(batch: dict) -> dict:
        pair = batch[text_pair_column] if text_pair_column else None
        kwargs = dict(truncation=True, max_length=max_length, padding=False)
        if task == "causal_lm":
            kwargs["return_token_type_ids"] = False
        texts = batch[text_column]
        enc = tokenizer(texts, pair, **kwargs) if pair is not None else tokenizer(texts, **kwargs)
        out = {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}
        if task == "classification" and "token_type_ids" in enc:
            out["token_type_ids"] = enc["token_type_ids"]
        if task == "causal_lm":
            out["labels"] = [list(ids) for ids in enc["input_ids"]]
        elif label_map is not None:
            out["labels"] = [label_map[v] for v in batch[label_column]]
        out["length"] = [len(ids) for ids in enc["input_ids"]]
        return out

    map_kwargs: dict = dict(batched=True, batch_size=1000, remove_columns=ds.column_names, new_fingerprint=key,
                            desc="tokenizing")
    if cache_dir is not None:
        os.makedirs(cache_dir, exist_ok=True)
        map_kwargs.update(cache_file_name=os.path.join(cache_dir, f"tok-{key}.arrow"), load_from_cache_file=True)
    return ds.map(encode, **map_kwargs)

