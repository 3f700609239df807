"""Fused, chunked logit KD: the lm_head matmul, fp32 log-softmax, divergence and CE mix, chunk by chunk.

Inputs are the final hidden states (what enters the output layer) and the output-layer weights of both models,
never their logits. For each chunk of real rows (labels != -100) the forward pass computes the chunk's student
and teacher logits, the loss and, right away, the gradient of the loss for the chunk's hidden states and the
student weight (accumulated over chunks, in fp32). Backward only scales the stored gradients, so no
``[rows x vocab]`` tensor of either model exists beyond one chunk at any time (peak ~ a few chunk-sized fp32
buffers + one fp32 ``[V, H]`` weight gradient), whereas the naive path keeps ``[rows x V]`` logits,
log-probabilities and their gradients for both models.

Gradients w.r.t. the student's scaled logits ``z = s / T`` for ``q = softmax(z)``, teacher ``p``:
forward KL ``q - p``; for the others ``q * (g - sum(q * g))`` with ``g = dD/dq``: reverse KL
``g = log q - log p + 1``, generalized JSD ``g = (1 - beta) (log q - log m)`` (the other terms cancel).
The hard-label CE uses ``softmax(s) - onehot(y)`` at T = 1.

The two returned terms (``kd``, ``ce``) share one stored gradient ``alpha * dkd + (1 - alpha) * dce``: they must
be back-propagated with the same weight (their sum, possibly scaled, as the trainer does); anything else raises.
"""
from __future__ import annotations

from typing import Optional

import torch

from .divergences import check_divergence, effective_divergence, mixture_log_probs

DEFAULT_CHUNK_ELEMENTS = 1 << 24  # rows per chunk = this // vocab (64 MiB per fp32 chunk buffer)


def chunk_rows_for(vocab: int, chunk_rows: Optional[int] = None) -> int:
    return int(chunk_rows) if chunk_rows else max(16, DEFAULT_CHUNK_ELEMENTS // max(vocab, 1))


def _divergence_and_grad(log_q: torch.Tensor, log_p: torch.Tensor, div: str, beta: float):
    """Per-row divergence and its gradient w.r.t. the scaled student logits (fp32, ``[r, V]``)."""
    q = log_q.exp()
    if div == "forward_kl":
        p = log_p.exp()
        rows = (torch.xlogy(p, p) - p * log_q).sum(-1)
        return rows, q.sub_(p)
    if div == "reverse_kl":
        g = log_q - log_p
        rows = (q * g).sum(-1)
        return rows, g.sub_(rows[:, None]).mul_(q)
    log_m = mixture_log_probs(log_q, log_p, beta)
    p = log_p.exp()
    rows = beta * (p * (log_p - log_m)).sum(-1) + (1.0 - beta) * (q * (log_q - log_m)).sum(-1)
    g = log_q.sub(log_m).mul_(1.0 - beta)
    return rows, g.sub_((q * g).sum(-1, keepdim=True)).mul_(q)


def add_ce_grad_(g: torch.Tensor, logits: torch.Tensor, y: torch.Tensor, weight: float) -> torch.Tensor:
    """Adds ``weight * (softmax(logits) - onehot(y))`` to ``g`` in place; returns the chunk's summed CE (T = 1)."""
    log_q1 = torch.log_softmax(logits, -1)
    ce = -log_q1.gather(1, y[:, None]).sum()
    q1 = log_q1.exp_()
    q1[torch.arange(q1.shape[0], device=q1.device), y] -= 1.0
    g.add_(q1, alpha=weight)
    return ce


def chunk_grads_(g, h, w, rows, grad_h, grad_w):
    """The chunk's logit gradient ``g`` moved to its hidden states (written into ``grad_h[rows]``) and to the weight
    (the first chunk's ``g.T @ h``, then accumulated: no zero-filled ``[V, H]`` pass); returns ``grad_w``."""
    grad_h[rows] = g @ w
    return g.T @ h if grad_w is None else grad_w.addmm_(g.T, h)


class _FusedKD(torch.autograd.Function):
    @staticmethod
    def forward(ctx, s_hidden, s_weight, t_hidden, t_weight, labels, div, beta, temperature, alpha, vocab,
                chunk_rows):
        flat_h = s_hidden.reshape(-1, s_hidden.shape[-1])
        flat_t = t_hidden.reshape(-1, t_hidden.shape[-1])
        flat_y = labels.reshape(-1)
        idx = (flat_y != -100).nonzero().squeeze(-1)
        n = idx.numel()
        w_s = s_weight[:vocab].float()
        w_t = t_weight[:vocab].detach().float()
        grad_w = None  # chunk_grads_ makes it
        grad_h = torch.zeros(flat_h.shape, dtype=torch.float32, device=flat_h.device)
        kd_sum = torch.zeros((), dtype=torch.float32, device=flat_h.device)
        ce_sum = torch.zeros_like(kd_sum)
        T = float(temperature)
        with_ce = alpha < 1.0
        for start in range(0, n, chunk_rows):
            rows = idx[start:start + chunk_rows]
            h = flat_h[rows].float()
            with torch.no_grad():
                t_logits = flat_t[rows].float() @ w_t.T
                log_p = torch.log_softmax(t_logits.div_(T), -1)
                del t_logits
            s_logits = h @ w_s.T
            log_q = torch.log_softmax(s_logits / T, -1)
            kd_rows, g = _divergence_and_grad(log_q, log_p, div, beta)
            del log_q, log_p
            kd_sum += kd_rows.sum()
            g.mul_(alpha * T / n)  # d(alpha * T^2 * D(z)) / ds with z = s / T, mean over rows
            if with_ce:
                ce_sum += add_ce_grad_(g, s_logits, flat_y[rows], (1.0 - alpha) / n)
            del s_logits
            grad_w = chunk_grads_(g, h, w_s, rows, grad_h, grad_w)
            del g, h
        ctx.save_for_backward(grad_h, torch.zeros_like(w_s) if grad_w is None else grad_w)
        ctx.meta = (s_hidden.shape, s_hidden.dtype, s_weight.shape, s_weight.dtype, vocab, alpha)
        if n == 0:
            return torch.zeros(2, dtype=torch.float32, device=flat_h.device)
        return torch.stack([alpha * T * T * kd_sum / n, (1.0 - alpha) * ce_sum / n])

    @staticmethod
    def backward(ctx, grad_out):
        gh, gw = scaled_stored_grads(ctx, grad_out, "fused KD")
        return gh, gw, None, None, None, None, None, None, None, None, None


def scaled_stored_grads(ctx, grad_out: torch.Tensor, name: str):
    """Backward of a fused loss that stored ``(grad_h, grad_w)`` in forward (``ctx.meta`` = hidden shape/dtype,
    weight shape/dtype, vocab, alpha): scale them by the upstream gradient of its ``[kd, ce]`` vector."""
    if getattr(ctx, "used", False):  # the stored gradients are scaled in place below
        raise RuntimeError(f"{name}: backward through the same loss twice is not supported")
    ctx.used = True
    grad_h, grad_w = ctx.saved_tensors
    h_shape, h_dtype, w_shape, w_dtype, vocab, alpha = ctx.meta
    same = torch.equal(grad_out[0], grad_out[1]) or bool(grad_out.isnan().all())  # NaN: the guard skips it
    if 0.0 < alpha < 1.0 and not same:
        raise RuntimeError(f"{name}: the kd and ce terms must be back-propagated with the same weight "
                           "(sum them before backward)")
    scale = grad_out[0] if alpha > 0.0 else grad_out[1]
    gh = gw = None
    if ctx.needs_input_grad[0]:
        gh = (grad_h * scale).to(h_dtype).reshape(h_shape)
    if ctx.needs_input_grad[1]:
        if not bool(scale == 1.0):
            grad_w.mul_(scale)  # in place: no second [V, H] buffer
        if vocab == w_shape[0] and w_dtype == grad_w.dtype:
            gw = grad_w
        else:
            gw = torch.zeros(w_shape, dtype=w_dtype, device=grad_w.device)
            gw[:vocab] = grad_w
    return gh, gw


def fused_kd_loss(student_hidden: torch.Tensor, student_weight: torch.Tensor, teacher_hidden: torch.Tensor,
                  teacher_weight: torch.Tensor, labels: torch.Tensor, divergence: str = "forward_kl",
                  beta: float = 0.5, temperature: float = 1.0, alpha: float = 1.0,
                  vocab_size: Optional[int] = None, chunk_rows: Optional[int] = None) -> dict[str, torch.Tensor]:
    """``alpha * T^2 * mean D(p_T, q_T) + (1 - alpha) * CE(labels, q)`` over rows with labels != -100.

    ``student_hidden`` ``[..., Hs]`` and ``teacher_hidden`` ``[..., Ht]`` are the inputs of the two output
    layers, aligned row by row with ``labels`` ``[...]`` (shift causal LMs first); ``student_weight`` ``[Vs, Hs]``
    and ``teacher_weight`` ``[Vt, Ht]`` their weights (no bias). Weight rows beyond ``vocab_size`` (padding) are
    dropped for both models and get a zero gradient. The teacher gets no gradient. Returns ``{"kd", "ce"}``
    (``ce`` only when ``alpha < 1``), equal to ``divergences.distill_loss`` on the full logits; an empty mask
    gives zeros that still back-propagate (zero gradients).

    ZeRO-3: the weights must be whole when this is called. ``models.lm_head`` runs it inside the student's
    output-layer forward, where DeepSpeed's own module hooks have gathered the student weight (and reduce its
    gradient as for any layer), and gathers the teacher's weight with ``deepspeed.zero.GatheredParameters``.
    """
    out = fused_kd_vector(student_hidden, student_weight, teacher_hidden, teacher_weight, labels, divergence,
                          beta, temperature, alpha, vocab_size, chunk_rows)
    return terms_of(out, alpha)


def terms_of(vector: torch.Tensor, alpha: float) -> dict[str, torch.Tensor]:
    """``{"kd", "ce"}`` from the loss vector (``ce`` only when ``alpha < 1``)."""
    return {"kd": vector[0], "ce": vector[1]} if alpha < 1.0 else {"kd": vector[0]}


def fused_kd_vector(student_hidden, student_weight, teacher_hidden, teacher_weight, labels,
                    divergence: str = "forward_kl", beta: float = 0.5, temperature: float = 1.0, alpha: float = 1.0,
                    vocab_size: Optional[int] = None, chunk_rows: Optional[int] = None) -> torch.Tensor:
    """``fused_kd_loss`` as one fp32 vector ``[kd, ce]`` (weighted terms), e.g. to return from a model's head."""
    check_divergence(divergence, beta)
    vocab = int(vocab_size or min(student_weight.shape[0], teacher_weight.shape[0]))
    if student_weight.shape[0] < vocab or teacher_weight.shape[0] < vocab:
        raise ValueError(f"vocab_size {vocab} exceeds an output layer ({student_weight.shape[0]} / "
                         f"{teacher_weight.shape[0]} rows)")
    if student_hidden.shape[:-1] != labels.shape or teacher_hidden.shape[:-1] != labels.shape:
        raise ValueError(f"hidden states {tuple(student_hidden.shape)} / {tuple(teacher_hidden.shape)} do not "
                         f"align with labels {tuple(labels.shape)}")
    div = effective_divergence(divergence, float(beta))
    return _FusedKD.apply(student_hidden, student_weight, teacher_hidden, teacher_weight, labels, div,
                          float(beta), float(temperature), float(alpha), vocab, chunk_rows_for(vocab, chunk_rows))

