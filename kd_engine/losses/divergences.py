"""Reference token-level divergences on full logits (fp32), shared by the naive KD path, tests and GKD.

Conventions (TRL's GKD ``generalized_jsd_loss``): ``q`` is the student distribution, ``p`` the teacher's, both
``softmax(logits / T)``.

- ``forward_kl``: KL(p || q) (Hinton KD, what ``losses.kd.kl_div_rows`` computes).
- ``reverse_kl``: KL(q || p) (mode-seeking, MiniLLM / GKD beta=1).
- ``jsd``: generalized Jensen-Shannon with ``m = beta * p + (1 - beta) * q``:
  ``beta * KL(p || m) + (1 - beta) * KL(q || m)``; ``beta = 0`` is defined as forward KL and ``beta = 1`` as
  reverse KL (TRL's endpoints; the mixture formula itself tends to 0 there).

``distill_loss`` is the naive (full-logits) form of ``losses.fused_kd.fused_kd_loss``: same terms, same masks,
same T^2 scaling; the fused loss is tested against it.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F

from ..errors import ConfigError

DIVERGENCES = ("forward_kl", "reverse_kl", "jsd")


def check_divergence(divergence: str, beta: float) -> None:
    if divergence not in DIVERGENCES:
        raise ConfigError(f"divergence must be one of {', '.join(DIVERGENCES)}; got {divergence!r}")
    if not 0.0 <= float(beta) <= 1.0:
        raise ConfigError(f"beta must be in [0, 1]; got {beta}")


def effective_divergence(divergence: str, beta: float) -> str:
    """``jsd`` at its endpoints is forward (beta=0) / reverse (beta=1) KL."""
    if divergence == "jsd" and beta == 0.0:
        return "forward_kl"
    if divergence == "jsd" and beta == 1.0:
        return "reverse_kl"
    return divergence


def log_probs(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    return F.log_softmax(logits.float() / temperature, dim=-1)


def mixture_log_probs(log_q: torch.Tensor, log_p: torch.Tensor, beta: float) -> torch.Tensor:
    """log(beta * p + (1 - beta) * q), for 0 < beta < 1."""
    return torch.logaddexp(log_q + math.log(1.0 - beta), log_p + math.log(beta))


def divergence_rows(log_q: torch.Tensor, log_p: torch.Tensor, divergence: str = "forward_kl",
                    beta: float = 0.5) -> torch.Tensor:
    """Per-row divergence (summed over the last axis) between student ``log_q`` and teacher ``log_p``."""
    div = effective_divergence(divergence, beta)
    if div == "forward_kl":
        return F.kl_div(log_q, log_p, log_target=True, reduction="none").sum(-1)
    if div == "reverse_kl":
        return F.kl_div(log_p, log_q, log_target=True, reduction="none").sum(-1)
    log_m = mixture_log_probs(log_q, log_p, beta)
    kl_p = F.kl_div(log_m, log_p, log_target=True, reduction="none").sum(-1)
    kl_q = F.kl_div(log_m, log_q, log_target=True, reduction="none").sum(-1)
    return beta * kl_p + (1.0 - beta) * kl_q


def distill_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor,
                 divergence: str = "forward_kl", beta: float = 0.5, temperature: float = 1.0, alpha: float = 1.0,
                 vocab_size: Optional[int] = None) -> dict[str, torch.Tensor]:
    """Naive reference: ``alpha * T^2 * mean_rows D(p_T, q_T) + (1 - alpha) * CE(labels, q)`` over labels != -100.

    ``student_logits`` / ``teacher_logits``: ``[..., V]`` already aligned with ``labels`` ``[...]``; logits
    beyond ``vocab_size`` are dropped from both. Empty mask: 0 that still carries the graph.
    """
    check_divergence(divergence, beta)
    mask = labels.reshape(-1) != -100
    s = student_logits[..., :vocab_size] if vocab_size else student_logits
    t = teacher_logits[..., :vocab_size] if vocab_size else teacher_logits
    s = s.reshape(-1, s.shape[-1])[mask]
    t = t.detach().reshape(-1, t.shape[-1])[mask]
    n = s.shape[0]
    if n == 0:
        zero = student_logits.sum() * 0.0
        return {"kd": zero, "ce": zero} if alpha < 1.0 else {"kd": zero}
    rows = divergence_rows(log_probs(s, temperature), log_probs(t, temperature), divergence, beta)
    terms = {"kd": alpha * temperature ** 2 * rows.sum() / n}
    if alpha < 1.0:
        terms["ce"] = (1.0 - alpha) * F.cross_entropy(s.float(), labels.reshape(-1)[mask])
    return terms
