"""Cross-tokenizer distillation losses (teacher and student with different vocabularies), fp32, pure functions.

Row terms, one row per compared pair of next-token distributions ``p`` (teacher, ``[n, V_t]``) and ``q``
(student, ``[n, V_s]``):

- ``sorted_l1(p, q)``: ULD (Boizard et al. 2024): both sorted in decreasing order, the shorter padded with zeros,
  L1 distance: the closed form of the 1-D Wasserstein-1 distance between the two probability *profiles*. It is 0
  for any permutation of the same probabilities (it cannot tell which token; it teaches confidence).
- ``mapped_kl(log_p, log_q, t_ids, s_ids)``: KL over the part of the vocabulary that maps one to one (teacher
  token ``t_ids[j]`` spells what student token ``s_ids[j]`` does), with one more outcome for everything else on
  each side (its mass ``1 - sum(mapped)``): a KL between two distributions over the same outcomes, >= 0, and
  exactly the full-vocabulary KL when every token maps (one tokenizer on both sides).
- ``binary_kl(lp_t, lp_s)``: per aligned span whose text one model spells in several tokens, the KL between
  Bernoulli(P_teacher(span text | prefix)) and Bernoulli(P_student(...)), both probabilities exact by the chain
  rule (``data.token_alignment.span_log_probs``).

``pair_terms`` and ``token_log_probs`` compute these chunk by chunk from either logits or hidden states and the
output-layer weight (``weight=None``: ``src`` already holds logits), each chunk under activation checkpointing:
only one chunk's ``[rows x V]`` tensors exist at a time, in forward and in backward, and no
``[rows x V_t x V_s]`` tensor is ever built (the vocabulary map is an index, not a matrix).
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch.utils.checkpoint import checkpoint

from .fused_kd import chunk_rows_for

LOG_TINY = math.log(1e-30)


def sorted_l1(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """``[n]``: sum_i |sort(p)_i - sort(q)_i| with both rows sorted decreasingly and zero-padded to one length.

    Past the shorter row's length ``k`` the other row is compared with zeros, so only its top ``k`` need sorting:
    the rest adds its plain sum (``topk`` of ``k`` is several times cheaper than sorting a 49k-wide row)."""
    p, q = p.float(), q.float()
    k = min(p.shape[-1], q.shape[-1])

    def top(x):
        if x.shape[-1] == k:
            return x.sort(-1, descending=True).values, x.new_zeros(x.shape[:-1])
        v = x.topk(k, -1).values
        return v, (x.sum(-1) - v.sum(-1)).clamp(min=0.0)

    (ps, p_tail), (qs, q_tail) = top(p), top(q)
    return (ps - qs).abs().sum(-1) + p_tail + q_tail


def _log_rest(log_p: torch.Tensor, rest: torch.Tensor) -> torch.Tensor:
    """log of the mass on the unmapped tokens (``rest``: bool ``[V]``); -inf where there are none (or it underflows)."""
    if not bool(rest.any()):
        return log_p.new_full(log_p.shape[:-1], -math.inf)
    return (log_p.exp() * rest).sum(-1).log()


def mapped_kl(log_p: torch.Tensor, log_q: torch.Tensor, t_ids: torch.Tensor, s_ids: torch.Tensor,
              t_rest: torch.Tensor, s_rest: torch.Tensor) -> torch.Tensor:
    """``[n]``: KL(p || q) over the mapped tokens plus one bucket for each side's unmapped mass (module doc)."""
    lp, lq = log_p[:, t_ids], log_q[:, s_ids]
    p = lp.exp()
    rows = (torch.xlogy(p, p) - p * lq).sum(-1)
    lr_p, lr_q = _log_rest(log_p, t_rest), _log_rest(log_q, s_rest).clamp(min=LOG_TINY)
    bucket = torch.where(torch.isfinite(lr_p), lr_p.exp() * (lr_p - lr_q), torch.zeros_like(lr_p))
    return rows + bucket


def _log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x <= 0, stable at both ends."""
    x = x.clamp(max=-1e-12)
    near = x > -math.log(2.0)  # each branch sees only inputs it is stable for (no nan in where's backward)
    half = x.new_tensor(-math.log(2.0))
    return torch.where(near, torch.log(-torch.expm1(torch.where(near, x, half))),
                       torch.log1p(-torch.exp(torch.where(near, half, x))))


def binary_kl(lp_t: torch.Tensor, lp_s: torch.Tensor) -> torch.Tensor:
    """KL(Bernoulli(exp lp_t) || Bernoulli(exp lp_s)), elementwise, from log-probabilities (fp32)."""
    lp_t, lp_s = lp_t.float(), lp_s.float()
    p = lp_t.exp()
    l1p, l1q = _log1mexp(lp_t).clamp(min=LOG_TINY), _log1mexp(lp_s).clamp(min=LOG_TINY)
    return p * (lp_t - lp_s) + (1.0 - p) * (l1p - l1q)


def _rows(src: torch.Tensor, weight: Optional[torch.Tensor], b: torch.Tensor, r: torch.Tensor,
          vocab: int) -> torch.Tensor:
    x = src[b, r]
    z = x @ weight.t() if weight is not None else x
    return z[:, :vocab].float()


def token_log_probs(src, weight, ids, b, r, vocab, chunk_rows: Optional[int] = None) -> torch.Tensor:
    """``[n]``: log p(ids[b, r + 1] | row r of sequence b), chunk by chunk (checkpointed when it needs grad)."""
    step = chunk_rows_for(vocab, chunk_rows)
    target = ids[b, r + 1]

    def chunk(x, w, lo, hi):  # log_softmax + gather: several times faster on CPU than z - logsumexp(z)
        return torch.log_softmax(_rows(x, w, b[lo:hi], r[lo:hi], vocab), -1).gather(1, target[lo:hi, None])[:, 0]

    out = []
    for lo in range(0, b.numel(), step):
        hi = min(lo + step, b.numel())
        grad = torch.is_grad_enabled() and (src.requires_grad or (weight is not None and weight.requires_grad))
        out.append(checkpoint(chunk, src, weight, lo, hi, use_reentrant=False) if grad else chunk(src, weight, lo, hi))
    return torch.cat(out) if out else src.new_zeros(0, dtype=torch.float32)


def pair_terms(s_src, s_weight, s_vocab: int, t_src, t_weight, t_vocab: int, b, s_row, t_row, vmap: dict,
               kinds: tuple[str, ...], temperature: float = 1.0,
               chunk_rows: Optional[int] = None) -> dict[str, torch.Tensor]:
    """Per compared pair (sequence ``b``, student row ``s_row``, teacher row ``t_row``) the row terms ``kinds``:
    ``kl`` (mapped_kl), ``uld_rest`` (sorted_l1 over the unmapped tokens), ``uld`` (sorted_l1 over everything),
    and ``agree`` (no grad: both top-1 tokens name the same word, ``vmap['t_word']`` / ``vmap['s_word']``).
    ``vmap``: ``t_ids``, ``s_ids``, ``t_rest``, ``s_rest`` (see ``mapped_kl``). Teacher rows get no gradient."""
    step = chunk_rows_for(max(s_vocab, t_vocab), chunk_rows)
    grad_kinds = [k for k in kinds if k != "agree"]

    def teacher(lo, hi):
        with torch.no_grad():
            return torch.log_softmax(_rows(t_src, t_weight, b[lo:hi], t_row[lo:hi], t_vocab) / temperature, -1)

    def chunk(x, w, lo, hi):
        lq = torch.log_softmax(_rows(x, w, b[lo:hi], s_row[lo:hi], s_vocab) / temperature, -1)
        lp = teacher(lo, hi)
        out = []
        for k in grad_kinds:
            if k == "kl":
                out.append(mapped_kl(lp, lq, vmap["t_ids"], vmap["s_ids"], vmap["t_rest"], vmap["s_rest"]))
            elif k == "uld":
                out.append(sorted_l1(lp.exp(), lq.exp()))
            elif k == "uld_rest":
                out.append(sorted_l1(lp.exp()[:, vmap["t_rest"]], lq.exp()[:, vmap["s_rest"]]))
            else:
                raise ValueError(f"unknown pair term {k!r}")
        return torch.stack(out) if out else lq.new_zeros(0, hi - lo)

    parts, agree = [], []
    n = b.numel()
    for lo in range(0, n, step):
        hi = min(lo + step, n)
        grad = torch.is_grad_enabled() and (s_src.requires_grad or (s_weight is not None and s_weight.requires_grad))
        parts.append(checkpoint(chunk, s_src, s_weight, lo, hi, use_reentrant=False) if grad
                     else chunk(s_src, s_weight, lo, hi))
        if "agree" in kinds:
            with torch.no_grad():
                s_top = _rows(s_src, s_weight, b[lo:hi], s_row[lo:hi], s_vocab).argmax(-1)
                t_top = teacher(lo, hi).argmax(-1)
                sw, tw = vmap["s_word"][s_top], vmap["t_word"][t_top]
                agree.append(((sw == tw) & (sw >= 0)).float())
    stacked = torch.cat(parts, dim=1) if parts else s_src.new_zeros(len(grad_kinds), 0, dtype=torch.float32)
    out = {k: stacked[i] for i, k in enumerate(grad_kinds)}
    if "agree" in kinds:
        out["agree"] = torch.cat(agree) if agree else s_src.new_zeros(0, dtype=torch.float32)
    return out
