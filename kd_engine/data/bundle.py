"""What a method's ``build_data`` returns: the training (and evaluation) examples and how to batch them."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Optional


@dataclass
class DataBundle:
    train: Any  # a map-style dataset (len + __getitem__ -> dict of python lists / ints)
    eval: Any = None
    collate_fn: Optional[Callable] = None  # list of examples -> dict of tensors (dynamic padding)
    train_lengths: Optional[list[int]] = None  # token lengths for length-grouped batching
    info: dict = field(default_factory=dict)  # counts to report (skipped lines, truncated prompts ...)
