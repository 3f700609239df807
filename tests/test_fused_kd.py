"""Fused chunked KD loss == naive full-logits loss (values and gradients), and the reference divergences."""
import math

import pytest
import torch

from kd_engine.errors import ConfigError
from kd_engine.losses.divergences import distill_loss, divergence_rows, log_probs
from kd_engine.losses.fused_kd import fused_kd_loss
from kd_engine.losses.kd import kl_div_rows

CASES = [("forward_kl", 0.5), ("reverse_kl", 0.5), ("jsd", 0.5), ("jsd", 0.1), ("jsd", 0.9), ("jsd", 0.0),
         ("jsd", 1.0)]


def _inputs(B=3, n=7, Hs=12, Ht=20, Vs=37, Vt=41, seed=0, pad_rows=True):
    g = torch.Generator().manual_seed(seed)
    hs = torch.randn(B, n, Hs, generator=g, dtype=torch.float64).float().requires_grad_(True)
    ws = (torch.randn(Vs, Hs, generator=g) * 0.5).requires_grad_(True)
    ht = torch.randn(B, n, Ht, generator=g)
    wt = torch.randn(Vt, Ht, generator=g) * 0.5
    vocab = min(Vs, Vt) - 3
    labels = torch.randint(0, vocab, (B, n), generator=g)
    if pad_rows:
        labels[0, :2] = -100
        labels[2, 4:] = -100
    return hs, ws, ht, wt, labels, vocab


def _naive(hs, ws, ht, wt, labels, vocab, **kw):
    return distill_loss(hs @ ws.T, ht @ wt.T, labels, vocab_size=vocab, **kw)


def _both(kw, chunk_rows=4, **shape):
    hs, ws, ht, wt, labels, vocab = _inputs(**shape)
    ref = _naive(hs, ws, ht, wt, labels, vocab, **kw)
    sum(ref.values()).backward()
    ref_g = (hs.grad.clone(), ws.grad.clone())
    hs.grad = ws.grad = None
    got = fused_kd_loss(hs, ws, ht, wt, labels, vocab_size=vocab, chunk_rows=chunk_rows, **kw)
    sum(got.values()).backward()
    return ref, ref_g, got, (hs.grad, ws.grad), vocab


@pytest.mark.parametrize("divergence,beta", CASES)
@pytest.mark.parametrize("temperature,alpha", [(1.0, 1.0), (2.0, 0.5), (0.7, 0.2)])
def test_fused_equals_naive_values_and_gradients(divergence, beta, temperature, alpha):
    kw = dict(divergence=divergence, beta=beta, temperature=temperature, alpha=alpha)
    ref, (gh, gw), got, (fh, fw), vocab = _both(kw)
    assert set(got) == set(ref)
    for k in ref:
        assert got[k].item() == pytest.approx(ref[k].item(), abs=1e-5, rel=1e-5), k
    assert (fh - gh).abs().max().item() < 1e-5
    assert (fw - gw).abs().max().item() < 1e-5
    assert fh.abs().max().item() > 1e-3  # the comparison is not between zeros
    # padded vocab rows of the student's output layer get no gradient; masked rows neither
    assert torch.equal(fw[vocab:], torch.zeros_like(fw[vocab:]))
    assert fh[0, :2].abs().max().item() == 0.0


def test_chunk_size_does_not_change_the_result():
    kw = dict(divergence="jsd", beta=0.3, temperature=2.0, alpha=0.6)
    a = _both(kw, chunk_rows=1)
    b = _both(kw, chunk_rows=1000)
    assert a[2]["kd"].item() == pytest.approx(b[2]["kd"].item(), abs=1e-6)
    assert (a[3][1] - b[3][1]).abs().max().item() < 1e-6


def test_padded_vocab_garbage_is_ignored():
    hs, ws, ht, wt, labels, vocab = _inputs()
    base = fused_kd_loss(hs, ws, ht, wt, labels, vocab_size=vocab, temperature=2.0)["kd"].item()
    ws2, wt2 = ws.detach().clone(), wt.clone()
    ws2[vocab:] = 100.0
    wt2[vocab:] = -100.0
    assert fused_kd_loss(hs, ws2, ht, wt2, labels, vocab_size=vocab, temperature=2.0)["kd"].item() == \
        pytest.approx(base, abs=1e-6)


def test_empty_mask_gives_zero_loss_and_zero_gradients():
    hs, ws, ht, wt, labels, vocab = _inputs()
    labels = torch.full_like(labels, -100)
    terms = fused_kd_loss(hs, ws, ht, wt, labels, vocab_size=vocab, alpha=0.5, divergence="jsd")
    loss = sum(terms.values())
    assert loss.item() == 0.0 and not torch.isnan(loss)
    loss.backward()
    assert hs.grad.abs().max().item() == 0.0 and ws.grad.abs().max().item() == 0.0


def test_beta_endpoints_equal_kd_forward_and_reverse_kl():
    hs, ws, ht, wt, labels, vocab = _inputs(Vs=30, Vt=30, pad_rows=False)
    s, t = (hs @ ws.T).detach(), ht @ wt.T
    T = 2.0
    fwd = fused_kd_loss(hs, ws, ht, wt, labels, divergence="jsd", beta=0.0, temperature=T)["kd"].item()
    assert fwd == pytest.approx(kl_div_rows(s, t, T).item(), rel=1e-5)
    rev = fused_kd_loss(hs, ws, ht, wt, labels, divergence="jsd", beta=1.0, temperature=T)["kd"].item()
    # reverse KL(q || p) is forward KL with the roles swapped
    assert rev == pytest.approx(kl_div_rows(t, s, T).item(), rel=1e-5)
    assert abs(rev - fwd) > 1e-3


def test_jsd_hand_computed_and_bounded():
    s, t, beta = torch.tensor([[1.0, 0.0, -1.0]]), torch.tensor([[0.0, 2.0, 0.5]]), 0.3
    q = torch.softmax(s, -1)[0].tolist()
    p = torch.softmax(t, -1)[0].tolist()
    m = [beta * pi + (1 - beta) * qi for pi, qi in zip(p, q)]
    expected = beta * sum(pi * math.log(pi / mi) for pi, mi in zip(p, m)) + \
        (1 - beta) * sum(qi * math.log(qi / mi) for qi, mi in zip(q, m))
    got = divergence_rows(log_probs(s), log_probs(t), "jsd", beta).item()
    assert got == pytest.approx(expected, rel=1e-6)
    # bounded by the (weighted) entropy bound of the mixture: at most -(beta log beta + (1-beta) log(1-beta))
    assert 0 < got <= -(beta * math.log(beta) + (1 - beta) * math.log(1 - beta))


def test_bf16_inputs_match_fp32_on_the_same_values():
    hs, ws, ht, wt, labels, vocab = _inputs()
    hb, wb = hs.detach().bfloat16().requires_grad_(True), ws.detach().bfloat16().requires_grad_(True)
    got = fused_kd_loss(hb, wb, ht.bfloat16(), wt.bfloat16(), labels, vocab_size=vocab, temperature=2.0)
    ref = fused_kd_loss(hb.float(), wb.float(), ht.bfloat16().float(), wt.bfloat16().float(), labels,
                        vocab_size=vocab, temperature=2.0)
    assert got["kd"].dtype == torch.float32
    assert got["kd"].item() == pytest.approx(ref["kd"].item(), rel=1e-5)
    got["kd"].backward()
    assert hb.grad.dtype == torch.bfloat16 and wb.grad.dtype == torch.bfloat16


def test_terms_backpropagated_with_different_weights_are_refused():
    hs, ws, ht, wt, labels, vocab = _inputs()
    terms = fused_kd_loss(hs, ws, ht, wt, labels, vocab_size=vocab, alpha=0.5)
    with pytest.raises(RuntimeError, match="same weight"):
        (terms["kd"] + 2 * terms["ce"]).backward()


def test_bad_beta_and_divergence_are_config_errors():
    hs, ws, ht, wt, labels, vocab = _inputs()
    with pytest.raises(ConfigError, match="beta"):
        fused_kd_loss(hs, ws, ht, wt, labels, divergence="jsd", beta=1.5)
    with pytest.raises(ConfigError, match="divergence"):
        fused_kd_loss(hs, ws, ht, wt, labels, divergence="kl")
