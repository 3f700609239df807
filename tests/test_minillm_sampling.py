"""MiniLLM's teacher-mixed lockstep sampler (KV-cached, causal and encoder-decoder) and the rollout buffer."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from kd_engine.errors import KDError
from kd_engine.losses import minillm as L
from kd_engine.models.response_logits import decoder_inputs, response_logits
from kd_engine.models.sampling import mixed_sample, warp_logits

from test_minillm_core import VOCAB, prompts, tiny_llama, tiny_t5


# ----------------------------------------------------------------------------------------------------------
# the sampler


def test_warp_logits_masks_without_nan():
    x = torch.tensor([[3.0, 2.0, 1.0, 0.0, -1.0]])
    w, inf = warp_logits(x, top_k=2)
    assert inf.tolist() == [[False, False, True, True, True]]
    w, inf = warp_logits(x, top_p=0.7)  # probs ~ .64 .23 .09 ...: keep the first two
    assert inf.tolist() == [[False, False, True, True, True]]
    assert torch.isfinite(F.log_softmax(w, -1)[~inf]).all()
    assert warp_logits(x)[1] is None


def _sample(student, teacher, enc_dec=False, use_cache=True, seed=0, **kw):
    ids, mask = prompts(left_pad=not enc_dec)
    args = dict(max_new_tokens=10, eos_token_id=[2, 7, 11] if not enc_dec else [1, 7, 11], pad_token_id=0, alpha=0.2,
                generator=torch.Generator().manual_seed(seed), use_cache=use_cache)
    args.update(kw)
    return mixed_sample(student, teacher, ids, mask, **args)


def _assert_same_rollout(a, b):
    assert torch.equal(a.response_ids, b.response_ids)
    assert torch.equal(a.response_mask, b.response_mask)
    for x, y in ((a.student_logprobs, b.student_logprobs), (a.teacher_logprobs, b.teacher_logprobs),
                 (a.weights, b.weights)):
        assert torch.allclose(x, y, atol=1e-5)


@pytest.mark.parametrize("kind", ["llama", "t5"])
@pytest.mark.parametrize("mode", [dict(do_sample=False), dict(), dict(top_k=8, top_p=0.9, temperature=0.8)])
def test_cached_equals_uncached(kind, mode):
    if kind == "llama":
        s, t = tiny_llama(16, 1, seed=0), tiny_llama(32, 2, seed=1)
    else:  # different widths: sharing encoder outputs would crash
        s, t = tiny_t5(16, 1, seed=0), tiny_t5(32, 2, seed=1)
    a = _sample(s, t, kind == "t5", use_cache=True, **mode)
    b = _sample(s, t, kind == "t5", use_cache=False, **mode)
    _assert_same_rollout(a, b)
    assert torch.isfinite(a.student_logprobs).all() and torch.isfinite(a.weights).all()
    assert a.response_ids.shape[1] >= 2
    if "top_k" in mode:
        assert a.inf_mask is not None and a.inf_mask.shape == (*a.response_ids.shape, VOCAB)
        kept = ~a.inf_mask.gather(-1, a.response_ids.unsqueeze(-1)).squeeze(-1)
        assert bool(kept[a.response_mask.bool()].all())  # sampled tokens are never masked ones


@pytest.mark.parametrize("kind", ["llama", "t5"])
def test_response_mask_through_first_eos_and_teacher_forced_logprobs_match(kind):
    enc_dec = kind == "t5"
    s, t = (tiny_t5(16, 1), tiny_t5(24, 1, seed=1)) if enc_dec else (tiny_llama(16, 1), tiny_llama(24, 1, seed=1))
    r = _sample(s, t, enc_dec, top_k=12)
    eos = torch.tensor([1, 7, 11] if enc_dec else [2, 7, 11])
    for b in range(r.response_ids.shape[0]):
        row, m = r.response_ids[b], r.response_mask[b]
        hits = torch.isin(row, eos).nonzero()
        n = int(hits[0]) + 1 if len(hits) and bool(m[int(hits[0])]) else row.numel()
        assert m[:n].all() and not m[n:].any()
        assert (row[n:] == 0).all()
    assert bool((r.response_mask.sum(-1) < r.response_ids.shape[1]).any()), "no EOS in the test rollout"
    # teacher forcing recomputes exactly the sampler's log-probs: first PPO minibatch ratio == w
    m = r.response_mask
    for model, old in ((s, r.student_logprobs), (t, r.teacher_logprobs)):
        lg = response_logits(model, r.prompt_ids, r.prompt_mask, r.response_ids, m)
        new = L.token_logprobs(lg, r.response_ids, m, vocab_size=VOCAB, inf_mask=r.inf_mask)
        assert torch.allclose(new, old, atol=1e-5)
    new = L.token_logprobs(response_logits(s, r.prompt_ids, r.prompt_mask, r.response_ids, m), r.response_ids, m,
                           inf_mask=r.inf_mask)
    _, stats = L.ppo_policy_loss(new, r.student_logprobs, torch.ones_like(new), r.weights, m)
    assert torch.allclose(stats["ratio"], L.masked_mean(r.weights, m), atol=1e-5)


@pytest.mark.parametrize("kind", ["llama", "t5"])
def test_alpha_zero_is_plain_student_sampling(kind):
    enc_dec = kind == "t5"
    s, t = (tiny_t5(16, 1), tiny_t5(24, 1, seed=1)) if enc_dec else (tiny_llama(16, 1), tiny_llama(24, 1, seed=1))
    ids, mask = prompts(left_pad=not enc_dec)
    eos = 1 if enc_dec else 2
    torch.manual_seed(5)
    r = mixed_sample(s, t, ids, mask, max_new_tokens=10, eos_token_id=eos, pad_token_id=0, alpha=0.0)
    assert torch.equal(r.weights, torch.ones_like(r.weights))
    torch.manual_seed(5)  # Hugging Face generate, plain student sampling, same RNG stream
    hf = s.generate(input_ids=ids, attention_mask=mask, do_sample=True, top_k=0, top_p=1.0, temperature=1.0,
                    max_new_tokens=10, eos_token_id=eos, pad_token_id=0)
    hf = hf[:, 1:] if enc_dec else hf[:, ids.shape[1]:]
    n = min(hf.shape[1], r.response_ids.shape[1])
    assert n >= 2 and torch.equal(r.response_ids[:, :n], hf[:, :n])
    # and without a teacher at all
    a = _sample(s, t, enc_dec, alpha=0.0, seed=3)
    b = _sample(s, None, enc_dec, alpha=0.0, seed=3)
    assert torch.equal(a.response_ids, b.response_ids) and b.teacher_logprobs is None


def test_student_equals_teacher_rollout():
    s = tiny_llama(16, 1)
    r = _sample(s, copy.deepcopy(s), alpha=0.2)
    m = r.response_mask
    assert torch.allclose(r.student_logprobs, r.teacher_logprobs, atol=1e-6)
    assert torch.allclose(r.weights, torch.ones_like(r.weights), atol=1e-6)
    rew = L.compute_rewards(r.teacher_logprobs, r.student_logprobs, m)
    assert float(rew.abs().max()) < 1e-5


def test_padded_vocab_rows_never_sampled():
    s, t = tiny_llama(16, 1, vocab=VOCAB + 8), tiny_llama(24, 1, vocab=VOCAB + 8, seed=1)
    for m in (s, t):
        with torch.no_grad():
            m.lm_head.weight[VOCAB:] *= 200.0  # padded rows would dominate if they were not dropped
    r = _sample(s, t, vocab_size=VOCAB, max_new_tokens=8)
    assert int(r.response_ids.max()) < VOCAB
    r = _sample(s, t, max_new_tokens=8)
    assert int(r.response_ids.max()) >= VOCAB  # the test can fail: without vocab_size they are sampled


def test_encoder_decoder_start_token_once_and_own_encoders():
    s, t = tiny_t5(16, 1), tiny_t5(32, 2, seed=1)
    seen = {"s": [], "t": []}

    def rec(key):
        def hook(module, args, kwargs):
            seen[key].append((kwargs["input_ids"].clone(), kwargs["encoder_hidden_states"].shape[-1]))
        return hook

    hs = [s.get_decoder().register_forward_pre_hook(rec("s"), with_kwargs=True),
          t.get_decoder().register_forward_pre_hook(rec("t"), with_kwargs=True)]
    try:
        r = _sample(s, t, enc_dec=True)
    finally:
        for h in hs:
            h.remove()
    for key, model, width in (("s", s, 16), ("t", t, 32)):
        calls = seen[key]
        start = model.config.decoder_start_token_id
        assert all(ids.shape[1] == 1 for ids, _ in calls)  # one new token per step (KV cache)
        assert (calls[0][0] == start).all()  # the start token, exactly once
        fed = torch.cat([ids for ids, _ in calls[1:]], dim=1)
        assert torch.equal(fed, r.response_ids[:, : fed.shape[1]])  # then the sampled tokens, no second start
        assert all(w == width for _, w in calls)  # each decoder attends to its OWN encoder
    dec, dmask = decoder_inputs(r.response_ids, r.response_mask, 0)
    assert torch.equal(dec[:, 1:], r.response_ids[:, :-1]) and (dec[:, 0] == 0).all()


def test_bad_inputs_are_clear_errors():
    s = tiny_llama(16, 1)
    ids, mask = prompts(left_pad=False)
    with pytest.raises(KDError, match="left-padded"):
        mixed_sample(s, None, ids, mask, max_new_tokens=2, eos_token_id=2, pad_token_id=0, alpha=0.0)
    ids, mask = prompts()
    with pytest.raises(KDError, match="encoder-decoder"):
        mixed_sample(s, tiny_t5(), ids, mask, max_new_tokens=2, eos_token_id=2, pad_token_id=0)
    with pytest.raises(KDError, match="logit rows"):
        mixed_sample(s, tiny_llama(16, 1, vocab=VOCAB + 4), ids, mask, max_new_tokens=2, eos_token_id=2,
                     pad_token_id=0)
    with pytest.raises(KDError, match="needs a teacher"):
        mixed_sample(s, None, ids, mask, max_new_tokens=2, eos_token_id=2, pad_token_id=0, alpha=0.2)
    mask2 = mask.clone()
    mask2[0] = 0
    with pytest.raises(KDError, match="empty prompt"):
        mixed_sample(s, None, ids, mask2, max_new_tokens=2, eos_token_id=2, pad_token_id=0, alpha=0.0)


def test_rollout_buffer_roundtrip_repads_chunks_of_different_widths():
    from kd_engine.data.rollout_buffer import RolloutBuffer

    s, t = tiny_llama(16, 1), tiny_llama(24, 1, seed=1)
    buf = RolloutBuffer(pad_token_id=0, prompt_padding_side="left")
    rolls = []
    for seed, P in ((0, 6), (1, 4)):
        ids, mask = prompts(B=3, P=P, seed=seed)
        r = mixed_sample(s, t, ids, mask, max_new_tokens=7 - P // 2, eos_token_id=[2, 7, 11], pad_token_id=0,
                         alpha=0.2, generator=torch.Generator().manual_seed(seed))
        rew = L.compute_rewards(r.teacher_logprobs, r.student_logprobs, r.response_mask)
        buf.add(r, rew)
        rolls.append((r, rew))
    assert len(buf) == 6
    mb = buf.collate(list(range(6)))
    # teacher forcing on the re-padded minibatch reproduces the rollout log-probs of every sample
    lg = response_logits(s, mb["prompt_ids"], mb["prompt_mask"], mb["response_ids"], mb["response_mask"])
    lq = L.token_logprobs(lg, mb["response_ids"], mb["response_mask"])
    assert torch.allclose(lq, mb["student_logprobs"], atol=1e-5)
    r0, rew0 = rolls[0]
    n = r0.response_mask.shape[1]
    assert torch.equal(mb["response_mask"][:3, :n], r0.response_mask)
    assert torch.allclose(mb["rewards"][:3, :n], rew0) and torch.allclose(mb["weights"][:3, :n], r0.weights)
    assert bool((mb["prompt_mask"][:, -1] == 1).all())  # left padded
    assert buf.epoch_order(0, 1) == buf.epoch_order(0, 1) != buf.epoch_order(1, 1)
