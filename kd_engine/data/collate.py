"""Dynamic padding: a list of tokenized examples -> a dict of tensors padded to the longest in the batch."""
from __future__ import annotations

import math
import numbers
from typing import Any, Optional

import torch
from torch.nn.utils.rnn import pad_sequence

DROP_KEYS = ("length",)


class PadCollator:
    """Pad per-token lists, stack scalars, drop what cannot become a tensor.

    Per-token lists (one list per example, lengths may differ) are padded to the batch maximum, rounded up to
    ``pad_to_multiple_of``, on ``padding_side``: keys ending in ``input_ids`` with ``pad_token_id``, keys
    ending in ``labels`` with ``label_pad_id`` (-100), everything else (``attention_mask``,
    ``token_type_ids``, ...) with 0. Float lists of equal length K (``soft_labels``, or soft ``labels``) become
    ``FloatTensor[B, K]``. Int / float / bool scalars become ``LongTensor[B]`` / ``FloatTensor[B]`` /
    ``BoolTensor[B]``. Strings, None and ``length`` are dropped.
    """

    def __init__(self, pad_token_id: int, *, label_pad_id: int = -100, pad_to_multiple_of: Optional[int] = None,
                 padding_side: str = "right"):
        if pad_token_id is None:
            raise ValueError("pad_token_id is None: set tokenizer.pad_token (e.g. to the EOS token) first")
        if padding_side not in ("left", "right"):
            raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
        if pad_to_multiple_of is not None and pad_to_multiple_of < 1:
            raise ValueError(f"pad_to_multiple_of must be >= 1, got {pad_to_multiple_of}")
        self.pad_token_id = int(pad_token_id)
        self.label_pad_id = int(label_pad_id)
        self.pad_to_multiple_of = pad_to_multiple_of
        self.padding_side = padding_side

    def pad_value(self, key: str) -> int:
        if key.endswith("input_ids"):
            return self.pad_token_id
        if key.endswith("labels"):
            return self.label_pad_id
        return 0

    def __call__(self, examples: list[dict]) -> dict[str, torch.Tensor]:
        if not examples:
            raise ValueError("PadCollator got an empty batch")
        keys = list(examples[0].keys())
        for ex in examples[1:]:
            if set(ex.keys()) != set(keys):
                raise ValueError(f"examples in one batch have different keys: {sorted(keys)} vs {sorted(ex.keys())}")
        batch: dict[str, torch.Tensor] = {}
        for key in keys:
            if key in DROP_KEYS:
                continue
            t = self._collate_key(key, [_plain(ex[key]) for ex in examples])
            if t is not None:
                batch[key] = t
        return batch

    def _collate_key(self, key: str, values: list[Any]) -> Optional[torch.Tensor]:
        first = values[0]
        if isinstance(first, bool) and all(isinstance(v, bool) for v in values):
            return torch.tensor(values, dtype=torch.bool)
        if all(isinstance(v, numbers.Integral) and not isinstance(v, bool) for v in values):
            return torch.tensor(values, dtype=torch.long)
        if all(isinstance(v, numbers.Real) and not isinstance(v, bool) for v in values):
            return torch.tensor(values, dtype=torch.float32)
        if not all(isinstance(v, list) for v in values):
            return None  # strings, None, mixed: not tensorisable
        flat = [x for v in values for x in v]
        if all(isinstance(x, numbers.Integral) and not isinstance(x, bool) for x in flat):
            return self._pad(key, values)
        if all(isinstance(x, numbers.Real) for x in flat):
            if len({len(v) for v in values}) == 1:  # soft labels / per-example vectors [B, K]
                return torch.tensor(values, dtype=torch.float32)
            return None
        try:  # nested rectangular lists of equal shape (e.g. [B, T, K])
            return torch.tensor(values)
        except (TypeError, ValueError, RuntimeError):
            return None

    def _pad(self, key: str, values: list[list[int]]) -> torch.Tensor:
        seqs = [torch.tensor(v, dtype=torch.long) for v in values]
        value = self.pad_value(key)
        out = pad_sequence(seqs, batch_first=True, padding_value=value, padding_side=self.padding_side)
        m = self.pad_to_multiple_of
        if m and out.shape[1] % m:
            extra = m * math.ceil(out.shape[1] / m) - out.shape[1]
            pad = (extra, 0) if self.padding_side == "left" else (0, extra)
            out = torch.nn.functional.pad(out, pad, value=value)
        return out


def _plain(v: Any) -> Any:
    """Tensors / numpy values -> Python scalars or lists."""
    if hasattr(v, "tolist") and not isinstance(v, (list, str)):
        return v.tolist()
    return v
