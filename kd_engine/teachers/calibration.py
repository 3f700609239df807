"""Label-prior calibration of zero-shot soft labels on the unlabeled text itself.

A zero-shot teacher carries a prior of its own: a sentence encoder puts one class description nearer to most
texts than another (all-MiniLM-L6-v2 on AG News recalls "sports" at 95 % and "science/tech" at 37 %), and an NLI
model entails some hypotheses more readily. Given the soft labels ``p`` (N x K) of the unlabeled corpus and a
target class prior ``pi`` (uniform unless the user knows better), ``prior_weights`` finds per-class weights ``w``
such that the re-normalised labels ``q(x) = p(x) * w / sum(p(x) * w)`` have mean ``pi`` over the corpus
(iterative proportional fitting: ``w_k <- w_k * pi_k / mean_x q_k(x)``; each step is one Sinkhorn half-step, it
converges whenever every class has some mass). Multiplying probabilities by ``w`` adds ``log w`` to the logits, so
the ranking of texts within a class never changes, only the decision boundary between classes moves.

The weights are fitted on the training texts only and the same weights are applied to the evaluation rows, so no
label of the evaluation data is ever seen.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch

from ..errors import KDError


def target_prior(k: int, prior: Optional[Sequence[float]] = None) -> torch.Tensor:
    """The K target class probabilities (uniform when ``prior`` is None), checked and normalised to sum 1."""
    if prior is None or len(prior) == 0:
        return torch.full((k,), 1.0 / k, dtype=torch.float64)
    if len(prior) != k:
        raise KDError(f"class_prior has {len(prior)} values for {k} classes")
    t = torch.tensor([float(v) for v in prior], dtype=torch.float64)
    if not bool(torch.isfinite(t).all()) or bool((t <= 0).any()):
        raise KDError(f"class_prior values must be finite and > 0; got {list(prior)}")
    return t / t.sum()


def apply_weights(probs: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Rows of ``probs`` re-weighted per class and re-normalised (float32, same shape)."""
    q = probs.double() * weights.double()
    return (q / q.sum(-1, keepdim=True).clamp_min(1e-300)).float()


def prior_weights(probs: torch.Tensor, prior: torch.Tensor, iters: int = 1000, tol: float = 1e-7) -> torch.Tensor:
    """Per-class weights (K, float64, max 1) that make the mean of ``apply_weights(probs, w)`` equal ``prior``."""
    if probs.dim() != 2 or probs.shape[0] == 0:
        raise KDError("prior calibration needs an N x K matrix of soft labels with N >= 1")
    p = probs.double()
    mass = p.sum(0)
    if bool((mass <= 0).any()):
        empty = [int(i) for i in torch.nonzero(mass <= 0).flatten()]
        raise KDError(f"prior calibration: the teacher gives no probability to class(es) {empty} on any text")
    prior = prior.double()
    w = torch.ones(p.shape[1], dtype=torch.float64)
    for _ in range(iters):
        q = p * w
        q = q / q.sum(-1, keepdim=True).clamp_min(1e-300)
        mean = q.mean(0)
        if float((mean - prior).abs().max()) < tol:
            break
        w = w * prior / mean.clamp_min(1e-300)
        w = w / w.max()
    return w
