"""MiniLLM core: loss terms and the toy exactness test (the sampler: test_minillm_sampling.py)."""
from __future__ import annotations

import math
import os
import socket

import pytest
import torch
import torch.nn.functional as F

from kd_engine.losses import minillm as L
from kd_engine.models.sampling import mixed_step

VOCAB = 40  # tokenizer size of the tiny models; some are built with padded logit rows beyond it


# ----------------------------------------------------------------------------------------------------------
# tiny random models (in memory)


def tiny_llama(hidden=16, layers=1, vocab=VOCAB, seed=0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=128, pad_token_id=0,
                      bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)
    return LlamaForCausalLM(cfg).eval()


def tiny_t5(d_model=16, layers=1, vocab=VOCAB, seed=0):
    from transformers import T5Config, T5ForConditionalGeneration

    torch.manual_seed(seed)
    cfg = T5Config(vocab_size=vocab, d_model=d_model, d_kv=8, d_ff=2 * d_model, num_layers=layers, num_heads=2,
                   decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)
    return T5ForConditionalGeneration(cfg).eval()


def prompts(B=4, P=6, seed=0, left_pad=True):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (B, P), generator=g)
    mask = torch.ones_like(ids)
    for b in range(B):  # ragged lengths
        n = b % 3
        if n:
            sl = slice(0, n) if left_pad else slice(P - n, P)
            ids[b, sl], mask[b, sl] = 0, 0
    return ids, mask


def rand_logits(*shape, seed=0, scale=2.0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * scale


# ----------------------------------------------------------------------------------------------------------
# loss terms against hand-computed values


def test_token_logprobs_and_rewards_hand_values():
    logits = torch.log(torch.tensor([[[0.5, 0.25, 0.25], [0.1, 0.2, 0.7]]]))
    tokens = torch.tensor([[0, 2]])
    mask = torch.tensor([[1, 0]])
    lq = L.token_logprobs(logits, tokens, mask)
    assert torch.allclose(lq, torch.tensor([[math.log(0.5), 0.0]]))
    lp = torch.tensor([[math.log(0.25), math.log(0.9)]])
    r = L.compute_rewards(lp, lq, mask, reward_scaling=0.5, cliprange_reward=100.0)
    assert torch.allclose(r, torch.tensor([[2 * math.log(0.5), 0.0]]))
    r = L.compute_rewards(lp, lq, mask, reward_scaling=0.5, cliprange_reward=1.0)
    assert torch.allclose(r, torch.tensor([[-1.0, 0.0]]))


def _reference_advantages(rewards, mask, gamma):
    """The LMOps loop (losses.py `_get_advantages_and_returns`) without whitening, written out per element."""
    B, T = rewards.shape
    out = torch.zeros(B, T)
    for b in range(B):
        for t in range(T):
            s = sum(gamma ** (k - t) * float(rewards[b, k]) for k in range(t, T))
            n = float(mask[b, t:].sum()) or 1.0
            out[b, t] = s / n
    return out * mask


def test_long_term_advantages_match_reference_loop_and_paper_form():
    r = rand_logits(3, 5, seed=1)
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0], [1, 0, 0, 0, 0]], dtype=torch.float32)
    r = r * mask
    a = L.long_term_advantages(r, mask, gamma=0.95, whiten=False)
    assert torch.allclose(a, _reference_advantages(r, mask, 0.95), atol=1e-6)
    # paper form: R_{t+1} = sum_{t' > t} r_t', undiscounted, unnormalised
    a = L.long_term_advantages(r, mask, gamma=1.0, length_norm=False, include_current=False, whiten=False)
    expect = torch.stack([r[:, t + 1 :].sum(-1) for t in range(5)], dim=1) * mask
    assert torch.allclose(a, expect, atol=1e-6)
    # whitening: zero mean, unit variance over real tokens only, zero at padding
    w = L.long_term_advantages(r, mask, whiten=True)
    m = mask.bool()
    assert abs(float(w[m].mean())) < 1e-5 and abs(float(w[m].var(unbiased=False)) - 1) < 1e-3
    assert float(w[~m].abs().max()) == 0.0


def test_ppo_loss_hand_values_and_clipping():
    lq_old = torch.zeros(1, 3)
    lq = torch.tensor([[0.0, math.log(1.5), math.log(0.5)]], requires_grad=True)
    w = torch.tensor([[1.1, 1.0, 1.0]])
    adv = torch.tensor([[1.0, 1.0, -1.0]])
    mask = torch.ones(1, 3)
    loss, stats = L.ppo_policy_loss(lq, lq_old, adv, w, mask, cliprange=0.2)
    # rho = [1.1, 1.5, 0.5]; per token max(-A rho, -A clip(rho)) = [-1.1, -1.2, 0.8]
    assert torch.allclose(loss, torch.tensor((-1.1 - 1.2 + 0.8) / 3), atol=1e-6)
    assert abs(float(stats["clipfrac"]) - 2 / 3) < 1e-6
    loss.backward()
    # clipped tokens (2 and 3) give no gradient; token 1: d(-A w e^{lq})/dlq / 3 = -1.1 / 3
    assert torch.allclose(lq.grad, torch.tensor([[-1.1 / 3, 0.0, 0.0]]), atol=1e-6)


def test_importance_weights_hand_values():
    lq, lp = torch.log(torch.tensor([[0.5, 0.1]])), torch.log(torch.tensor([[0.25, 0.9]]))
    w = L.importance_weights(lq, lp, alpha=0.2)
    assert torch.allclose(w, torch.tensor([[0.5 / 0.45, 0.1 / 0.26]]), atol=1e-6)
    assert torch.equal(L.importance_weights(lq, lp, alpha=0.0), torch.ones(1, 2))


def test_single_step_kl_is_exact_and_student_only():
    s = rand_logits(2, 3, 5, seed=2).requires_grad_(True)
    t = rand_logits(2, 3, 5, seed=3).requires_grad_(True)
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    got = L.single_step_reverse_kl(s, t, mask)
    per = (F.softmax(s, -1) * (F.log_softmax(s, -1) - F.log_softmax(t, -1))).sum(-1)
    assert torch.allclose(got, (per * mask).sum() / 3, atol=1e-6)
    got.backward()
    assert t.grad is None and s.grad is not None and float(s.grad[0, 2].abs().sum()) == 0.0


def test_pretrain_loss_hand_values_and_inf_safe():
    s = rand_logits(2, 4, 6, seed=4)
    s[0, 0, 3] = float("-inf")
    s.requires_grad_(True)
    t = rand_logits(2, 4, 6, seed=5)
    labels = torch.tensor([[1, 2, -100, 4], [0, -100, -100, -100]])
    out = L.pretrain_loss(s, labels, t, kd_ratio=0.5)
    valid = labels != -100
    lm = F.cross_entropy(s.detach().reshape(-1, 6), labels.reshape(-1), ignore_index=-100)
    logq = F.log_softmax(s.detach(), -1).masked_fill(torch.isinf(s.detach()), 0)
    kd = (-(F.softmax(t, -1) * logq).sum(-1))[valid].mean()
    assert torch.allclose(out["lm"], lm, atol=1e-6) and torch.allclose(out["kd"], kd, atol=1e-6)
    assert torch.allclose(out["pt"], 0.5 * lm + 0.5 * kd, atol=1e-6)
    out["pt"].backward()
    assert torch.isfinite(s.grad).all()
    assert torch.allclose(L.pretrain_loss(s, labels)["pt"], lm)


def test_k3_estimator():
    lq = torch.log(torch.tensor([[0.5, 0.2]]))
    lp = torch.log(torch.tensor([[0.25, 0.4]]))
    d = lp - lq
    expect = (d.exp() - 1 - d).sum()
    assert torch.allclose(L.k3_reverse_kl(lq, lp, torch.ones(1, 2)), expect)
    assert float(L.k3_reverse_kl(lq, lq, torch.ones(1, 2))) == 0.0


def test_all_masked_batch_gives_finite_zero_losses():
    B, T, V = 2, 4, 7
    s = rand_logits(B, T, V, seed=6).requires_grad_(True)
    t = rand_logits(B, T, V, seed=7)
    tok = torch.randint(0, V, (B, T))
    mask = torch.zeros(B, T)
    lq = L.token_logprobs(s, tok, mask)
    r = L.compute_rewards(L.token_logprobs(t, tok, mask), lq, mask)
    adv = L.long_term_advantages(r, mask)
    pg, stats = L.ppo_policy_loss(lq, lq.detach(), adv, torch.ones(B, T), mask)
    reg = L.single_step_reverse_kl(s, t, mask)
    pt = L.pretrain_loss(s, torch.full((B, T), -100), t)
    terms = [pg, reg, pt["pt"], pt["lm"], pt["kd"], L.k3_reverse_kl(lq, lq, mask), *stats.values()]
    for x in terms:
        assert torch.isfinite(x) and float(x.detach()) == 0.0
    (pg + reg + pt["pt"]).backward()
    assert torch.isfinite(s.grad).all() and float(s.grad.abs().sum()) == 0.0


def test_student_equals_teacher_gives_zero_terms():
    B, T, V = 3, 5, 11
    logits = rand_logits(B, T, V, seed=8).requires_grad_(True)
    tok = torch.randint(0, V, (B, T))
    mask = torch.ones(B, T)
    mask[1, 3:] = 0
    lq = L.token_logprobs(logits, tok, mask)
    lp = L.token_logprobs(logits.detach().clone(), tok, mask)
    r = L.compute_rewards(lp, lq, mask)
    assert float(r.abs().max()) == 0.0
    adv = L.long_term_advantages(r, mask)  # 0 / sqrt(0 + eps) = 0
    assert float(adv.abs().max()) == 0.0
    w = L.importance_weights(lq, lp, 0.2, mask)
    assert torch.allclose(w, torch.ones_like(w), atol=1e-6)
    pg, _ = L.ppo_policy_loss(lq, lq.detach(), adv, w, mask)
    reg = L.single_step_reverse_kl(logits, logits.detach().clone(), mask)
    assert float(pg.detach()) == 0.0 and abs(float(reg.detach())) < 1e-6
    (pg + reg).backward()
    assert float(logits.grad.abs().max()) < 1e-6


def test_padded_vocab_rows_do_not_affect_losses():
    B, T, V, Vpad = 2, 3, 6, 9
    s = rand_logits(B, T, Vpad, seed=9)
    t = rand_logits(B, T, Vpad, seed=10)
    s[..., V:] = 30.0  # padded rows with large logits must be ignored
    t[..., V:] = -30.0
    tok = torch.randint(0, V, (B, T))
    labels = tok.clone()
    mask = torch.ones(B, T)
    a = (L.token_logprobs(s, tok, mask, vocab_size=V), L.single_step_reverse_kl(s, t, mask, vocab_size=V),
         L.pretrain_loss(s, labels, t, vocab_size=V)["pt"])
    b = (L.token_logprobs(s[..., :V], tok, mask), L.single_step_reverse_kl(s[..., :V], t[..., :V], mask),
         L.pretrain_loss(s[..., :V], labels, t[..., :V])["pt"])
    for x, y in zip(a, b):
        assert torch.allclose(x, y)
    assert not torch.allclose(L.token_logprobs(s, tok, mask), a[0])  # the rows would matter without vocab_size


def _whiten_worker(rank, world, port, x, mask, out_path):
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    half = x.shape[0] // world
    sl = slice(rank * half, (rank + 1) * half)
    w = L.masked_whiten(x[sl], mask[sl], distributed=True)
    gathered = [torch.zeros_like(w) for _ in range(world)]
    dist.all_gather(gathered, w)
    if rank == 0:
        torch.save(torch.cat(gathered), out_path)
    dist.destroy_process_group()


@pytest.mark.multirank
def test_whitening_across_two_ranks_equals_global(tmp_path):
    import torch.multiprocessing as mp

    x = rand_logits(4, 5, seed=11)
    mask = (torch.rand(4, 5, generator=torch.Generator().manual_seed(12)) > 0.3).float()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tmp_path / "w.pt"
    mp.start_processes(_whiten_worker, args=(2, port, x, mask, str(out)), nprocs=2, join=True, start_method="spawn")
    assert torch.allclose(torch.load(out), L.masked_whiten(x, mask, distributed=False), atol=1e-6)
    # and a per-rank whitening would differ
    assert not torch.allclose(torch.load(out)[:2], L.masked_whiten(x[:2], mask[:2], distributed=False), atol=1e-3)


# ----------------------------------------------------------------------------------------------------------
# toy exactness (the MiniLLM policy-gradient estimator is exact in expectation): tabular autoregressive q, p over
# V = 3 tokens, T = 3 steps

V_TOY, T_TOY = 3, 3
_OFF = [sum(V_TOY**j for j in range(k)) for k in range(T_TOY)]
N_PREFIX = sum(V_TOY**k for k in range(T_TOY))


def _prefix_rows(Y):
    """Row of the logits table for the prefix before each position: [N, T]."""
    rows, code = [], torch.zeros(Y.shape[0], dtype=torch.long)
    for t in range(T_TOY):
        rows.append(_OFF[t] + code)
        code = code * V_TOY + Y[:, t]
    return torch.stack(rows, dim=1)


def _exact_kl(q_table, p_table):
    Y = torch.cartesian_prod(*[torch.arange(V_TOY)] * T_TOY)
    rows, m = _prefix_rows(Y), torch.ones(Y.shape)
    lq = L.token_logprobs(q_table[rows], Y, m).sum(-1)
    lp = L.token_logprobs(p_table[rows], Y, m).sum(-1)
    return (lq.exp() * (lq - lp)).sum()


def _toy_rollout(q_table, p_table, n, alpha, gen):
    """Vectorised over n sequences, one mixed_step per position (the sampler's own step function)."""
    cols = {k: [] for k in ("tok", "lq", "lp", "w")}
    code = torch.zeros(n, dtype=torch.long)
    for t in range(T_TOY):
        row = _OFF[t] + code
        o = mixed_step(q_table.detach()[row], p_table[row], alpha, generator=gen)
        for k, v in zip(cols, (o.tokens, o.student_logprobs, o.teacher_logprobs, o.weights)):
            cols[k].append(v)
        code = code * V_TOY + o.tokens
    return [torch.stack(v, dim=1) for v in cols.values()]


def _estimator_grad(q_table, p_table, Y, lq_old, lp_old, w, form):
    """Gradient of the plugin's loss (same functions) on one batch of rollouts, times T (token mean -> sum)."""
    q = q_table.detach().requires_grad_(True)
    rows, m = _prefix_rows(Y), torch.ones(Y.shape)
    s_logits, t_logits = q[rows], p_table[rows]
    lq = L.token_logprobs(s_logits, Y, m)
    r = L.compute_rewards(lp_old, lq_old, m, reward_scaling=1.0, cliprange_reward=1e9)
    if form == "score":  # (i) plain score function: R_t including r_t, no single-step term
        adv = L.long_term_advantages(r, m, gamma=1.0, length_norm=False, include_current=True, whiten=False)
        loss, _ = L.ppo_policy_loss(lq, lq_old, adv, w, m, cliprange=1e9)
    else:  # (ii) single-step term + long-term R_{t+1}
        adv = L.long_term_advantages(r, m, gamma=1.0, length_norm=False, include_current=False, whiten=False)
        pg, _ = L.ppo_policy_loss(lq, lq_old, adv, w, m, cliprange=0.2)
        loss = pg + L.single_step_reverse_kl(s_logits, t_logits, m)
    (g,) = torch.autograd.grad(loss, q)
    return g * T_TOY


def _mc_gradient(q_table, p_table, alpha, form, seed, n=100_000, chunks=10, seq_weights=False):
    gen = torch.Generator().manual_seed(seed)
    grads = []
    for _ in range(chunks):
        Y, lq, lp, w = _toy_rollout(q_table, p_table, n // chunks, alpha, gen)
        if seq_weights:  # exact sequence-level importance weight prod_t q / p_mix on every token
            w = w.prod(-1, keepdim=True).expand_as(w)
        grads.append(_estimator_grad(q_table, p_table, Y, lq, lp, w, form))
    g = torch.stack(grads)
    return g.mean(0), g.var(0).sum()


def _cos(a, b):
    return float(F.cosine_similarity(a.flatten(), b.flatten(), dim=0))


def test_toy_exactness_reverse_kl_gradient():
    gen = torch.Generator().manual_seed(0)
    q_table = torch.randn(N_PREFIX, V_TOY, generator=gen)
    p_table = torch.randn(N_PREFIX, V_TOY, generator=gen)
    q = q_table.clone().requires_grad_(True)
    (exact,) = torch.autograd.grad(_exact_kl(q, p_table), q)

    report = {}
    for form in ("score", "single+long"):
        est, var = _mc_gradient(q_table, p_table, 0.0, form, seed=1)
        report[form] = (_cos(est, exact), float(var))
        assert _cos(est, exact) > 0.99, (form, report)
    # teacher mixing (alpha = 0.2): exact sequence-level weights are unbiased ...
    est, _ = _mc_gradient(q_table, p_table, 0.2, "score", seed=2, seq_weights=True)
    report["alpha0.2 seq-weights"] = (_cos(est, exact), float((est - exact).norm() / exact.norm()))
    assert _cos(est, exact) > 0.99, report
    # ... the per-token approximation is biased: measure and report it
    for form in ("score", "single+long"):
        est, _ = _mc_gradient(q_table, p_table, 0.2, form, seed=3)
        rel = float((est - exact).norm() / exact.norm())
        report[f"alpha0.2 per-token {form}"] = (_cos(est, exact), rel)
        assert math.isfinite(rel)
    print("\ntoy exactness (cosine, variance or relative error):", report)


def test_toy_first_minibatch_ratio_equals_w():
    gen = torch.Generator().manual_seed(4)
    q_table, p_table = torch.randn(N_PREFIX, V_TOY, generator=gen), torch.randn(N_PREFIX, V_TOY, generator=gen)
    Y, lq_old, lp, w = _toy_rollout(q_table, p_table, 1000, 0.2, gen)
    m = torch.ones(Y.shape)
    lq_new = L.token_logprobs(q_table[_prefix_rows(Y)], Y, m)
    assert torch.allclose(lq_new, lq_old, atol=1e-6)
    _, stats = L.ppo_policy_loss(lq_new, lq_old, torch.ones_like(w), w, m)
    assert torch.allclose(stats["ratio"], w.mean(), atol=1e-6)
    assert float(w.std()) > 0.01  # mixing really reweights
