"""Cross-tokenizer losses as pure functions: hand-computed values and gradients, ULD's permutation blind spot, the
mapped KL equal to the full KL for one vocabulary, chunked terms equal to unchunked, from hidden states or logits."""
import math

import pytest
import torch
import torch.nn.functional as F

from kd_engine.losses.xtoken import binary_kl, mapped_kl, pair_terms, sorted_l1, token_log_probs


def test_uld_value_and_gradient_by_hand():
    p = torch.tensor([[0.1, 0.7, 0.2]])
    q = torch.tensor([[0.4, 0.6]], requires_grad=True)
    # sorted: p (0.7, 0.2, 0.1), q (0.6, 0.4, 0): |0.1| + |-0.2| + |0.1|
    loss = sorted_l1(p, q)
    assert float(loss.detach()) == pytest.approx(0.4, abs=1e-6)
    loss.sum().backward()
    # d/dq of |0.7 - q_big| + |0.2 - q_small|: q_big = q[1] = 0.6 < 0.7 -> -1; q_small = q[0] = 0.4 > 0.2 -> +1
    assert q.grad.tolist() == [[1.0, -1.0]]


def test_uld_is_zero_for_any_permutation_and_positive_otherwise():
    g = torch.Generator().manual_seed(0)
    p = torch.softmax(torch.randn(4, 50, generator=g), -1)
    perm = p[:, torch.randperm(50, generator=g)]
    assert sorted_l1(p, perm).abs().max() < 1e-6  # its blind spot: which token gets the mass is invisible
    padded = torch.cat([perm, torch.zeros(4, 30)], -1)  # a larger vocabulary with empty tokens: still 0
    assert sorted_l1(p, padded).abs().max() < 1e-6
    assert (sorted_l1(p, torch.softmax(torch.randn(4, 70, generator=g), -1)) > 1e-3).all()


def test_mapped_kl_with_every_token_mapped_is_the_full_kl():
    g = torch.Generator().manual_seed(1)
    lp, lq = torch.log_softmax(torch.randn(5, 20, generator=g), -1), torch.log_softmax(torch.randn(5, 20, generator=g), -1)
    ids = torch.arange(20)
    none = torch.zeros(20, dtype=torch.bool)
    got = mapped_kl(lp, lq, ids, ids, none, none)
    want = F.kl_div(lq, lp, log_target=True, reduction="none").sum(-1)
    assert torch.allclose(got, want, atol=1e-6)
    # shuffled ids on the student side: the same KL once the student's columns are permuted accordingly
    perm = torch.randperm(20, generator=g)
    lq_perm = torch.empty_like(lq)
    lq_perm[:, perm] = lq
    assert torch.allclose(mapped_kl(lp, lq_perm, ids, perm, none, none), want, atol=1e-6)


def test_mapped_kl_partial_map_by_hand_and_never_negative():
    p = torch.tensor([[0.5, 0.3, 0.2]])  # teacher: tokens 0, 1 map; token 2 does not
    q = torch.tensor([[0.25, 0.25, 0.4, 0.1]])  # student: tokens 3, 0 map to the teacher's 0, 1; 1, 2 do not
    t_ids, s_ids = torch.tensor([0, 1]), torch.tensor([3, 0])
    t_rest, s_rest = torch.tensor([False, False, True]), torch.tensor([False, True, True, False])
    got = float(mapped_kl(p.log(), q.log(), t_ids, s_ids, t_rest, s_rest))
    want = 0.5 * math.log(0.5 / 0.1) + 0.3 * math.log(0.3 / 0.25) + 0.2 * math.log(0.2 / 0.65)
    assert got == pytest.approx(want, rel=1e-5)
    g = torch.Generator().manual_seed(2)
    for _ in range(20):
        lp, lq = torch.log_softmax(torch.randn(3, 3, generator=g), -1), torch.log_softmax(torch.randn(3, 4, generator=g), -1)
        assert (mapped_kl(lp, lq, t_ids, s_ids, t_rest, s_rest) > -1e-6).all()


def test_binary_kl_by_hand_zero_when_equal_and_stable_at_the_ends():
    p, q = 0.3, 0.6
    want = p * math.log(p / q) + (1 - p) * math.log((1 - p) / (1 - q))
    assert float(binary_kl(torch.tensor(math.log(p)), torch.tensor(math.log(q)))) == pytest.approx(want, rel=1e-5)
    x = torch.tensor([-1e-9, -0.5, -30.0, -200.0])
    assert binary_kl(x, x).abs().max() < 1e-6
    lq = torch.tensor([-200.0, -1e-9], requires_grad=True)
    out = binary_kl(torch.tensor([-1e-9, -200.0]), lq)
    out.sum().backward()
    assert torch.isfinite(out).all() and torch.isfinite(lq.grad).all() and (out > 0).all()


def _setup(seed=3, b=2, ls=7, lt=9, h=8, vs=13, vt=17):
    g = torch.Generator().manual_seed(seed)
    s_h, t_h = torch.randn(b, ls, h, generator=g, requires_grad=True), torch.randn(b, lt, h, generator=g)
    s_w, t_w = torch.randn(vs + 3, h, generator=g, requires_grad=True), torch.randn(vt, h, generator=g)
    t_ids, s_ids = torch.tensor([0, 2, 5, 7, 11]), torch.tensor([1, 4, 0, 12, 6])
    t_rest = torch.ones(vt, dtype=torch.bool)
    s_rest = torch.ones(vs, dtype=torch.bool)
    t_rest[t_ids], s_rest[s_ids] = False, False
    vmap = {"t_ids": t_ids, "s_ids": s_ids, "t_rest": t_rest, "s_rest": s_rest,
            "t_word": torch.arange(vt) % 5, "s_word": torch.arange(vs) % 5}
    bi, sr, tr = torch.tensor([0, 0, 1, 1, 1]), torch.tensor([0, 3, 1, 2, 6]), torch.tensor([1, 4, 0, 8, 2])
    return s_h, s_w, t_h, t_w, vmap, (bi, sr, tr), vs, vt


@pytest.mark.parametrize("chunk", [1, 2, None])
def test_pair_terms_chunked_from_hidden_states_equal_the_direct_computation(chunk):
    s_h, s_w, t_h, t_w, vmap, (bi, sr, tr), vs, vt = _setup()
    out = pair_terms(s_h, s_w, vs, t_h, t_w, vt, bi, sr, tr, vmap, ("kl", "uld", "uld_rest", "agree"), 2.0,
                     chunk_rows=chunk)
    loss = out["kl"].sum() + out["uld"].sum() + out["uld_rest"].sum()
    loss.backward()
    grads = (s_h.grad.clone(), s_w.grad.clone())
    s_h.grad = s_w.grad = None
    zs = (s_h[bi, sr] @ s_w.t())[:, :vs].float()
    zt = (t_h[bi, tr] @ t_w.t()).float()
    lq, lp = torch.log_softmax(zs / 2.0, -1), torch.log_softmax(zt / 2.0, -1)
    kl = mapped_kl(lp, lq, vmap["t_ids"], vmap["s_ids"], vmap["t_rest"], vmap["s_rest"])
    uld = sorted_l1(lp.exp(), lq.exp())
    rest = sorted_l1(lp.exp()[:, vmap["t_rest"]], lq.exp()[:, vmap["s_rest"]])
    assert torch.allclose(out["kl"], kl, atol=1e-5) and torch.allclose(out["uld"], uld, atol=1e-5)
    assert torch.allclose(out["uld_rest"], rest, atol=1e-5)
    (kl.sum() + uld.sum() + rest.sum()).backward()
    assert torch.allclose(grads[0], s_h.grad, atol=1e-5) and torch.allclose(grads[1], s_w.grad, atol=1e-5)
    agree = (vmap["s_word"][zs.argmax(-1)] == vmap["t_word"][zt.argmax(-1)]).float()
    assert out["agree"].tolist() == agree.tolist()


def test_token_log_probs_chunked_equal_log_softmax_and_logits_path_equals_hidden_path():
    s_h, s_w, *_ = _setup()
    ids = torch.randint(0, 13, (2, 7), generator=torch.Generator().manual_seed(5))
    b, r = torch.tensor([0, 0, 1, 1]), torch.tensor([0, 5, 2, 3])
    got = token_log_probs(s_h, s_w, ids, b, r, 13, chunk_rows=3)
    logits = s_h @ s_w.t()
    want = torch.log_softmax(logits[..., :13].float(), -1)[b, r].gather(1, ids[b, r + 1][:, None])[:, 0]
    assert torch.allclose(got, want, atol=1e-5)
    assert torch.allclose(token_log_probs(logits, None, ids, b, r, 13, chunk_rows=1), want, atol=1e-5)


def test_sorted_l1_with_top_k_of_the_longer_row_equals_sorting_both_in_full():
    g = torch.Generator().manual_seed(6)
    for vp, vq in ((300, 40), (40, 300), (64, 64)):
        p = torch.softmax(3 * torch.randn(5, vp, generator=g), -1)
        q = torch.softmax(3 * torch.randn(5, vq, generator=g), -1)
        width = max(vp, vq)
        ps = F.pad(p.sort(-1, descending=True).values, (0, width - vp))
        qs = F.pad(q.sort(-1, descending=True).values, (0, width - vq))
        assert torch.allclose(sorted_l1(p, q), (ps - qs).abs().sum(-1), atol=1e-6)
        sub = p[:, : vp // 2]  # a remainder that is not a whole distribution
        subs = F.pad(sub.sort(-1, descending=True).values, (0, max(vp // 2, vq) - vp // 2))
        assert torch.allclose(sorted_l1(sub, q), (subs - F.pad(q.sort(-1, descending=True).values,
                                                                   (0, max(vp // 2, vq) - vq))).abs().sum(-1), atol=1e-6)


def test_chunked_terms_never_hold_more_than_a_chunk_of_vocabulary_rows():
    """The README's memory promise, checked op by op: with 64 compared rows in chunks of 8, no tensor created in the
    forward or the backward has more than 8 rows' worth of either vocabulary (the naive path makes 64 x V)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Sizes(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.largest = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in out if isinstance(out, (tuple, list)) else [out]:
                if isinstance(t, torch.Tensor):
                    self.largest = max(self.largest, t.numel())
            return out

    g = torch.Generator().manual_seed(7)
    vs, vt, h, n = 200, 300, 16, 64
    s_h = torch.randn(1, n + 1, h, generator=g, requires_grad=True)
    t_h = torch.randn(1, n + 1, h, generator=g)
    s_w = torch.randn(vs, h, generator=g, requires_grad=True)
    t_w = torch.randn(vt, h, generator=g)
    t_ids, s_ids = torch.arange(0, 150), torch.arange(50, 200)
    t_rest, s_rest = torch.ones(vt, dtype=torch.bool), torch.ones(vs, dtype=torch.bool)
    t_rest[t_ids], s_rest[s_ids] = False, False
    vmap = {"t_ids": t_ids, "s_ids": s_ids, "t_rest": t_rest, "s_rest": s_rest}
    rows = torch.arange(n)
    b = torch.zeros(n, dtype=torch.long)
    with Sizes() as m:
        out = pair_terms(s_h, s_w, vs, t_h, t_w, vt, b, rows, rows, vmap, ("kl", "uld_rest", "uld"), chunk_rows=8)
        lp = token_log_probs(s_h, s_w, torch.randint(0, vs, (1, n + 1), generator=g), b, rows, vs, chunk_rows=8)
        (out["kl"].sum() + out["uld_rest"].sum() + out["uld"].sum() - lp.sum()).backward()
    assert 8 * vt <= m.largest <= 8 * vt * 2 < n * vs  # a chunk's rows (x2 for a padded pair), never all rows
    assert s_w.grad is not None and torch.isfinite(s_w.grad).all()
