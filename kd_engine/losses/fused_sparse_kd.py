"""Fused, chunked KD from a cached sparse teacher (``losses.sparse_kd``): the student's lm_head matmul, fp32
log-softmax, sparse KL and CE mix, chunk by chunk, so the student's ``[rows x vocab]`` logits never exist beyond one
chunk (what the offline teacher cache needs at LLM scale: with no teacher in memory, the student's logits are the
largest tensor left).

For each chunk of real rows (labels != -100, in row-major order: the order of the cached rows) the forward pass
computes the chunk's logits, the rows of ``sparse_kd.sparse_kl_rows`` and their gradient for the chunk's logits in
closed form (``_sparse_kl_and_grad``; tested equal to autograd through the naive loss), then moves that gradient to
the hidden states and the weight. As in ``fused_kd``, backward only scales the stored gradients, and the two
returned terms must be back-propagated with the same weight.
"""
from __future__ import annotations

from typing import Optional

import torch
from .fused_kd import add_ce_grad_, chunk_grads_, chunk_rows_for, scaled_stored_grads
from .sparse_kd import _xlogy_exp


def _sparse_kl_and_grad(logits, T, ids, logp, log_tail, t_ids, t_logp):
    """Rows of ``sparse_kd.sparse_kl_rows`` and their gradient w.r.t. ``z = logits / T`` (fp32, ``[r, V]``):
    ``q * (sum of the target weights) - (the target weights, scattered)`` with the top-k weights ``p_i``, the
    sampled-tail weights ``p_tail / m`` per draw, or for the tail bucket ``p_tail * q_j / q_tail`` on the tail."""
    log_q = torch.log_softmax(logits / T, -1)
    p_top = logp.exp()
    rows = _xlogy_exp(logp, log_q.gather(1, ids)).sum(-1)
    p_tail = log_tail.exp()
    if t_ids is not None and t_ids.shape[-1] > 0:
        rows = rows + torch.where(p_tail > 0, p_tail * (t_logp - log_q.gather(1, t_ids)).mean(-1),
                                  torch.zeros_like(p_tail))
        g = log_q.exp_().mul_((p_top.sum(-1) + p_tail)[:, None])
        g.scatter_add_(1, ids, -p_top)
        g.scatter_add_(1, t_ids, (-p_tail / t_ids.shape[-1])[:, None].expand_as(t_ids).contiguous())
        return rows, g
    rest = log_q.scatter(1, ids, float("-inf"))
    log_q_tail = torch.logsumexp(rest, -1)
    rows = rows + _xlogy_exp(log_tail, log_q_tail)
    finite = torch.where(torch.isfinite(log_q_tail), log_q_tail, torch.zeros_like(log_q_tail))  # empty tail: 0s
    tail_share = rest.sub_(finite[:, None]).exp_()  # q_j / q_tail on the tail, 0 on the top k
    g = log_q.exp_().mul_((p_top.sum(-1) + p_tail)[:, None])
    g.scatter_add_(1, ids, -p_top)
    g.sub_(tail_share.mul_(p_tail[:, None]))
    return rows, g


class _FusedSparseKD(torch.autograd.Function):
    @staticmethod
    def forward(ctx, s_hidden, s_weight, labels, cached, temperature, alpha, vocab, chunk_rows):
        ids, logp, log_tail, t_ids, t_logp = cached
        flat_h = s_hidden.reshape(-1, s_hidden.shape[-1])
        flat_y = labels.reshape(-1)
        idx = (flat_y != -100).nonzero().squeeze(-1)
        n = idx.numel()
        if ids.shape[0] != n:
            raise ValueError(f"{ids.shape[0]} cached rows for {n} real rows")
        w = s_weight[:vocab].detach().float()
        grad_w = None  # chunk_grads_ makes it
        grad_h = torch.zeros(flat_h.shape, dtype=torch.float32, device=flat_h.device)
        out = torch.zeros(2, dtype=torch.float32, device=flat_h.device)
        T = float(temperature)
        for start in range(0, n, chunk_rows):
            sl = slice(start, start + chunk_rows)
            rows = idx[sl]
            h = flat_h[rows].float()
            logits = h @ w.T
            kd, g = _sparse_kl_and_grad(logits, T, ids[sl], logp[sl], log_tail[sl],
                                        None if t_ids is None else t_ids[sl], None if t_logp is None else t_logp[sl])
            out[0] += alpha * T * T * kd.sum() / n
            g.mul_(alpha * T / n)  # d(alpha * T^2 * KL(z)) / ds with z = s / T, mean over rows
            if alpha < 1.0:
                out[1] += (1.0 - alpha) * add_ce_grad_(g, logits, flat_y[rows], (1.0 - alpha) / n) / n
            del logits
            grad_w = chunk_grads_(g, h, w, rows, grad_h, grad_w)
            del g, h, kd
        ctx.save_for_backward(grad_h, torch.zeros_like(w) if grad_w is None else grad_w)
        ctx.meta = (s_hidden.shape, s_hidden.dtype, s_weight.shape, s_weight.dtype, vocab, alpha)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        gh, gw = scaled_stored_grads(ctx, grad_out, "fused sparse KD")
        return gh, gw, None, None, None, None, None, None


def fused_sparse_kd_vector(student_hidden: torch.Tensor, student_weight: torch.Tensor, labels: torch.Tensor,
                           top_ids: torch.Tensor, top_logp: torch.Tensor, log_tail: torch.Tensor,
                           tail_ids: Optional[torch.Tensor] = None, tail_logp: Optional[torch.Tensor] = None,
                           temperature: float = 1.0, alpha: float = 1.0, vocab_size: Optional[int] = None,
                           chunk_rows: Optional[int] = None) -> torch.Tensor:
    """``sparse_kd.sparse_kd_loss`` as one fp32 vector ``[kd, ce]`` (weighted terms) from the student's hidden states
    ``[..., H]`` (aligned row by row with ``labels``; shift causal LMs first) and output-layer weight ``[V, H]``
    (rows beyond ``vocab_size`` are padding: dropped, zero gradient). Empty mask: zeros that back-propagate."""
    vocab = int(vocab_size or student_weight.shape[0])
    if student_weight.shape[0] < vocab:
        raise ValueError(f"vocab_size {vocab} exceeds the output layer ({student_weight.shape[0]} rows)")
    if student_hidden.shape[:-1] != labels.shape:
        raise ValueError(f"hidden states {tuple(student_hidden.shape)} do not align with labels {tuple(labels.shape)}")
    dev = student_hidden.device
    cached = tuple(None if x is None else x.to(dev) for x in (top_ids, top_logp, log_tail, tail_ids, tail_logp))
    return _FusedSparseKD.apply(student_hidden, student_weight, labels, cached, float(temperature), float(alpha),
                                vocab, chunk_rows_for(vocab, chunk_rows))
