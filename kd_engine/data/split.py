"""One rule for evaluation splits and data limits, used by every method.

- ``--eval_file`` given: training rows come from ``--train_file``, evaluation rows from the eval file.
- else ``--eval_split F`` > 0: a deterministic hold-out of the training rows: the first ``ceil(F x n)`` of a
  permutation seeded with ``--split_seed`` (default ``--seed``; the same rows on every rank and in every run with
  that seed, so a fixed ``--split_seed`` keeps one dev set across training seeds); the rest train, in their
  original order.
- then the limits, always after the split: the first ``--max_train_samples`` training rows, the first
  ``--max_eval_samples`` evaluation rows.

A method whose data cannot follow an option says so in ``Method.data_options``; ``check_data_options`` turns a use
of any other option into a clear error instead of ignoring it.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable, Optional

import torch

from ..errors import ConfigError, KDError
from .files import load_table

DATA_OPTIONS = ("eval_file", "eval_split", "max_train_samples", "max_eval_samples")


@dataclass(frozen=True)
class Split:
    train: list[int]  # indices into the training rows
    eval: Optional[list[int]]  # indices into the eval file's rows, or into the training rows (held out); None: none
    held_out: bool  # eval indexes the training rows


def split_rows(cfg, n_train: int, n_eval_file: Optional[int] = None) -> Split:
    """Training / evaluation row indices under the rule above (``n_eval_file``: rows of ``--eval_file``)."""
    if n_train < 1:
        raise KDError("the training data is empty")
    held_out = False
    if n_eval_file is not None:
        train, ev = list(range(n_train)), list(range(n_eval_file))
    elif cfg.eval_split > 0:
        n_ev = math.ceil(cfg.eval_split * n_train)
        if n_ev >= n_train:
            raise KDError(f"eval_split {cfg.eval_split} of {n_train} training rows leaves none to train on")
        seed = cfg.seed if getattr(cfg, "split_seed", None) is None else cfg.split_seed
        perm = torch.randperm(n_train, generator=torch.Generator().manual_seed(seed)).tolist()
        ev, train, held_out = perm[:n_ev], sorted(perm[n_ev:]), True
    else:
        train, ev = list(range(n_train)), None
    if cfg.max_train_samples is not None:
        train = train[:cfg.max_train_samples]
    if ev is not None and cfg.max_eval_samples is not None:
        ev = ev[:cfg.max_eval_samples]
    return Split(train, ev, held_out)


def take_rows(ds, idx: list[int]):
    """The rows ``idx`` of a ``datasets.Dataset`` (the dataset itself when that is all of it, in order)."""
    return ds if idx == list(range(len(ds))) else ds.select(idx)


def load_split_tables(cfg):
    """``--train_file`` and ``--eval_file`` read as tables and cut by the rule above: (training rows, evaluation
    rows or None), both ``datasets.Dataset``."""
    train_raw = load_table(cfg.train_file)
    eval_raw = load_table(cfg.eval_file, split="validation") if cfg.eval_file else None
    rows = split_rows(cfg, len(train_raw), len(eval_raw) if eval_raw is not None else None)
    if rows.eval is not None:
        eval_raw = take_rows(train_raw if rows.held_out else eval_raw, rows.eval)
    return take_rows(train_raw, rows.train), eval_raw


def _set(cfg, key: str) -> bool:
    v = getattr(cfg, key)
    return v not in (None, 0, 0.0, "")


def check_data_options(cfg, method_name: str, supported: Iterable[str]) -> None:
    """Error for a data option the method cannot honour; also for options that exclude each other."""
    supported = set(supported)
    for key in DATA_OPTIONS:
        if _set(cfg, key) and key not in supported:
            raise ConfigError(f"method '{method_name}' does not support --{key} "
                              f"(it supports: {', '.join(k for k in DATA_OPTIONS if k in supported) or 'none'})")
    if cfg.eval_file and cfg.eval_split > 0:
        raise ConfigError("--eval_file and --eval_split exclude each other: evaluate on the file or on a held-out "
                          "share of the training data, not both")
    for key in ("max_train_samples", "max_eval_samples"):
        if getattr(cfg, key) is not None and getattr(cfg, key) < 1:
            raise ConfigError(f"{key} must be >= 1; got {getattr(cfg, key)}")
