"""MiniLLM loss terms (Gu et al., ICLR 2024) as pure functions of tensors.

Shapes: ``B`` sequences, ``T`` response positions, ``V`` vocabulary entries. Per-position tensors are ``[B, T]``,
logits ``[B, T, V']`` with ``V' >= V`` (padded logit rows, e.g. Flan-T5 32128 vs a 32100-entry tokenizer, are
dropped by passing ``vocab_size=V``). Every position tensor comes with a ``mask`` (1 = real response token); all
reductions are ``sum(x * mask) / max(sum(mask), 1)``, so an all-masked batch gives 0, never NaN. All softmax /
log-softmax / KL arithmetic runs in fp32. ``inf_mask`` (bool ``[B, T, V]``) marks vocabulary entries removed by
top-k / top-p at sampling time; those entries get -inf logits and are zeroed before any ``p * log q`` product.

Where we follow the paper (Gu et al., ICLR 2024) and where the reference code ``microsoft/LMOps/minillm``:
- rewards r_t = log p - log q, divided by reward_scaling and clipped: reference code (``reward.py``, rollout phase).
- advantages: discounted (gamma) sum that INCLUDES r_t, divided by #valid tokens from t to the end: reference code
  (``losses.py``); ``include_current=False, gamma=1, length_norm=False`` gives the paper's R_{t+1}.
- whitening: reference code, except that we whiten over real tokens only (masked) where the reference also
  counts padded positions.
- PPO clipped loss with the importance weight inside the ratio: reference code (``losses.py``).
- single-step term = exact per-token KL(q || p) over V, gradient through the student only: paper (a) and code.
- importance weight w_t = q / (alpha p + (1 - alpha) q) per token: paper (b) approximation, as in the code.
- pretraining loss (1 - kd_ratio) LM + kd_ratio softCE(teacher) with -inf masking: reference code (``losses.py``,
  the pt term).
- k3 estimator exp(d) - 1 - d of the reverse KL for logging: reference code (``sampler.py``, rollout phase).
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F

__all__ = [
    "masked_mean",
    "log_softmax_fp32",
    "token_logprobs",
    "compute_rewards",
    "long_term_advantages",
    "masked_whiten",
    "ppo_policy_loss",
    "single_step_reverse_kl",
    "importance_weights",
    "pretrain_loss",
    "k3_reverse_kl",
]


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``sum(x * mask) / max(sum(mask), 1)`` in fp32; 0 for an all-masked input."""
    m = mask.to(torch.float32)
    return (x.float() * m).sum() / m.sum().clamp_min(1.0)


def _slice_vocab(logits: torch.Tensor, vocab_size: Optional[int]) -> torch.Tensor:
    if vocab_size is None:
        return logits
    if logits.shape[-1] < vocab_size:
        raise ValueError(f"logits have {logits.shape[-1]} vocabulary entries, fewer than vocab_size={vocab_size}")
    return logits[..., :vocab_size]


def log_softmax_fp32(
    logits: torch.Tensor, vocab_size: Optional[int] = None, inf_mask: Optional[torch.Tensor] = None
) -> torch.Tensor:
    """fp32 log-softmax over the first ``vocab_size`` entries, with ``inf_mask`` entries set to -inf first."""
    logits = _slice_vocab(logits, vocab_size).float()
    if inf_mask is not None:
        logits = logits.masked_fill(inf_mask, float("-inf"))
    return F.log_softmax(logits, dim=-1)


def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor, mask: torch.Tensor, vocab_size: Optional[int] = None,
                   inf_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """log q(y_t) of the given tokens ``[B, T]``; 0 at masked positions (their tokens may be anything, e.g. pad)."""
    logp = log_softmax_fp32(logits, vocab_size, inf_mask)
    valid = mask.bool()
    safe_tokens = torch.where(valid, tokens, torch.zeros_like(tokens))
    out = logp.gather(-1, safe_tokens.unsqueeze(-1)).squeeze(-1)
    return out.masked_fill(~valid, 0.0)


def compute_rewards(
    teacher_logprobs: torch.Tensor,
    student_logprobs: torch.Tensor,
    mask: torch.Tensor,
    reward_scaling: float = 0.5,
    cliprange_reward: float = 100.0,
) -> torch.Tensor:
    """r_t = clip((log p(y_t) - log q(y_t)) / reward_scaling, +-cliprange_reward) * mask, detached, fp32."""
    r = (teacher_logprobs.float() - student_logprobs.float()).detach() / reward_scaling
    r = r.clamp(-cliprange_reward, cliprange_reward)
    return r * mask.to(torch.float32)


def _all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        t = t.clone()
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def masked_whiten(x: torch.Tensor, mask: torch.Tensor, distributed: bool = True, eps: float = 1e-8) -> torch.Tensor:
    """(x - mean) / sqrt(var + eps) over real tokens (and over data-parallel ranks when torch.distributed is up).

    Masked positions come back as 0. All-zero rewards give exactly 0 (0 / sqrt(0 + eps)).
    """
    m = mask.to(torch.float32)
    x = x.float()
    stats = torch.stack([(x * m).sum(), m.sum()])
    if distributed:
        stats = _all_reduce_sum(stats)
    count = stats[1].clamp_min(1.0)
    mean = stats[0] / count
    sq = ((x - mean) ** 2 * m).sum()
    if distributed:
        sq = _all_reduce_sum(sq)
    var = sq / count
    return (x - mean) * torch.rsqrt(var + eps) * m


def long_term_advantages(
    rewards: torch.Tensor,
    mask: torch.Tensor,
    gamma: float = 0.95,
    length_norm: bool = True,
    include_current: bool = True,
    whiten: bool = True,
    distributed: bool = True,
) -> torch.Tensor:
    """A_t = (sum_{t' >= t} gamma^(t'-t) r_t') / #valid tokens in [t, end), optionally whitened; detached.

    ``include_current=False`` starts the sum at t+1 (the paper's R_{t+1}; divided by #valid tokens in (t, end)).
    Vectorised as one ``[B, T] x [T, T]`` product with the upper-triangular discount matrix.
    """
    r = rewards.float().detach() * mask.to(torch.float32)
    m = mask.to(torch.float32)
    T = r.shape[-1]
    idx = torch.arange(T, device=r.device)
    diff = (idx.view(1, T) - idx.view(T, 1)).to(torch.float32)  # [t, t'] = t' - t
    lower = 0 if include_current else 1
    keep = diff >= lower
    disc = torch.where(keep, torch.pow(torch.tensor(float(gamma), device=r.device), diff.clamp_min(0)), 0.0)
    returns = r @ disc.T  # [B, T]: sum over t' of r[t'] * disc[t, t']
    if length_norm:
        lens = m @ keep.to(torch.float32).T  # valid tokens in [t + lower, end)
        returns = returns / lens.clamp_min(1.0)
    returns = returns * m
    if whiten:
        returns = masked_whiten(returns, m, distributed=distributed)
    return returns.detach()


def ppo_policy_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    weights: torch.Tensor,
    mask: torch.Tensor,
    cliprange: float = 0.2,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Clipped surrogate with rho_t = exp(log q_new - log q_old) * w_t (the weight inside the clip, as the code).

    Returns the token-mean loss and detached stats (ratio mean, clip fraction, approx KL new vs old).
    """
    m = mask.to(torch.float32)
    log_ratio = (logprobs.float() - old_logprobs.float().detach()) * m
    ratio = torch.exp(log_ratio) * weights.float().detach()
    adv = advantages.float().detach()
    loss1 = -adv * ratio
    loss2 = -adv * ratio.clamp(1.0 - cliprange, 1.0 + cliprange)
    loss = masked_mean(torch.maximum(loss1, loss2), m)
    with torch.no_grad():
        stats = {
            "ratio": masked_mean(ratio, m),
            "clipfrac": masked_mean(((ratio - 1.0).abs() > cliprange).float(), m),
            "approx_kl": masked_mean(torch.exp(log_ratio) - 1.0 - log_ratio, m),
        }
    return loss, stats


def single_step_reverse_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, mask: torch.Tensor,
                           vocab_size: Optional[int] = None, inf_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Token mean of the exact KL(q_t || p_t) = sum_v q (log q - log p); gradient through the student only.

    Entries that are -inf for either model (or in ``inf_mask``) contribute 0 (no 0 * -inf = NaN).
    """
    logq = log_softmax_fp32(student_logits, vocab_size, inf_mask)
    with torch.no_grad():
        logp = log_softmax_fp32(teacher_logits.detach(), vocab_size, inf_mask)
    dead = torch.isinf(logq) | torch.isinf(logp)
    q = logq.exp().masked_fill(dead, 0.0)
    # zero the -inf entries BEFORE the product so that neither the value nor its gradient sees 0 * inf
    diff = logq.masked_fill(dead, 0.0) - logp.masked_fill(dead, 0.0)
    return masked_mean((q * diff).sum(-1), mask)


def importance_weights(
    student_logprobs: torch.Tensor, teacher_logprobs: torch.Tensor, alpha: float, mask: Optional[torch.Tensor] = None
) -> torch.Tensor:
    """w_t = q(y_t) / (alpha p(y_t) + (1 - alpha) q(y_t)), computed in log space; exactly 1 for alpha = 0.

    Masked positions get w = 1.
    """
    lq = student_logprobs.float().detach()
    if alpha == 0.0:
        return torch.ones_like(lq)
    if not 0.0 < alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    lp = teacher_logprobs.float().detach()
    if alpha == 1.0:
        log_mix = lp
    else:
        log_mix = torch.logaddexp(lp + math.log(alpha), lq + math.log1p(-alpha))
    w = torch.exp(lq - log_mix)
    if mask is not None:
        w = torch.where(mask.bool(), w, torch.ones_like(w))
    return w


def pretrain_loss(
    student_logits: torch.Tensor,
    labels: torch.Tensor,
    teacher_logits: Optional[torch.Tensor] = None,
    kd_ratio: float = 0.5,
    vocab_size: Optional[int] = None,
    ignore_index: int = -100,
) -> dict[str, torch.Tensor]:
    """(1 - kd_ratio) * LM + kd_ratio * softCE(teacher) on a pretraining batch; logits already aligned to labels.

    softCE = -sum_v p(v) log q(v), entries where the student log-prob is -inf set to 0, token mean over
    ``labels != ignore_index``. Without teacher logits (or kd_ratio = 0) the loss is the LM term alone.
    Returns ``{"pt": total, "lm": ..., "kd": ...}``.
    """
    valid = labels != ignore_index
    logq = log_softmax_fp32(student_logits, vocab_size)
    safe = torch.where(valid, labels, torch.zeros_like(labels))
    nll = -logq.gather(-1, safe.unsqueeze(-1)).squeeze(-1)
    lm = masked_mean(nll.masked_fill(~valid, 0.0), valid)
    if teacher_logits is None or kd_ratio == 0.0:
        kd = torch.zeros((), device=lm.device)
        return {"pt": lm, "lm": lm, "kd": kd}
    with torch.no_grad():
        p = log_softmax_fp32(teacher_logits.detach(), vocab_size).exp()
    prod = p * logq.masked_fill(torch.isinf(logq), 0.0)  # mask before the product: no 0 * -inf in grad
    kd = masked_mean(-prod.sum(-1), valid)
    return {"pt": (1.0 - kd_ratio) * lm + kd_ratio * kd, "lm": lm, "kd": kd}


def k3_reverse_kl(
    student_logprobs: torch.Tensor, teacher_logprobs: torch.Tensor, mask: torch.Tensor, length_norm: bool = False
) -> torch.Tensor:
    """Sequence-level reverse-KL estimate from samples of the student: mean over sequences of
    sum_t (e^d - 1 - d) with d = log p - log q (divided by the response length when ``length_norm``). Logging only.
    """
    m = mask.to(torch.float32)
    d = (teacher_logprobs.float() - student_logprobs.float()).detach() * m
    per_seq = ((torch.exp(d) - 1.0 - d) * m).sum(-1)
    if length_norm:
        per_seq = per_seq / m.sum(-1).clamp_min(1.0)
    return per_seq.mean() if per_seq.numel() else per_seq.sum()
