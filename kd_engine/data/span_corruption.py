"""T5 span corruption (Raffel et al. 2020, §3.1.4): the pretraining objective of T5-family models, used by
``--method minillm --pt_objective span_corruption`` for encoder-decoder students.

A fraction ``noise_density`` of the tokens, in spans of mean length ``mean_span_length``, is removed from the
input; each removed span is replaced by one sentinel (``<extra_id_0>``, ``<extra_id_1>``, ...), and the target lists
every sentinel followed by the tokens it replaced:

    ids      a b c d e f g h
    inputs   a <X0> d e <X1> h </s>
    targets  <X0> b c <X1> f g </s>

Span lengths follow T5's ``random_spans_noise_mask``: the noise and non-noise tokens are each split into the same
number of non-empty segments uniformly at random and interleaved, non-noise first.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch

from ..errors import KDError


def _segment_lengths(n_items: int, n_segments: int, generator: torch.Generator) -> list[int]:
    """Split ``n_items`` into ``n_segments`` non-empty parts, uniformly among such splits."""
    cuts = torch.randperm(n_items - 1, generator=generator)[:n_segments - 1].sort().values.tolist()
    bounds = [0] + [c + 1 for c in cuts] + [n_items]
    return [b - a for a, b in zip(bounds[:-1], bounds[1:])]


def noise_mask(length: int, noise_density: float = 0.15, mean_span_length: float = 3.0,
               generator: Optional[torch.Generator] = None) -> list[bool]:
    """True at the positions to corrupt; at least one noise and one kept token when ``length >= 2``."""
    if length < 2:
        return [False] * length
    n_noise = min(max(int(round(length * noise_density)), 1), length - 1)
    n_spans = max(int(round(n_noise / mean_span_length)), 1)
    n_spans = min(n_spans, n_noise, length - n_noise)
    g = generator if generator is not None else torch.Generator().manual_seed(0)
    noise = _segment_lengths(n_noise, n_spans, g)
    keep = _segment_lengths(length - n_noise, n_spans, g)
    mask: list[bool] = []
    for k, n in zip(keep, noise):
        mask += [False] * k + [True] * n
    return mask


def sentinel_ids(tokenizer, n: Optional[int] = None) -> list[int]:
    """Ids of ``<extra_id_0>`` .. ``<extra_id_{n-1}>`` (``n=None``: every one the tokenizer has, T5: 100); a clear
    error when the tokenizer has fewer than ``n`` (or none)."""
    ids: list[int] = []
    while n is None or len(ids) < n:
        tid = tokenizer.convert_tokens_to_ids(f"<extra_id_{len(ids)}>")
        if tid is None or tid == tokenizer.unk_token_id:
            if n is None and ids:
                break
            raise KDError(f"span corruption needs sentinel tokens <extra_id_0>.. in the tokenizer; "
                          f"<extra_id_{len(ids)}> is missing (T5 tokenizers have 100; or use --pt_objective prefix_lm)")
        ids.append(tid)
    return ids


def span_corrupt(ids: Sequence[int], sentinels: Sequence[int], eos_id: Optional[int], noise_density: float = 0.15,
                 mean_span_length: float = 3.0, generator: Optional[torch.Generator] = None
                 ) -> tuple[list[int], list[int]]:
    """(encoder inputs, decoder targets) for one tokenized text. A trailing EOS in ``ids`` is kept out of the
    corruption and ends both sequences; spans beyond the available sentinels stay in the input uncorrupted."""
    ids = list(ids)
    if eos_id is not None and ids and ids[-1] == eos_id:
        ids = ids[:-1]
    mask = noise_mask(len(ids), noise_density, mean_span_length, generator)
    inputs: list[int] = []
    targets: list[int] = []
    span = -1
    for i, (tok, noisy) in enumerate(zip(ids, mask)):
        starts = noisy and (i == 0 or not mask[i - 1])
        if starts:
            span += 1
        if noisy and span < len(sentinels):
            if starts:
                inputs.append(sentinels[span])
                targets.append(sentinels[span])
            targets.append(tok)
        else:
            inputs.append(tok)
    end = [eos_id] if eos_id is not None else []
    return inputs + end, targets + end
