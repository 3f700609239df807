"""Logit KD losses against hand-computed values and the sanity checks of methods.md §1."""
import math

import pytest
import torch

from kd_engine.losses.kd import hard_cross_entropy, kl_div_rows, logit_kd_loss, shift_for_causal_lm, \
    soft_cross_entropy_rows


def _softmax(xs):
    m = max(xs)
    e = [math.exp(x - m) for x in xs]
    return [v / sum(e) for v in e]


def test_kl_matches_hand_computation_with_temperature():
    s, t, T = [1.0, 2.0, 0.5], [0.2, 1.5, 2.5], 2.0
    p, q = _softmax([x / T for x in t]), _softmax([x / T for x in s])
    expected = T * T * sum(pi * (math.log(pi) - math.log(qi)) for pi, qi in zip(p, q))
    got = kl_div_rows(torch.tensor([s]), torch.tensor([t]), temperature=T)
    assert got.item() == pytest.approx(expected, rel=1e-6)


def test_kl_is_zero_for_a_copy_and_grad_is_zero():
    logits = torch.randn(3, 5, 11)
    s = logits.clone().requires_grad_(True)
    loss = kl_div_rows(s, logits, temperature=3.0)
    loss.backward()
    assert abs(loss.item()) < 1e-6
    assert s.grad.abs().max().item() < 1e-6


def test_mask_selects_rows_and_matches_mean_of_real_rows():
    s, t = torch.randn(2, 4, 7), torch.randn(2, 4, 7)
    mask = torch.tensor([[1, 1, 0, 0], [1, 0, 0, 0]], dtype=torch.bool)
    rows = [kl_div_rows(s[b, i:i + 1], t[b, i:i + 1], 2.0) for b, i in [(0, 0), (0, 1), (1, 0)]]
    assert kl_div_rows(s, t, 2.0, mask).item() == pytest.approx(sum(r.item() for r in rows) / 3, rel=1e-5)
    # garbage in padded rows must not matter
    s2 = s.clone()
    s2[0, 3] = 1e4
    assert kl_div_rows(s2, t, 2.0, mask).item() == pytest.approx(kl_div_rows(s, t, 2.0, mask).item(), rel=1e-6)


def test_empty_mask_gives_zero_with_graph():
    s = torch.randn(2, 3, 5, requires_grad=True)
    loss = kl_div_rows(s, torch.randn(2, 3, 5), 1.0, torch.zeros(2, 3, dtype=torch.bool))
    assert loss.item() == 0.0 and not torch.isnan(loss)
    loss.backward()
    assert torch.equal(s.grad, torch.zeros_like(s))
    ce = hard_cross_entropy(s, torch.full((2, 3), -100))
    assert ce.item() == 0.0


def test_padded_vocab_rows_are_dropped():
    s, t = torch.randn(4, 6), torch.randn(4, 6)
    s_pad = torch.cat([s, torch.full((4, 3), 50.0)], -1)  # extra logit rows beyond the tokenizer
    t_pad = torch.cat([t, torch.full((4, 3), -50.0)], -1)
    assert kl_div_rows(s_pad, t_pad, 2.0, vocab_size=6).item() == pytest.approx(kl_div_rows(s, t, 2.0).item(),
                                                                                 rel=1e-6)


def test_fp32_inside_for_bf16_inputs():
    s, t = torch.randn(8, 50), torch.randn(8, 50)
    ref = kl_div_rows(s.bfloat16().float(), t.bfloat16().float(), 2.0)
    got = kl_div_rows(s.bfloat16(), t.bfloat16(), 2.0)
    assert got.dtype == torch.float32
    assert got.item() == pytest.approx(ref.item(), rel=1e-6)


def test_alpha_mix_and_hard_term():
    s, t = torch.randn(5, 3), torch.randn(5, 3)
    y = torch.tensor([0, 2, 1, 1, 0])
    terms = logit_kd_loss(s, t, y, temperature=2.0, alpha=0.3)
    assert terms["kd"].item() == pytest.approx(0.3 * kl_div_rows(s, t, 2.0).item(), rel=1e-6)
    assert terms["ce"].item() == pytest.approx(0.7 * torch.nn.functional.cross_entropy(s, y).item(), rel=1e-6)
    assert set(logit_kd_loss(s, t, y, alpha=1.0)) == {"kd"}


def test_token_level_uses_labels_as_mask_after_shift():
    B, n, V = 2, 5, 9
    s, t = torch.randn(B, n, V), torch.randn(B, n, V)
    labels = torch.randint(0, V, (B, n))
    labels[1, 3:] = -100
    ss, lab = shift_for_causal_lm(s, labels)
    tt, _ = shift_for_causal_lm(t, labels)
    assert ss.shape == (B, n - 1, V) and torch.equal(lab, labels[:, 1:])
    terms = logit_kd_loss(ss, tt, lab, temperature=1.0, alpha=0.5)
    mask = lab != -100
    assert terms["kd"].item() == pytest.approx(0.5 * kl_div_rows(ss, tt, 1.0, mask).item(), rel=1e-6)


def test_t_squared_keeps_gradient_scale():
    """Hinton: soft-target gradients scale as 1/T^2, the T^2 factor compensates (roughly constant norm)."""
    torch.manual_seed(0)
    t = torch.randn(64, 10) * 0.5
    norms = []
    for T in (2.0, 4.0, 8.0):
        s = (torch.randn(64, 10) * 0.5).requires_grad_(True)
        torch.manual_seed(1)
        kl_div_rows(s, t, T).backward()
        norms.append(s.grad.norm().item())
    assert max(norms) / min(norms) < 3.0


def test_soft_cross_entropy_differs_from_kl_by_teacher_entropy_and_masks_inf():
    s, t = torch.randn(4, 5), torch.randn(4, 5)
    p = torch.softmax(t, -1)
    ent = -(p * torch.log(p)).sum(-1).mean()
    assert soft_cross_entropy_rows(s, p).item() == pytest.approx(kl_div_rows(s, t, 1.0).item() + ent.item(),
                                                                 rel=1e-5)
    s_inf = s.clone()
    s_inf[:, 0] = float("-inf")
    p0 = p.clone()
    p0[:, 0] = 0.0
    assert torch.isfinite(soft_cross_entropy_rows(s_inf, p0))


@pytest.mark.parametrize("n_real", [7, 2], ids=["dense-rows-masked-after", "sparse-rows-gathered-first"])
def test_both_row_paths_match_per_row_reference_values_and_gradients(n_real):
    """kl_div_rows computes every row and masks the per-row KL when >= 3/4 of the rows are real, else gathers the
    real rows first: both give the per-row float64 reference, padded rows get no gradient even with huge logits."""
    torch.manual_seed(0)
    s, t = torch.randn(1, 8, 13), torch.randn(1, 8, 13)
    s[0, 7] = 1e4  # garbage in a padded row
    mask = torch.zeros(1, 8, dtype=torch.bool)
    mask[0, :n_real] = True
    ref = sum(torch.nn.functional.kl_div(torch.log_softmax(s[0, i].double() / 2, -1),
                                         torch.log_softmax(t[0, i].double() / 2, -1), log_target=True,
                                         reduction="sum").item() for i in range(n_real)) * 4 / n_real
    x = s.clone().requires_grad_(True)
    loss = kl_div_rows(x, t, 2.0, mask)
    loss.backward()
    assert loss.item() == pytest.approx(ref, rel=1e-5)
    assert torch.isfinite(x.grad).all() and x.grad[0, n_real:].abs().max().item() == 0.0
    assert x.grad[0, :n_real].abs().max().item() > 0
