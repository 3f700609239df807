"""Sentence(-pair) regression data (STS-B style: a float score per row) for one-output classifiers.

The shared tokenizer maps labels to class ids; here the label column is read as floats instead, and the rows
without text are dropped first (the same rule as ``tokenize_dataset``) so that scores and token rows stay aligned.
"""
from __future__ import annotations

import hashlib
import math

from ..dist import main_process_first
from ..errors import KDError
from .bundle import DataBundle
from .collate import PadCollator
from .files import require_columns
from .split import load_split_tables
from .tokenize import _is_blank, tokenize_dataset


def _scores(ds, column: str, name: str) -> list[float]:
    out = []
    for v in ds[column]:
        try:
            f = float(v)
        except (TypeError, ValueError):
            f = math.nan
        if not math.isfinite(f):
            raise KDError(f"{name}: label {v!r} in column '{column}' is not a number (a one-output regression "
                          "teacher needs numeric scores)")
        out.append(f)
    return out


def _encode(ds, cfg, tokenizer, name: str):
    from .supervised import _cache_dir

    text_cols = [c for c in (cfg.text_column, cfg.text_pair_column) if c]
    require_columns(ds, text_cols + [cfg.label_column], name)
    key = hashlib.sha256(f"{ds._fingerprint}-regression-nonblank-{text_cols}".encode()).hexdigest()[:32]
    ds = ds.filter(lambda r: not any(_is_blank(r[c]) for c in text_cols), new_fingerprint=key)
    if len(ds) == 0:
        raise KDError(f"{name}: no rows with text")
    scores = _scores(ds, cfg.label_column, name)
    enc = tokenize_dataset(ds, tokenizer, text_column=cfg.text_column, text_pair_column=cfg.text_pair_column,
                           label_column=None, max_length=cfg.max_length, cache_dir=_cache_dir(), name=name)
    return enc.add_column("labels", scores)


def build_regression_data(cfg, tokenizer) -> DataBundle:
    """Train / eval rows by the one split rule (``data/split.py``), then scores + tokens per split."""
    if not cfg.train_file:
        raise KDError("no training data: pass --train_file PATH")
    if not cfg.label_column:
        raise KDError("regression needs --label_column (the column holding the scores)")
    train_raw, eval_raw = load_split_tables(cfg)
    with main_process_first():  # rank 0 tokenizes into the cache, the other ranks load it
        train = _encode(train_raw, cfg, tokenizer, cfg.train_file)
        ev = _encode(eval_raw, cfg, tokenizer, cfg.eval_file or cfg.train_file) if eval_raw is not None else None
    return DataBundle(train=train, eval=ev, collate_fn=PadCollator(tokenizer.pad_token_id, padding_side="right"),
                      train_lengths=list(train["length"]),
                      info={"train_examples": len(train), "eval_examples": len(ev) if ev is not None else 0})
