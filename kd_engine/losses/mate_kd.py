"""MATE-KD (Rashid et al., ACL 2021) pieces as pure functions of tensors: masking, Gumbel-softmax
straight-through sampling, perturbed embeddings, the divergence D (methods.md §4.1).

How the perturbed text reaches each model. The Gumbel sample is ``y = (y_hard - y_soft).detach() + y_soft``, so its
forward value is exactly one-hot and ``y @ E = E[argmax]``. Hence:

- student step (sample detached): the perturbed input IS ``input_ids`` with the sampled tokens substituted; each
  model looks them up in its own embedding matrix through its own ``input_ids`` path (positions, token types,
  RoBERTa's padding offset all as usual, ZeRO-3 gathering as usual).
- generator step: each model gets ``inputs_embeds = E[substituted ids] + ((y_soft - y_soft.detach()) @ E)`` at the
  masked positions. The second term is 0 in value, its gradient w.r.t. ``y_soft`` is ``g @ E^T`` (the reference's
  straight-through gradient), and w.r.t. ``E`` it is 0 (the models are frozen in that step anyway), so ``E`` can
  be a detached (gathered) copy. Position ids are passed explicitly (``position_ids_for``), since RoBERTa's
  ``inputs_embeds`` path does not know where the padding is.

Sampling only ever picks rows below ``vocab_size`` (the tokenizer's real ids): padded embedding/logit rows are
never sampled. Softmax, log-softmax, KL and MSE run in fp32.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

DIVERGENCES = ("kl", "ce", "mse")


def mask_positions(input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor], special_ids: torch.Tensor,
                   mask_prob: float, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Bool ``[B, n]``: each real (attention 1), non-special token is selected with probability ``mask_prob``."""
    eligible = ~torch.isin(input_ids, special_ids.to(input_ids.device))
    if attention_mask is not None:
        eligible &= attention_mask.bool()
    u = torch.rand(input_ids.shape, generator=generator, device=input_ids.device)
    return eligible & (u < mask_prob)


def gumbel_noise(shape, generator: Optional[torch.Generator] = None, device=None) -> torch.Tensor:
    u = torch.rand(shape, generator=generator, device=device, dtype=torch.float32)
    return -torch.log(-torch.log(u + 1e-20) + 1e-20)


def gumbel_softmax_st(logits: torch.Tensor, tau: float = 1.0, vocab_size: Optional[int] = None,
                      generator: Optional[torch.Generator] = None, hard: bool = True,
                      noise: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Gumbel-softmax over the last axis of ``logits`` ``[K, V]`` restricted to the first ``vocab_size`` columns.

    ``y_soft = softmax((log_softmax(s) + g) / tau)``; with ``hard`` the straight-through sample
    ``(one_hot(argmax y_soft) - y_soft).detach() + y_soft`` (exact one-hot forward, soft gradient).
    Returns ``[K, vocab_size]`` in fp32.
    """
    s = logits.float()
    if vocab_size is not None:
        s = s[..., :vocab_size]
    g = gumbel_noise(s.shape, generator, s.device) if noise is None else noise[..., :s.shape[-1]]
    y_soft = F.softmax((F.log_softmax(s, dim=-1) + g) / tau, dim=-1)
    if not hard:
        return y_soft
    index = y_soft.argmax(dim=-1, keepdim=True)
    y_hard = torch.zeros_like(y_soft).scatter_(-1, index, 1.0)
    return (y_hard - y_soft).detach() + y_soft


def substitute(input_ids: torch.Tensor, mask: torch.Tensor, sampled: torch.Tensor) -> torch.Tensor:
    """``input_ids`` with the masked positions (row-major order) replaced by ``sampled`` ``[K]``."""
    out = input_ids.clone()
    out[mask] = sampled.to(out.dtype)
    return out


def straight_through_delta(y: torch.Tensor, embedding: torch.Tensor) -> torch.Tensor:
    """``(y - y.detach()) @ E``: zero in value, carries d/dy of ``y @ E`` (``E`` may be a detached copy)."""
    E = embedding[: y.shape[-1]].detach()
    return (y - y.detach()).to(E.dtype) @ E


def perturbed_embeddings(base: torch.Tensor, mask: torch.Tensor, y: torch.Tensor,
                         embedding: torch.Tensor) -> torch.Tensor:
    """``emb = (y @ E) * m + E[ids] * (1 - m)`` given ``base = E[substituted ids]`` ``[B, n, H]``: base plus the
    straight-through term at the masked positions. Equal in value to ``base``; differentiable w.r.t. ``y``."""
    delta = straight_through_delta(y, embedding).to(base.dtype)
    b, t = mask.nonzero(as_tuple=True)
    return base.index_put((b, t), base[b, t] + delta)


def position_ids_for(model_type: str, input_ids: torch.Tensor, padding_idx: Optional[int]) -> Optional[torch.Tensor]:
    """The position ids the model's ``input_ids`` path would use, for its ``inputs_embeds`` path: RoBERTa-style
    models number real tokens from ``padding_idx + 1`` and give padding ``padding_idx``; others count from 0."""
    if model_type in ("roberta", "xlm-roberta", "camembert", "roberta-prelayernorm", "data2vec-text", "xmod") \
            and padding_idx is not None:
        real = input_ids.ne(padding_idx).int()
        return (torch.cumsum(real, dim=1) * real).long() + padding_idx
    n = input_ids.shape[1]
    return torch.arange(n, device=input_ids.device).unsqueeze(0).expand_as(input_ids)


def divergence(student_logits: torch.Tensor, teacher_logits: torch.Tensor, kind: str = "kl",
               temperature: float = 1.0) -> torch.Tensor:
    """D(student, teacher) per methods.md §4.1, mean over the batch rows, fp32. The teacher is NOT detached (the
    generator step needs its gradient through the teacher's activations); detach it yourself where it must not
    carry one.

    - ``kl``:  T^2 * KL(softmax(t/T) || softmax(s/T)) (0 when student == teacher);
    - ``ce``:  T^2 * -sum softmax(t/T) log_softmax(s/T) (the reference code's "KL": includes the teacher entropy);
    - ``mse``: mean squared error of the logits (regression, STS-B).
    """
    s = student_logits.float().reshape(-1, student_logits.shape[-1])
    t = teacher_logits.float().reshape(-1, teacher_logits.shape[-1])
    if s.shape[0] == 0:
        return student_logits.sum() * 0.0 + teacher_logits.sum() * 0.0
    if kind == "mse":  # (s - t)^2, not F.mse_loss: that saves t for backward, and the teacher's outputs may be
        return (s - t).pow(2).mean()  # inference-mode tensors (kd_engine's teacher forward), which cannot be saved
    log_q = F.log_softmax(s / temperature, dim=-1)
    log_p = F.log_softmax(t / temperature, dim=-1)
    if kind == "kl":
        per_row = (log_p.exp() * (log_p - log_q)).sum(-1)
    elif kind == "ce":
        per_row = -(log_p.exp() * log_q).sum(-1)
    else:
        raise ValueError(f"divergence must be one of {', '.join(DIVERGENCES)}; got {kind!r}")
    return per_row.mean() * temperature ** 2


def supervised_loss(student_logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Label loss: cross-entropy on class ids (int labels), MSE on a single regression output (float labels)."""
    if labels.is_floating_point():
        return F.mse_loss(student_logits.float().reshape(-1), labels.float().reshape(-1))
    return F.cross_entropy(student_logits.float(), labels)


def changed_fraction(input_ids: torch.Tensor, substituted: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Fraction of the masked positions where the generator wrote a token different from the original."""
    n = mask.sum()
    if int(n) == 0:
        return torch.zeros((), device=input_ids.device)
    return (input_ids.ne(substituted) & mask).sum().float() / n.float()
