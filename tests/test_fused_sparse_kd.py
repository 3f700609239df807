"""The fused, chunked cached-teacher loss equals the naive sparse loss on full logits (values and gradients)."""
import pytest
import torch

from kd_engine.losses.fused_sparse_kd import fused_sparse_kd_vector
from kd_engine.losses.sparse_kd import sample_tail, sparse_kd_loss, teacher_rows


def _case(seed=0, rows=(3, 7), hidden=6, vocab=23, padded=27, k=5, m=4, masked=0.3):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(*rows, hidden, generator=g, dtype=torch.float64).float()
    w = torch.randn(padded, hidden, generator=g) * 0.7
    labels = torch.randint(0, vocab, rows, generator=g)
    labels[torch.rand(rows, generator=g) < masked] = -100
    n = int((labels != -100).sum())
    t = torch.randn(n, vocab, generator=g) * 2
    ids, logp, tail, log_p = teacher_rows(t, k)
    t_ids, t_logp = sample_tail(log_p, ids, m, g) if m else (None, None)
    return h, w, labels, (ids, logp, tail, t_ids, t_logp), vocab


def _naive(h, w, labels, cached, T, alpha, vocab):
    logits = h @ w.T
    terms = sparse_kd_loss(logits, labels, *cached[:3], T, alpha, vocab, *cached[3:])
    return torch.stack([terms["kd"], terms.get("ce", torch.zeros(()))])


@pytest.mark.parametrize("m,k", [(0, 5), (4, 5), (0, 23), (4, 23)])  # k = vocab: empty tail
@pytest.mark.parametrize("alpha,T", [(1.0, 1.0), (0.5, 2.0), (0.0, 1.0)])
def test_fused_sparse_equals_naive_values_and_gradients(m, k, alpha, T):
    h, w, labels, cached, vocab = _case(m=m, k=k)
    hs = [h.clone().requires_grad_(True) for _ in range(2)]
    ws = [w.clone().requires_grad_(True) for _ in range(2)]
    want = _naive(hs[0], ws[0], labels, cached, T, alpha, vocab)
    got = fused_sparse_kd_vector(hs[1], ws[1], labels, *cached, temperature=T, alpha=alpha, vocab_size=vocab,
                                 chunk_rows=4)  # several chunks
    assert torch.allclose(got, want, atol=1e-5, rtol=1e-5)
    want.sum().backward()
    got.sum().backward()
    assert torch.isfinite(hs[1].grad).all() and torch.allclose(hs[1].grad, hs[0].grad, atol=1e-5)
    assert torch.allclose(ws[1].grad, ws[0].grad, atol=1e-5)
    assert ws[1].grad[vocab:].abs().max().item() == 0.0  # padded rows
    assert hs[1].grad[labels == -100].abs().max().item() == 0.0  # masked rows get nothing


def test_fused_sparse_empty_mask_and_misaligned_cache():
    h, w, labels, cached, vocab = _case()
    h = h.requires_grad_(True)
    empty = torch.full_like(labels, -100)
    none = tuple(None if x is None else x[:0] for x in cached)
    out = fused_sparse_kd_vector(h, w, empty, *none, vocab_size=vocab)
    out.sum().backward()
    assert out.abs().sum().item() == 0.0 and h.grad.abs().max().item() == 0.0
    with pytest.raises(ValueError, match="cached rows"):
        fused_sparse_kd_vector(h, w, labels, *(None if x is None else x[1:] for x in cached), vocab_size=vocab)
    with pytest.raises(RuntimeError, match="same weight"):
        v = fused_sparse_kd_vector(h, w.requires_grad_(True), labels, *cached, alpha=0.5, vocab_size=vocab)
        (v[0] + 2 * v[1]).backward()
