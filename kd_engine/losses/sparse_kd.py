"""KD from a cached sparse teacher distribution: top-k + tail (pure functions of tensors, fp32).

The teacher is given, per real row, by its top-k token ids, their log-probabilities ``log p_i`` and the log of the
remaining mass ``log p_tail`` (all at temperature T), and optionally by ``m`` tokens sampled from the teacher's
own tail (the distribution ``p`` restricted to the tokens outside the top k and renormalised) with their
log-probabilities ``log p_s``. ``q = softmax(s / T)`` is the student's distribution.

- Without tail samples (bucket KL): the student is reduced to the same k + 1 buckets, ``q_tail = 1 - sum_i q_i``
  (a logsumexp over the other tokens, exact and stable), and the loss is
  ``sum_i p_i (log p_i - log q_i) + p_tail (log p_tail - log q_tail)``. With k = vocab this is exactly
  ``losses.kd.kl_div_rows``; for k < vocab it is a lower bound of the full KL (data processing inequality) that
  matches the teacher's total tail mass but leaves the student's distribution inside the tail untaught.
- With tail samples: ``sum_i p_i (log p_i - log q_i) + p_tail * mean_j (log p_s_j - log q_s_j)``. The second term
  is an unbiased estimate of the tail's part of the full KL, ``sum_{t in tail} p_t (log p_t - log q_t)``, so the
  loss and its gradient (``q - p_hat``, with ``p_hat`` the exact top-k plus the sampled tail weights, which sum to
  1) are unbiased for the full forward KL: the tail is taught its shape, not only its mass (as in random-sampling
  KD, Anshumann et al. 2025, here only for the mass the top-k does not hold exactly).

Both are multiplied by T^2 in ``sparse_kd_loss``.
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
                   log_tail: torch.Tensor, temperature: float = 1.0, vocab_size: Optional[int] = None,
                   tail_ids: Optional[torch.Tensor] = None, tail_logp: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Per-row KL for student logits ``[N, V]`` (real rows only), cached ``[N, k]`` ids / log-probs, ``[N]`` log tail
    mass and optionally ``[N, m]`` sampled tail ids / log-probs (module docstring). Not yet multiplied by T^2."""
    s = student_logits[..., :vocab_size] if vocab_size else student_logits
    log_q = F.log_softmax(s.float() / temperature, dim=-1)
    top = _xlogy_exp(top_logp.float(), log_q.gather(1, top_ids)).sum(-1)
    if tail_ids is not None and tail_ids.shape[-1] > 0:
        p_tail = log_tail.float().exp()
        diff = (tail_logp.float() - log_q.gather(1, tail_ids)).mean(-1)
        return top + torch.where(p_tail > 0, p_tail * diff, torch.zeros_like(p_tail))
    log_q_tail = torch.logsumexp(log_q.scatter(1, top_ids, float("-inf")), dim=-1)
    return top + _xlogy_exp(log_tail.float(), log_q_tail)


def sparse_kd_loss(student_logits: torch.Tensor, labels: torch.Tensor, top_ids: torch.Tensor,
                   top_logp: torch.Tensor, log_tail: torch.Tensor, temperature: float = 2.0, alpha: float = 0.5,
                   vocab_size: Optional[int] = None, tail_ids: Optional[torch.Tensor] = None,
                   tail_logp: Optional[torch.Tensor] = None) -> dict[str, torch.Tensor]:
    """``alpha * T^2 * mean sparse KL + (1 - alpha) * CE`` over rows with labels != -100 (in row-major order, the
    order of the cached rows). Empty mask: zeros that keep the graph."""
    mask = labels.reshape(-1) != -100
    s = student_logits.reshape(-1, student_logits.shape[-1])[mask]
    n = s.shape[0]
    if n == 0:
        zero = student_logits.sum() * 0.0
        return {"kd": zero, "ce": zero} if alpha < 1.0 else {"kd": zero}
    if top_ids.shape[0] != n:
        raise ValueError(f"{top_ids.shape[0]} cached rows for {n} real rows")
    dev = s.device
    rows = sparse_kl_rows(s, top_ids.to(dev), top_logp.to(dev), log_tail.to(dev), temperature, vocab_size,
                          None if tail_ids is None else tail_ids.to(dev),
                          None if tail_logp is None else tail_logp.to(dev))
    terms = {"kd": alpha * temperature ** 2 * rows.sum() / n}
    if alpha < 1.0:
        sv = s[..., :vocab_size] if vocab_size else s
        terms["ce"] = (1.0 - alpha) * F.cross_entropy(sv.float(), labels.reshape(-1)[mask])
    return terms


def top_k_rows(teacher_logits: torch.Tensor, k: int, temperature: float = 1.0, vocab_size: Optional[int] = None):
    """What the cache stores for teacher logit rows ``[N, V]``: top-k ids, their log-probs, log of the tail mass."""
    ids, logp, log_tail, _ = teacher_rows(teacher_logits, k, temperature, vocab_size)
    return ids, logp, log_tail


def teacher_rows(teacher_logits: torch.Tensor, k: int, temperature: float = 1.0, vocab_size: Optional[int] = None):
    """``(top ids, top log-probs, log tail mass, full log-probs [N, V])`` of teacher logit rows ``[N, V]``."""
    t = teacher_logits[..., :vocab_size] if vocab_size else teacher_logits
    log_p = F.log_softmax(t.float() / temperature, dim=-1)
    logp, ids = log_p.topk(k, dim=-1)
    log_tail = torch.logsumexp(log_p.scatter(1, ids, float("-inf")), dim=-1)
    return ids, logp, log_tail, log_p


def sample_tail(log_p: torch.Tensor, top_ids: torch.Tensor, m: int, generator: torch.Generator):
    """``m`` draws (with replacement) per row from the teacher's tail: ``log_p [N, V]`` restricted to the tokens not
    in ``top_ids`` and renormalised. Returns ``(ids [N, m], log p of those ids [N, m])``; a row with an empty tail
    (k = vocab, or all tail mass underflowed) gets its top-1 token, which the loss weighs by p_tail = 0."""
    if log_p.shape[0] == 0:
        return top_ids.new_zeros((0, m)), log_p.new_zeros((0, m))
    w = log_p.exp().scatter_(1, top_ids, 0.0).double()  # in place: exp made a fresh tensor
    empty = w.sum(-1) <= 0
    if empty.any():
        w[empty] = 0.0
        w[empty, top_ids[empty, 0]] = 1.0
    ids = torch.multinomial(w, m, replacement=True, generator=generator)
    return ids, log_p.gather(1, ids)
