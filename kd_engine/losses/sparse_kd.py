"""KD from a cached top-k teacher distribution plus a tail bucket (pure function of tensors, fp32).

The teacher is given, per real row, by its top-k token ids, their log-probabilities ``log p_i`` and the log of the
remaining mass ``log p_tail`` (all at temperature T). The student's distribution is reduced to the same k + 1
buckets: ``q_i = softmax(s / T)[id_i]`` and ``q_tail = 1 - sum_i q_i`` (computed as a logsumexp over the other
tokens, so it is exact and stable). The loss is the forward KL over the buckets,
``sum_i p_i (log p_i - log q_i) + p_tail (log p_tail - log q_tail)``, times T^2: with k = vocab the tail is empty
and this is exactly ``losses.kd.kl_div_rows``; for k < vocab it is a lower bound of the full KL (the data
processing inequality) that keeps the teacher's total tail probability.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F


def _xlogy_exp(log_a: torch.Tensor, log_b: torch.Tensor) -> torch.Tensor:
    """exp(log_a) * (log_a - log_b), 0 where exp(log_a) == 0."""
    a = log_a.exp()
    return torch.where(a > 0, a * (log_a - log_b), torch.zeros_like(a))


def sparse_kl_rows(student_logits: torch.Tensor, top_ids: torch.Tensor, top_logp: torch.Tensor,
                   log_tail: torch.Tensor, temperature: float = 1.0, vocab_size: Optional[int] = None) -> torch.Tensor:
    """Per-row bucket KL for student logits ``[N, V]`` (real rows only) and cached ``[N, k]`` ids / log-probs and
    ``[N]`` log tail mass. Not yet multiplied by T^2."""
    s = student_logits[..., :vocab_size] if vocab_size else student_logits
    log_q = F.log_softmax(s.float() / temperature, dim=-1)
    log_q_top = log_q.gather(1, top_ids)
    rest = log_q.scatter(1, top_ids, float("-inf"))
    log_q_tail = torch.logsumexp(rest, dim=-1)
    top = _xlogy_exp(top_logp.float(), log_q_top).sum(-1)
    return top + _xlogy_exp(log_tail.float(), log_q_tail)


def sparse_kd_loss(student_logits: torch.Tensor, labels: torch.Tensor, top_ids: torch.Tensor,
                   top_logp: torch.Tensor, log_tail: torch.Tensor, temperature: float = 2.0, alpha: float = 0.5,
                   vocab_size: Optional[int] = None) -> dict[str, torch.Tensor]:
    """``alpha * T^2 * mean bucket-KL + (1 - alpha) * CE`` over rows with labels != -100 (in row-major order, the
    order of the cached rows). Empty mask: zeros that keep the graph."""
    mask = labels.reshape(-1) != -100
    s = student_logits.reshape(-1, student_logits.shape[-1])[mask]
    n = s.shape[0]
    if n == 0:
        zero = student_logits.sum() * 0.0
        return {"kd": zero, "ce": zero} if alpha < 1.0 else {"kd": zero}
    if top_ids.shape[0] != n:
        raise ValueError(f"{top_ids.shape[0]} cached rows for {n} real rows")
    rows = sparse_kl_rows(s, top_ids.to(s.device), top_logp.to(s.device), log_tail.to(s.device), temperature,
                          vocab_size)
    terms = {"kd": alpha * temperature ** 2 * rows.sum() / n}
    if alpha < 1.0:
        sv = s[..., :vocab_size] if vocab_size else s
        terms["ce"] = (1.0 - alpha) * F.cross_entropy(sv.float(), labels.reshape(-1)[mask])
    return terms


def top_k_rows(teacher_logits: torch.Tensor, k: int, temperature: float = 1.0, vocab_size: Optional[int] = None):
    """What the cache stores for teacher logit rows ``[N, V]``: top-k ids, their log-probs, log of the tail mass."""
    t = teacher_logits[..., :vocab_size] if vocab_size else teacher_logits
    log_p = F.log_softmax(t.float() / temperature, dim=-1)
    logp, ids = log_p.topk(k, dim=-1)
    log_tail = torch.logsumexp(log_p.scatter(1, ids, float("-inf")), dim=-1)
    return ids, logp, log_tail
