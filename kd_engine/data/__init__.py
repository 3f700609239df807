"""Data pipeline: load local files / hub data sets, tokenize with caching, pad dynamically, sample batches."""
from .collate import PadCollator
from .files import load_table, require_columns
from .sampler import ResumableBatchSampler, infinite_batches
from .tokenize import tokenize_dataset

__all__ = ["PadCollator", "ResumableBatchSampler", "infinite_batches", "load_table", "require_columns",
           "tokenize_dataset"]
