"""Fused, chunked KD from a cached sparse teacher (``losses.sparse_kd``): the student's lm_head matmul, fp32
log-softmax, sparse KL and CE mix, chunk by chunk, so the student's ``[rows x vocab]`` logits never exist beyond one
chunk (what the offline teacher cache needs at LLM scale: with no teacher in memory, the student's logits are the
largest tensor left).

For each chunk of real rows (labels != -100, in row-major order: the order of the cached rows) the forward pass
computes the chunk's logits, the loss of ``sparse_kd.sparse_kd_loss`` (the same function, so the values agree by
construction) and its gradient for the chunk's logits by autograd on that chunk alone, then moves that gradient
to the hidden states and the weight. As in ``fused_kd``, backward only scales the stored gradients, and the two
returned terms must be back-propagated with the same weight.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from .fused_kd import chunk_rows_for, scaled_stored_grads
from .sparse_kd import sparse_kl_rows


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
        grad_w = torch.zeros_like(w)
        grad_h = torch.zeros(flat_h.shape, dtype=torch.float32, device=flat_h.device)
        out = torch.zeros(2, dtype=torch.float32, device=flat_h.device)
        T = float(temperature)
        for start in range(0, n, chunk_rows):
            sl = slice(start, start + chunk_rows)
            rows = idx[sl]
            h = flat_h[rows].float()
            logits = (h @ w.T).requires_grad_(True)
            with torch.enable_grad():
                kd = sparse_kl_rows(logits, ids[sl], logp[sl], log_tail[sl], T, None,
                                    None if t_ids is None else t_ids[sl], None if t_logp is None else t_logp[sl])
                terms = [alpha * T * T * kd.sum() / n]
                if alpha < 1.0:
                    terms.append((1.0 - alpha) * F.cross_entropy(logits, flat_y[rows], reduction="sum") / n)
                vec = torch.stack(terms)
                (g,) = torch.autograd.grad(vec.sum(), logits)
            out[: vec.numel()] += vec.detach()
            grad_h[rows] = g @ w
            grad_w.addmm_(g.T, h)
            del logits, g, h, kd, vec, terms
        ctx.save_for_backward(grad_h, grad_w)
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
