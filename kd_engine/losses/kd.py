"""Logit distillation losses (Hinton et al. 2015), pure functions of tensors.

Every function computes in fp32, reduces over real rows only (a boolean ``mask`` over the leading dimensions),
returns a 0 that still carries the graph when the mask is empty, and accepts ``vocab_size`` to drop padded logit
rows (e.g. Flan-T5: 32128 logits for 32100 tokens) from both models before any softmax.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F


def _rows(logits: torch.Tensor, mask: Optional[torch.Tensor], vocab_size: Optional[int]) -> torch.Tensor:
    if vocab_size is not None:
        logits = logits[..., :vocab_size]
    logits = logits.float().reshape(-1, logits.shape[-1])
    if mask is not None:
        logits = logits[mask.reshape(-1).bool()]
    return logits


def _empty_zero(ref: torch.Tensor) -> torch.Tensor:
    return ref.sum() * 0.0  # keeps the autograd graph (DeepSpeed needs a backward on every rank)


def kl_div_rows(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0,
                mask: Optional[torch.Tensor] = None, vocab_size: Optional[int] = None) -> torch.Tensor:
    """Mean over real rows of KL(softmax(t/T) || softmax(s/T)) * T^2 (the 'batchmean' form of HF's distiller).

    When at least 3/4 of the rows are real (LM batches: the mask drops only padding and prompts) every row is
    computed and the per-row KL is masked: no full-vocabulary gather of both logit tensors forward and no scatter
    backward. Sparser masks gather the real rows first. At T = 1 the logits are not divided (no copy)."""
    n_all = student_logits[..., 0].numel()
    n = n_all if mask is None else int(mask.sum())
    if n == 0:
        return _empty_zero(student_logits)
    dense = mask is not None and 4 * n >= 3 * n_all
    s = _rows(student_logits, None if dense else mask, vocab_size)
    t = _rows(teacher_logits.detach(), None if dense else mask, vocab_size)
    if temperature != 1.0:
        s, t = s / temperature, t / temperature
    log_q = F.log_softmax(s, dim=-1)
    log_p = F.log_softmax(t, dim=-1)
    if dense:
        per_row = F.kl_div(log_q, log_p, log_target=True, reduction="none").sum(-1)
        kl = torch.where(mask.reshape(-1).bool(), per_row, 0.0).sum()
    else:
        kl = F.kl_div(log_q, log_p, log_target=True, reduction="sum")
    return kl / n * (temperature ** 2)


def soft_cross_entropy_rows(student_logits: torch.Tensor, teacher_probs: torch.Tensor,
                            mask: Optional[torch.Tensor] = None, temperature: float = 1.0) -> torch.Tensor:
    """Mean over real rows of -sum_k p_k log softmax(s/T)_k, for targets given as probabilities.

    Entries where the student's log-prob is -inf (masked logits) contribute 0 instead of 0 * -inf = NaN.
    """
    s = _rows(student_logits, mask, None)
    p = teacher_probs.float().reshape(-1, teacher_probs.shape[-1])
    if mask is not None:
        p = p[mask.reshape(-1).bool()]
    if s.shape[0] == 0:
        return _empty_zero(student_logits)
    log_q = F.log_softmax(s / temperature, dim=-1)
    prod = torch.where(torch.isinf(log_q), torch.zeros_like(log_q), p * log_q)
    return -prod.sum() / s.shape[0]


def hard_cross_entropy(student_logits: torch.Tensor, labels: torch.Tensor,
                       vocab_size: Optional[int] = None) -> torch.Tensor:
    """Mean token/example CE over labels != -100; 0 (with graph) when there is none."""
    logits = student_logits[..., :vocab_size] if vocab_size is not None else student_logits
    flat = labels.reshape(-1)
    if not bool((flat != -100).any()):
        return _empty_zero(student_logits)
    return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), flat, ignore_index=-100)


def shift_for_causal_lm(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Align causal-LM logits with the tokens they predict: position t predicts labels[t + 1]."""
    return logits[:, :-1, :], labels[:, 1:]


def logit_kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: Optional[torch.Tensor],
                  temperature: float = 2.0, alpha: float = 0.5, vocab_size: Optional[int] = None,
                  mask: Optional[torch.Tensor] = None) -> dict[str, torch.Tensor]:
    """Hinton KD: ``alpha * T^2 KL(p_T || q_T) + (1 - alpha) * CE(y, q)``, returned as named weighted terms.

    Rows: examples (sequence classification, logits ``[B, C]``) or tokens (``[B, n, V]``, already aligned with
    ``labels``). Real rows are ``mask`` if given, else ``labels != -100``, else all rows.
    """
    if mask is None and labels is not None and labels.dim() == student_logits.dim() - 1:
        mask = labels != -100
    terms = {"kd": alpha * kl_div_rows(student_logits, teacher_logits, temperature, mask, vocab_size)}
    if alpha < 1.0 and labels is not None:
        terms["ce"] = (1.0 - alpha) * hard_cross_entropy(student_logits, labels, vocab_size)
    return terms
