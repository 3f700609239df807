"""MiniLMv2 self-attention relation loss (Wang et al. 2021; reference code bloomberg/minilmv2.bb), as pure
functions of tensors.

For each pair (a, b) in {(Q,Q), (K,K), (V,V)} the concatenated-head tensors ``(B, n, d_h)`` are re-split into
``A_r`` relation heads of width ``d_r = d_h / A_r`` (teacher and student each with their own ``d_r``), and

    Rel_ab = softmax_row(A_a A_b^T / sqrt(d_r))
    L_ab   = mean_over_batch[ 1/(A_r n_b) * sum_{r, i real} KL(Rel^T_ab[r, i, :] || Rel^S_ab[r, i, :]) ]

with ``n_b`` the number of real tokens of example b. Padding is masked on both axes without slicing, so left
and right padding give the same value: padded key columns get a large negative logit (probability exactly 0),
padded query rows are dropped from the sum; an example with no real token contributes 0 (it still counts in
the batch mean, as in the reference code's division by B). Everything runs in fp32; the teacher is detached.

Memory: a relation is ``B * A_r * n^2`` floats per model (1.6 GB in fp32 at B=32, A_r=48, n=512). With
``chunk_size`` set, the (batch x relation head) pairs are processed ``chunk_size`` at a time and the gradient
with respect to the student's Q/K/V is computed chunk by chunk in the same pass (d KL / d logits =
p_student - p_teacher), so neither the forward nor the backward ever holds more than a few chunk-sized
``chunk_size * n^2`` tensors; nothing of size ``B * A_r * n^2`` is kept for backward.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence, Union

import torch

from ..errors import KDError

_NEG = torch.finfo(torch.float32).min
RELATIONS = ("qq", "kk", "vv")
# "auto" chunk size: about 2^24 fp32 elements (64 MiB) per chunk-sized tensor
_AUTO_CHUNK_ELEMENTS = 1 << 24

ChunkSize = Union[int, str, None]


def split_relation_heads(x: torch.Tensor, num_relation_heads: int) -> torch.Tensor:
    """``(B, n, d)`` concatenated heads -> ``(B, A_r, n, d / A_r)`` relation heads."""
    if x.dim() != 3:
        raise KDError(f"expected a (batch, seq, hidden) tensor, got shape {tuple(x.shape)}")
    if not isinstance(num_relation_heads, int) or num_relation_heads < 1:
        raise KDError(f"num_relation_heads must be a positive integer, got {num_relation_heads!r}")
    b, n, d = x.shape
    if d % num_relation_heads:
        raise KDError(
            f"num_relation_heads={num_relation_heads} does not divide the Q/K/V width {d}; "
            f"choose a divisor of both the teacher's and the student's width"
        )
    return x.view(b, n, num_relation_heads, d // num_relation_heads).permute(0, 2, 1, 3)


def resolve_chunk_size(chunk_size: ChunkSize, seq_len: int) -> Optional[int]:
    """``None`` (no chunking), a positive int (pairs per chunk) or ``"auto"`` (about 64 MiB per n x n block)."""
    if chunk_size is None:
        return None
    if chunk_size == "auto":
        return max(1, _AUTO_CHUNK_ELEMENTS // max(1, seq_len * seq_len))
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise KDError(f"chunk_size must be a positive integer, 'auto' or None, got {chunk_size!r}")
    return chunk_size


def _pairs(x: torch.Tensor, mask: torch.Tensor, num_relation_heads: int) -> tuple[torch.Tensor, float]:
    """(B, n, d) -> fp32 (B * A_r, n, d_r) with pair index b * A_r + r, and 1/sqrt(d_r).

    Padded positions are zeroed first, so whatever a model leaves there (even NaN) cannot leak into the loss
    or its gradient.
    """
    h = split_relation_heads(x.float().masked_fill(~mask[:, :, None], 0.0), num_relation_heads)
    b, a, n, dr = h.shape
    return h.reshape(b * a, n, dr), 1.0 / math.sqrt(dr)


def _check(t_a, t_b, s_a, s_b, attention_mask) -> torch.Tensor:
    if t_a.shape != t_b.shape or s_a.shape != s_b.shape:
        raise KDError(
            f"relation inputs must have equal shapes per model: teacher {tuple(t_a.shape)} vs {tuple(t_b.shape)}, "
            f"student {tuple(s_a.shape)} vs {tuple(s_b.shape)}"
        )
    if t_a.dim() != 3 or s_a.dim() != 3:
        raise KDError(f"expected (batch, seq, hidden) tensors, got {tuple(t_a.shape)} and {tuple(s_a.shape)}")
    if t_a.shape[:2] != s_a.shape[:2]:
        raise KDError(
            f"teacher and student (batch, seq) differ: {tuple(t_a.shape[:2])} vs {tuple(s_a.shape[:2])}; "
            "token relations need the same tokenization on both sides"
        )
    b, n = s_a.shape[:2]
    if attention_mask is None:
        return torch.ones(b, n, dtype=torch.bool, device=s_a.device)
    if tuple(attention_mask.shape) != (b, n):
        raise KDError(f"attention_mask shape {tuple(attention_mask.shape)} does not match (batch, seq) = {(b, n)}")
    return attention_mask.to(device=s_a.device).bool()


def _teacher_log_probs(t_a, t_b, key_pad, scale):
    logits = torch.bmm(t_a, t_b.transpose(1, 2)).mul_(scale)
    return torch.log_softmax(logits.masked_fill_(key_pad, _NEG), dim=-1)


def _naive(t_a, t_b, s_a, s_b, mask, weight, scale_t, scale_s) -> torch.Tensor:
    """Whole-tensor computation with ordinary autograd (the reference for the chunked path)."""
    key_pad = ~mask[:, None, :]
    with torch.no_grad():
        t_logp = _teacher_log_probs(t_a, t_b, key_pad, scale_t)
        t_p = t_logp.exp()
    s_logits = torch.bmm(s_a, s_b.transpose(1, 2)) * scale_s
    s_logp = torch.log_softmax(s_logits.masked_fill(key_pad, _NEG), dim=-1)
    kl = (t_p * (t_logp - s_logp)).masked_fill(key_pad, 0.0).sum(-1)  # (P, n) per query row
    return ((kl * mask).sum(-1) * weight).sum()


def _chunked(t_a, t_b, s_a, s_b, mask, weight, scale_t, scale_s, chunk, need_a, need_b):
    """Loss and, if asked, its gradients w.r.t. s_a / s_b, ``chunk`` pairs at a time (no autograd graph)."""
    total = torch.zeros((), dtype=torch.float32, device=s_a.device)
    g_a = torch.zeros_like(s_a) if need_a else None
    g_b = torch.zeros_like(s_b) if need_b else None
    for lo in range(0, s_a.shape[0], chunk):
        sl = slice(lo, lo + chunk)
        m = mask[sl]
        key_pad = ~m[:, None, :]
        t_logp = _teacher_log_probs(t_a[sl], t_b[sl], key_pad, scale_t)
        t_p = t_logp.exp()
        s_logits = torch.bmm(s_a[sl], s_b[sl].transpose(1, 2)).mul_(scale_s)
        s_logp = torch.log_softmax(s_logits.masked_fill_(key_pad, _NEG), dim=-1)
        del s_logits
        row_w = m.float() * weight[sl, None]  # (c, n): 1/(B A_r n_b) on real query rows, 0 elsewhere
        kl = t_logp.sub_(s_logp).mul_(t_p).masked_fill_(key_pad, 0.0).sum(-1)
        total += (kl * row_w).sum()
        del t_logp, kl
        if need_a or need_b:
            # d/d logits of sum_j p_t log(p_t / p_s) is p_s - p_t on every row with a real key
            g = s_logp.exp_().sub_(t_p).mul_(row_w[:, :, None] * scale_s)
            if need_a:
                g_a[sl] = torch.bmm(g, s_b[sl])
            if need_b:
                g_b[sl] += torch.bmm(g.transpose(1, 2), s_a[sl])
            del g
        del s_logp, t_p
    return total, g_a, g_b


class _ChunkedRelationKL(torch.autograd.Function):
    @staticmethod
    def forward(ctx, t_a, t_b, s_a, s_b, mask, weight, scale_t, scale_s, chunk):
        need_a, need_b = ctx.needs_input_grad[2], ctx.needs_input_grad[3]
        total, g_a, g_b = _chunked(t_a, t_b, s_a, s_b, mask, weight, scale_t, scale_s, chunk, need_a, need_b)
        ctx.save_for_backward(g_a, g_b)
        return total

    @staticmethod
    def backward(ctx, grad_out):
        g_a, g_b = ctx.saved_tensors
        return (
            None,
            None,
            None if g_a is None else g_a * grad_out,
            None if g_b is None else g_b * grad_out,
            None,
            None,
            None,
            None,
            None,
        )


def relation_kl(
    t_a: torch.Tensor,
    t_b: torch.Tensor,
    s_a: torch.Tensor,
    s_b: torch.Tensor,
    attention_mask: Optional[torch.Tensor],
    num_relation_heads: int,
    chunk_size: ChunkSize = None,
) -> torch.Tensor:
    """KL(teacher relation || student relation) for one (a, b) pair, averaged as in the reference code
    (bloomberg/minilmv2.bb, ``minilmv2.py``).

    ``t_*``: teacher ``(B, n, d_t)``; ``s_*``: student ``(B, n, d_s)``; ``attention_mask``: ``(B, n)`` (1 = real
    token, any padding side) or None. ``chunk_size``: (batch x relation head) pairs per chunk, ``"auto"``, or
    None for the whole-tensor computation. Returns an fp32 scalar; gradients flow to the student side only.
    """
    mask = _check(t_a, t_b, s_a, s_b, attention_mask)
    a_r = num_relation_heads
    ta, scale_t = _pairs(t_a.detach(), mask, a_r)
    tb = ta if t_b is t_a else _pairs(t_b.detach(), mask, a_r)[0]
    sa, scale_s = _pairs(s_a, mask, a_r)
    sb = sa if s_b is s_a else _pairs(s_b, mask, a_r)[0]
    b, n = mask.shape
    n_real = mask.sum(-1)  # (B,)
    w = torch.where(n_real > 0, 1.0 / (a_r * n_real.clamp(min=1).float() * b), torch.zeros((), device=mask.device))
    pair_mask = mask[:, None, :].expand(b, a_r, n).reshape(b * a_r, n)
    pair_w = w[:, None].expand(b, a_r).reshape(b * a_r)
    chunk = resolve_chunk_size(chunk_size, n)
    if chunk is None:
        return _naive(ta, tb, sa, sb, pair_mask, pair_w, scale_t, scale_s)
    if not (torch.is_grad_enabled() and (sa.requires_grad or sb.requires_grad)):
        return _chunked(ta, tb, sa, sb, pair_mask, pair_w, scale_t, scale_s, chunk, False, False)[0]
    return _ChunkedRelationKL.apply(ta, tb, sa, sb, pair_mask, pair_w, scale_t, scale_s, chunk)


def relation_probs(
    a: torch.Tensor, b: torch.Tensor, attention_mask: Optional[torch.Tensor], num_relation_heads: int
) -> torch.Tensor:
    """The relation matrices ``softmax(A_a A_b^T / sqrt(d_r))`` as ``(B, A_r, n, n)`` fp32 (padded keys -> 0).

    For inspection and tests; the loss never materialises them for the whole batch when chunked.
    """
    mask = _check(a, b, a, b, attention_mask)
    ha, hb = split_relation_heads(a, num_relation_heads).float(), split_relation_heads(b, num_relation_heads).float()
    logits = ha @ hb.transpose(-1, -2) / math.sqrt(ha.shape[-1])
    return torch.softmax(logits.masked_fill(~mask[:, None, None, :], _NEG), dim=-1)


def minilm_v2_loss(
    teacher_qkv: Sequence[torch.Tensor],
    student_qkv: Sequence[torch.Tensor],
    attention_mask: Optional[torch.Tensor],
    num_relation_heads: int = 48,
    weights: Sequence[float] = (1.0, 1.0, 1.0),
    chunk_size: ChunkSize = "auto",
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """``sum_ab w_ab L_ab`` over Q-Q, K-K, V-V. Returns ``(total, {"qq": L_qq, "kk": L_kk, "vv": L_vv})``.

    The dict holds the unweighted relation losses (for logging); relations with weight 0 are skipped.
    """
    if len(teacher_qkv) != 3 or len(student_qkv) != 3:
        raise KDError("teacher_qkv and student_qkv must each be a (Q, K, V) triple")
    if len(weights) != 3:
        raise KDError(f"weights must be three numbers (Q-Q, K-K, V-V), got {weights!r}")
    total = None
    terms: dict[str, torch.Tensor] = {}
    for name, t, s, w in zip(RELATIONS, teacher_qkv, student_qkv, weights):
        if w == 0:
            continue
        term = relation_kl(t, t, s, s, attention_mask, num_relation_heads, chunk_size)
        terms[name] = term
        total = w * term if total is None else total + w * term
    if total is None:
        raise KDError("all MiniLMv2 relation weights are 0: nothing to distil")
    return total, terms
