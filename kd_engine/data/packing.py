"""Packing for causal LMs (``--packing true``): several tokenized examples per row, no attention across them.

A packed row is the concatenation of whole examples (none is split) up to ``max_length`` tokens, with
``position_ids`` restarting at 0 for each example and no ``attention_mask``: transformers then builds the
attention from the position ids alone (``masking_utils.find_packed_sequence_indices``): a block-diagonal causal
mask for sdpa / eager, the varlen kernel for flash_attention_2. The first token of each example gets label -100,
so that no example is predicted from the one before it: every example's loss terms are those it has alone.

- ``pack_bins``: which examples share a row, best-fit decreasing (deterministic: ties by index).
- ``PackedDataset``: the rows, read lazily from the tokenized dataset (nothing copied up front).
- ``PackedCollator``: rows -> ``input_ids`` / ``labels`` / ``position_ids`` / ``token_mask`` (real tokens, for
  counting only; never given to a model). Rows shorter than the longest of the batch end in a padding segment of
  its own (pad tokens, positions from 0, labels -100), which attends only to itself.
- ``pack_examples``: the same for a list of examples at collate time (``seqkd``, whose responses exist only once the
  teacher has answered, packs each micro-batch's examples this way).
"""
from __future__ import annotations

import bisect
from typing import Optional

import torch

from .collate import _to_tensor


def pack_bins(lengths: list[int], capacity: int) -> list[list[int]]:
    """Example indices grouped into rows of at most ``capacity`` tokens: best-fit decreasing, each row's indices in
    ascending order, rows ordered by their first index."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    free: list[tuple[int, int]] = []  # (space left, bin id), sorted
    bins: list[list[int]] = []
    for i in order:
        n = min(int(lengths[i]), capacity)
        k = bisect.bisect_left(free, (n, -1))
        if k < len(free):
            space, b = free.pop(k)
        else:
            space, b = capacity, len(bins)
            bins.append([])
        bins[b].append(i)
        if space - n > 0:
            bisect.insort(free, (space - n, b))
    rows = [sorted(b) for b in bins]
    rows.sort(key=lambda b: b[0])
    return rows


def concat_examples(examples: list[dict]) -> dict:
    """One packed row from whole examples (``input_ids`` and ``labels`` lists)."""
    ids, labels, pos = [], [], []
    for ex in examples:
        x = list(ex["input_ids"])
        y = list(ex["labels"])
        if y:
            y[0] = -100  # never predicted from the previous example's last token
        ids += x
        labels += y
        pos += range(len(x))
    return {"input_ids": ids, "labels": labels, "position_ids": pos, "length": len(ids)}


class PackedDataset:
    """Packed rows over a tokenized ``datasets.Dataset`` (``input_ids``, ``labels``); a row is read when asked."""

    def __init__(self, base, max_length: int):
        self.base = base
        lengths = base.with_format("arrow")["length"].to_pylist() if hasattr(base, "with_format") else \
            [len(r["input_ids"]) for r in base]
        self.bins = pack_bins(lengths, max_length)
        self.lengths = [sum(lengths[i] for i in b) for b in self.bins]
        self.examples = len(lengths)

    def __len__(self) -> int:
        return len(self.bins)

    def __getitem__(self, i: int) -> dict:
        idx = self.bins[i]
        cols = self.base[idx]
        return concat_examples([{"input_ids": cols["input_ids"][j], "labels": cols["labels"][j]}
                                for j in range(len(idx))])


def pack_examples(examples: list[dict], capacity: int) -> list[dict]:
    """A batch's examples packed into as few rows of ``capacity`` tokens as best-fit finds (collate-time packing)."""
    bins = pack_bins([len(ex["input_ids"]) for ex in examples], capacity)
    return [concat_examples([examples[i] for i in b]) for b in bins]


class PackedCollator:
    """Packed rows -> tensors, padded to the batch's longest row with a padding segment of their own."""

    def __init__(self, pad_token_id: int, pack_capacity: Optional[int] = None):
        if pad_token_id is None:
            raise ValueError("pad_token_id is None: set tokenizer.pad_token first")
        self.pad = int(pad_token_id)
        self.pack_capacity = pack_capacity  # set: pack the examples of each batch here (collate-time packing)

    def __call__(self, rows: list[dict]) -> dict[str, torch.Tensor]:
        if self.pack_capacity is not None:
            rows = pack_examples(rows, self.pack_capacity)
        longest = max(len(r["input_ids"]) for r in rows)
        ids, labels, pos, mask = [], [], [], []
        for r in rows:
            n = len(r["input_ids"])
            gap = longest - n
            ids.append(list(r["input_ids"]) + [self.pad] * gap)
            labels.append(list(r["labels"]) + [-100] * gap)
            pos.append(list(r.get("position_ids", range(n))) + list(range(gap)))
            mask.append([1] * n + [0] * gap)
        return {"input_ids": _to_tensor(ids), "labels": _to_tensor(labels), "position_ids": _to_tensor(pos),
                "token_mask": _to_tensor(mask)}
