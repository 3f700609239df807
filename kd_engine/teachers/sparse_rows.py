"""A teacher's sparse targets for one micro-batch, in the offline cache's row format.

One function for both producers of sparse targets, so that they cannot drift apart: the offline cache builder
(``python -m kd_engine.teacher_cache``) and the online teacher service (``--teacher_ranks``). For every real target
token: the teacher's top-k ids and log-probabilities at the temperature, the log of the mass outside the top k, and
optionally ``tail_samples`` draws from the tail, seeded per example by its content hash and the seed (the same
draws whatever the rank, order, epoch or resume point). Layout: ``teacher_cache_store``.
"""
from __future__ import annotations

import torch

from .. import teacher_cache_store as store
from ..losses.kd import shift_for_causal_lm
from ..losses.sparse_kd import sample_tail, teacher_rows


def teacher_inputs(model, batch: dict, task: str) -> dict:
    from ..methods._supervised import model_inputs, seq2seq_inputs

    return seq2seq_inputs(model, batch) if task == "seq2seq_lm" else model_inputs(batch)


def target_labels(labels: torch.Tensor, task: str) -> torch.Tensor:
    """Labels aligned with the rows that get targets (causal LMs predict the next token: shifted by one)."""
    return labels[:, 1:] if task == "causal_lm" else labels


@torch.no_grad()
def forward_logits(teacher, model, batch: dict, task: str) -> torch.Tensor:
    """The teacher's logits for ``batch`` (``model``: the module whose config gives seq2seq decoder inputs)."""
    return teacher(**teacher_inputs(model, batch, task)).logits


@torch.no_grad()
def rows_from_logits(logits: torch.Tensor, batch: dict, task: str, top_k: int, temperature: float, vocab: int,
                     tail_samples: int, seed: int) -> dict:
    """``keys`` (per example), ``counts`` (real rows per example), ``ids`` int32 ``[N, k]``, ``logp`` fp32 ``[N, k]``,
    ``log_tail`` fp32 ``[N]``, ``targets`` int32 ``[N]`` and, with ``tail_samples``, ``tail_ids`` int32 / ``tail_logp``
    fp32 ``[N, m]``; rows in row-major order of the batch's real target positions."""
    labels = batch["labels"]
    if task == "causal_lm":
        logits, labels = shift_for_causal_lm(logits, labels)
    mask = labels != -100
    ids, logp, tail, log_p = teacher_rows(logits[mask], top_k, temperature, vocab)
    keys = store.batch_keys(batch, task)
    counts = [int(n) for n in mask.sum(1).tolist()]
    out = {"keys": keys, "counts": counts, "ids": ids.to(torch.int32), "logp": logp.float(),
           "log_tail": tail.float(), "targets": labels[mask].to(torch.int32)}
    if tail_samples:
        t_ids, t_logp, row0 = [], [], 0
        for key, n in zip(keys, counts):
            # on the rows' device (a CUDA multinomial refuses a CPU generator); draws depend on the example only
            g = torch.Generator(device=log_p.device).manual_seed(store.sample_seed(key, seed))
            sl = slice(row0, row0 + n)
            a, b = sample_tail(log_p[sl], ids[sl], tail_samples, g)
            t_ids.append(a.to(torch.int32))
            t_logp.append(b.float())
            row0 += n
        out["tail_ids"] = torch.cat(t_ids) if t_ids else torch.empty((0, tail_samples), dtype=torch.int32)
        out["tail_logp"] = torch.cat(t_logp) if t_logp else torch.empty((0, tail_samples))
    return out
