"""MiniLMv2 relation loss and Q/K/V adapters: methods.md §2.6 sanity checks on tiny random models (CPU)."""
from __future__ import annotations

import copy
import math

import pytest
import torch
import transformers as tf

from kd_engine.errors import KDError
from kd_engine.losses.minilm import minilm_v2_loss, relation_kl, relation_probs, split_relation_heads
from kd_engine.models.qkv import get_adapter

torch.set_num_threads(1)


# ---------------------------------------------------------------------------------------------------------
# a plain-python reference of methods.md §2.1 item 5 (bloomberg style: slice each example to [:n_b, :n_b])
def _ref_relation_kl(t_a, t_b, s_a, s_b, lengths, a_r):
    """Nested python loops and ``math`` only; inputs are nested lists [b][i][feature]; right padding."""

    def rel_logprobs(a, b, n_b, r, width):
        dr = width // a_r
        rows = []
        for i in range(n_b):
            logits = [
                sum(a[i][r * dr + c] * b[j][r * dr + c] for c in range(dr)) / math.sqrt(dr) for j in range(n_b)
            ]
            mx = max(logits)
            lse = mx + math.log(sum(math.exp(x - mx) for x in logits))
            rows.append([x - lse for x in logits])
        return rows

    total = 0.0
    for b, n_b in enumerate(lengths):
        if n_b == 0:
            continue
        ex = 0.0
        for r in range(a_r):
            lt = rel_logprobs(t_a[b], t_b[b], n_b, r, len(t_a[b][0]))
            ls = rel_logprobs(s_a[b], s_b[b], n_b, r, len(s_a[b][0]))
            for i in range(n_b):
                ex += sum(math.exp(lt[i][j]) * (lt[i][j] - ls[i][j]) for j in range(n_b))
        total += ex / (a_r * n_b)
    return total / len(lengths)


def _right_mask(lengths, n):
    return (torch.arange(n)[None, :] < torch.tensor(lengths)[:, None]).long()


# ---------------------------------------------------------------------------------------------------------
# loss: shapes, hand-computed values, masking, chunking
def test_split_relation_heads_shape_and_layout():
    x = torch.randn(8, 128, 768)
    h = split_relation_heads(x, 48)
    assert h.shape == (8, 48, 128, 16)
    # relation head r of token i is the r-th slice of 16 features of the concatenated heads
    assert torch.equal(h[3, 5, 7], x[3, 7, 80:96])


def test_hand_computed_two_tokens():
    # B=1, n=2, d=2, A_r=1: teacher Q = I, student Q = [[1, 1], [0, 2]]
    t = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])
    s = torch.tensor([[[1.0, 1.0], [0.0, 2.0]]])
    r2 = math.sqrt(2.0)
    t_rows = [[1 / r2, 0.0], [0.0, 1 / r2]]  # Q Q^T / sqrt(2)
    s_rows = [[2 / r2, 2 / r2], [2 / r2, 4 / r2]]

    def softmax(row):
        e = [math.exp(x) for x in row]
        return [x / sum(e) for x in e]

    kl = 0.0
    for tr, sr in zip(t_rows, s_rows):
        p, q = softmax(tr), softmax(sr)
        kl += sum(pi * math.log(pi / qi) for pi, qi in zip(p, q))
    expected = kl / (1 * 2)  # / (A_r * n_b), batch of 1
    for chunk in (None, 1):
        got = relation_kl(t, t, s, s, torch.ones(1, 2), 1, chunk_size=chunk)
        assert got.item() == pytest.approx(expected, rel=1e-6, abs=1e-7)


@pytest.mark.parametrize("chunk", [None, 1, 5])
def test_matches_python_reference_with_own_relation_widths(chunk):
    torch.manual_seed(0)
    lengths, n, a_r = [5, 2, 3], 5, 2
    t_a, t_b = torch.randn(3, n, 8), torch.randn(3, n, 8)  # teacher d_r = 4
    s_a, s_b = torch.randn(3, n, 4), torch.randn(3, n, 4)  # student d_r = 2
    mask = _right_mask(lengths, n)
    got = relation_kl(t_a, t_b, s_a, s_b, mask, a_r, chunk_size=chunk)
    ref = _ref_relation_kl(t_a.tolist(), t_b.tolist(), s_a.tolist(), s_b.tolist(), lengths, a_r)
    assert got.item() == pytest.approx(ref, rel=1e-5, abs=1e-7)


@pytest.mark.parametrize("chunk", [None, 4])
@pytest.mark.parametrize("side", ["right", "left"])
def test_padding_invariance_tensors(side, chunk):
    torch.manual_seed(1)
    lengths, n, a_r = [6, 3, 1, 4], 6, 4
    t = [torch.randn(1, L, 16) for L in lengths]
    s = [torch.randn(1, L, 8) for L in lengths]
    # padded batch with NaN in the padding: nothing of it may reach the value or the gradient
    tp = torch.full((4, n, 16), float("nan"))
    sp = torch.full((4, n, 8), float("nan"))
    mask = torch.zeros(4, n, dtype=torch.long)
    for b, L in enumerate(lengths):
        pos = slice(0, L) if side == "right" else slice(n - L, n)
        tp[b, pos], sp[b, pos], mask[b, pos] = t[b][0], s[b][0], 1
    sp.requires_grad_(True)
    got = relation_kl(tp, tp, sp, sp, mask, a_r, chunk_size=chunk)
    (g,) = torch.autograd.grad(got, sp)
    per = []
    for b in range(4):
        sb = s[b].clone().requires_grad_(True)
        lb = relation_kl(t[b], t[b], sb, sb, None, a_r, chunk_size=chunk)
        (gb,) = torch.autograd.grad(lb / 4, sb)
        per.append(lb.item())
        pos = slice(0, lengths[b]) if side == "right" else slice(n - lengths[b], n)
        torch.testing.assert_close(g[b, pos], gb[0], rtol=1e-5, atol=1e-7)
    assert got.item() == pytest.approx(sum(per) / 4, rel=1e-5)
    assert torch.isfinite(g).all() and (g[mask == 0] == 0).all()


@pytest.mark.parametrize("chunk", [None, 2])
def test_empty_examples_contribute_zero_without_nan(chunk):
    torch.manual_seed(2)
    t, s = torch.randn(2, 4, 8), torch.randn(2, 4, 8, requires_grad=True)
    mask = torch.tensor([[1, 1, 1, 0], [0, 0, 0, 0]])
    loss = relation_kl(t, t, s, s, mask, 2, chunk_size=chunk)
    alone = relation_kl(t[:1, :3], t[:1, :3], s[:1, :3], s[:1, :3], None, 2, chunk_size=chunk)
    assert loss.item() == pytest.approx(alone.item() / 2, rel=1e-6)  # the empty example counts as 0 in the mean
    empty = relation_kl(t, t, s, s, torch.zeros(2, 4), 2, chunk_size=chunk)
    (g,) = torch.autograd.grad(empty, s)
    assert empty.item() == 0.0 and torch.isfinite(g).all() and (g == 0).all()


@pytest.mark.parametrize("chunk", [1, 3, 7, 1000])
def test_chunked_equals_unchunked_value_and_grads(chunk):
    torch.manual_seed(3)
    B, n, a_r = 3, 9, 4
    t_a, t_b = torch.randn(B, n, 24), torch.randn(B, n, 24)
    s_a = torch.randn(B, n, 16, dtype=torch.float64).float().requires_grad_(True)
    s_b = torch.randn(B, n, 16).requires_grad_(True)
    mask = torch.tensor([[1] * 9, [0, 0, 1, 1, 1, 1, 1, 0, 0], [1] * 4 + [0] * 5])
    ref = relation_kl(t_a, t_b, s_a, s_b, mask, a_r, chunk_size=None)
    g_ref = torch.autograd.grad(ref, [s_a, s_b])
    got = relation_kl(t_a, t_b, s_a, s_b, mask, a_r, chunk_size=chunk)
    g_got = torch.autograd.grad(got, [s_a, s_b])
    assert got.item() == pytest.approx(ref.item(), rel=1e-6)
    for a, b in zip(g_got, g_ref):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-8)
    # same tensor on both sides (the Q-Q case): both gradient contributions are summed
    ref = relation_kl(t_a, t_a, s_a, s_a, mask, a_r, chunk_size=None)
    (g_ref,) = torch.autograd.grad(ref * 3.0, s_a)
    got = relation_kl(t_a, t_a, s_a, s_a, mask, a_r, chunk_size=chunk)
    (g_got,) = torch.autograd.grad(got * 3.0, s_a)  # upstream gradient is applied
    torch.testing.assert_close(g_got, g_ref, rtol=1e-5, atol=1e-8)


def test_teacher_gets_no_gradient_and_bf16_inputs_run_in_fp32():
    torch.manual_seed(4)
    t = torch.randn(2, 5, 8, requires_grad=True)
    s = torch.randn(2, 5, 8).bfloat16().requires_grad_(True)
    for chunk in (None, 2):
        loss = relation_kl(t, t, s, s, None, 2, chunk_size=chunk)
        assert loss.dtype == torch.float32
        loss.backward()
        assert t.grad is None and s.grad is not None and s.grad.dtype == torch.bfloat16


def test_minilm_v2_loss_sums_weighted_relations():
    torch.manual_seed(5)
    tq = [torch.randn(2, 6, 16) for _ in range(3)]
    sq = [torch.randn(2, 6, 8) for _ in range(3)]
    mask = _right_mask([6, 4], 6)
    total, terms = minilm_v2_loss(tq, sq, mask, num_relation_heads=4, weights=(1.0, 0.5, 2.0), chunk_size=3)
    assert set(terms) == {"qq", "kk", "vv"}
    for name, x, y in zip(("qq", "kk", "vv"), tq, sq):
        assert terms[name].item() == pytest.approx(relation_kl(x, x, y, y, mask, 4).item(), rel=1e-6)
    assert total.item() == pytest.approx(terms["qq"].item() + 0.5 * terms["kk"].item() + 2 * terms["vv"].item())
    _, terms = minilm_v2_loss(tq, sq, mask, num_relation_heads=4, weights=(1, 0, 1))
    assert set(terms) == {"qq", "vv"}
    with pytest.raises(KDError, match="all MiniLMv2 relation weights are 0"):
        minilm_v2_loss(tq, sq, mask, num_relation_heads=4, weights=(0, 0, 0))


def test_bad_inputs_raise_kderror():
    t, s = torch.randn(2, 5, 32), torch.randn(2, 5, 24)
    with pytest.raises(KDError, match="does not divide the Q/K/V width 24"):
        relation_kl(t, t, s, s, None, 16)  # 16 divides 32 but not 24
    with pytest.raises(KDError, match="does not divide"):
        minilm_v2_loss([t] * 3, [s] * 3, None)  # default 48 relation heads
    with pytest.raises(KDError, match="same tokenization"):
        relation_kl(t, t, s[:, :4], s[:, :4], None, 4)
    with pytest.raises(KDError, match="attention_mask shape"):
        relation_kl(t, t, s, s, torch.ones(2, 4), 4)
    with pytest.raises(KDError, match="chunk_size"):
        relation_kl(t, t, s, s, None, 4, chunk_size=0)


# ---------------------------------------------------------------------------------------------------------
# models: tiny random configs of every supported family
def _tiny(kind: str, seed: int = 0, hidden: int = 32, layers: int = 3):
    torch.manual_seed(seed)
    common = dict(vocab_size=64, max_position_embeddings=64)
    if kind == "bert":
        cfg = tf.BertConfig(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=4,
                            intermediate_size=48, **common)
    elif kind == "roberta":
        cfg = tf.RobertaConfig(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=4,
                               intermediate_size=48, pad_token_id=1, **common)
    elif kind == "xlm-roberta":
        cfg = tf.XLMRobertaConfig(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=4,
                                  intermediate_size=48, pad_token_id=1, **common)
    elif kind == "distilbert":
        cfg = tf.DistilBertConfig(dim=hidden, n_layers=layers, n_heads=4, hidden_dim=48, **common)
    elif kind == "llama":  # grouped-query attention: 4 query heads share 2 KV heads
        cfg = tf.LlamaConfig(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=4,
                             num_key_value_heads=2, intermediate_size=48, **common)
    elif kind == "qwen3":  # per-head q/k RMSNorm before the rotary embedding
        cfg = tf.Qwen3Config(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=4, head_dim=hidden // 4,
                             num_key_value_heads=2, intermediate_size=48, **common)
    else:
        raise ValueError(kind)
    return tf.AutoModel.from_config(cfg, attn_implementation="eager").eval()


KINDS = ["bert", "roberta", "xlm-roberta", "distilbert", "llama", "qwen3"]


def _batch(seed=0, B=3, n=7, lengths=(7, 4, 5), left=False):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(2, 64, (B, n), generator=g)  # avoid RoBERTa's pad id 1
    mask = _right_mask(list(lengths), n)
    if left:
        mask = mask.flip(-1)
    return ids, mask


def _causal_attention_probs(q, k, mask, heads):
    """softmax(q k^T / sqrt(d_head)) with a causal and key-padding mask, per head, in plain torch."""
    B, n, d = q.shape
    qh = q.view(B, n, heads, d // heads).transpose(1, 2)
    kh = k.view(B, n, heads, d // heads).transpose(1, 2)
    scores = qh @ kh.transpose(-1, -2) / math.sqrt(d // heads)
    allowed = torch.ones(n, n, dtype=torch.bool).tril()[None, None] & mask.bool()[:, None, None, :]
    return scores.masked_fill(~allowed, float("-inf")).softmax(-1)


@pytest.mark.parametrize("kind", KINDS)
def test_student_copy_of_teacher_gives_zero_loss(kind):
    teacher = _tiny(kind)
    student = copy.deepcopy(teacher)
    ids, mask = _batch()
    ad_t, ad_s = get_adapter(teacher), get_adapter(student)
    with torch.no_grad():
        tq = ad_t.qkv(teacher, ids, mask, -1)
    sq = ad_s.qkv(student, ids, mask, ad_s.num_layers - 1)
    for chunk in (None, 2):
        total, terms = minilm_v2_loss(tq, sq, mask, num_relation_heads=8, chunk_size=chunk)
        assert abs(total.item()) <= 1e-6, terms
    # a different student is far from zero (random init at std 0.02 gives near-uniform relations, so the
    # absolute value is small: compare with the copy's value instead)
    other = _tiny(kind, seed=1)
    sq = get_adapter(other).qkv(other, ids, mask, -1)
    assert minilm_v2_loss(tq, sq, mask, num_relation_heads=8)[0].item() > 1e-5 > 10 * abs(total.item())


@pytest.mark.parametrize("kind", ["bert", "roberta", "xlm-roberta", "distilbert"])
def test_qk_relation_with_one_relation_head_per_attention_head_is_the_attention(kind):
    model = _tiny(kind)
    ids, mask = _batch(seed=3)
    ad = get_adapter(model)
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, output_attentions=True)
        for layer in range(ad.num_layers):
            q, k, _ = ad.qkv(model, ids, mask, layer)
            rel = relation_probs(q, k, mask, ad.num_heads)  # A_r = number of attention heads
            real = mask.bool()[:, None, :, None].expand_as(rel)  # compare real query rows
            torch.testing.assert_close(rel[real], out.attentions[layer][real], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kind", ["llama", "qwen3"])
def test_llama_adapter_reproduces_attention_with_rope_and_repeated_kv_heads(kind):
    model = _tiny(kind)
    ad = get_adapter(model)
    assert (ad.num_heads, ad.num_kv_heads, ad.hidden_size) == (4, 2, 32)
    ids, mask = _batch(seed=4, left=True)
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, output_attentions=True, output_hidden_states=True)
        for layer in range(ad.num_layers):
            q, k, v = ad.qkv(model, ids, mask, layer)
            assert q.shape == k.shape == v.shape == (3, 7, 32)
            probs = _causal_attention_probs(q, k, mask, ad.num_heads)
            real = mask.bool()[:, None, :, None].expand_as(probs)
            torch.testing.assert_close(probs[real], out.attentions[layer][real], rtol=1e-5, atol=1e-6)
            # V = v_proj(input_layernorm(layer input)), KV head h // 2 serving query head h
            blk = model.layers[layer]
            v_ref = blk.self_attn.v_proj(blk.input_layernorm(out.hidden_states[layer])).view(3, 7, 2, 8)
            torch.testing.assert_close(v.view(3, 7, 4, 8), v_ref.repeat_interleave(2, dim=2))


@pytest.mark.parametrize("kind", ["bert", "distilbert"])
def test_qkv_is_the_projection_of_the_layer_input_and_stops_early(kind):
    model = _tiny(kind)
    ad = get_adapter(model)
    ids, mask = _batch(seed=5)
    layers = model.encoder.layer if kind == "bert" else model.transformer.layer
    ran = []
    h = layers[-1].register_forward_hook(lambda *a: ran.append(1))
    try:
        with torch.no_grad():
            q, k, v = ad.qkv(model, ids, mask, 0)
        assert ran == []  # the forward stopped inside layer 0
        with torch.no_grad():
            hs = model(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states
    finally:
        h.remove()
    attn = layers[0].attention.self if kind == "bert" else layers[0].attention
    names = ("query", "key", "value") if kind == "bert" else ("q_lin", "k_lin", "v_lin")
    for got, name in zip((q, k, v), names):
        torch.testing.assert_close(got, getattr(attn, name)(hs[0]))


@pytest.mark.parametrize("kind,left", [("bert", False), ("llama", True), ("llama", False)])
def test_padding_invariance_through_models(kind, left):
    teacher, student = _tiny(kind, seed=0), _tiny(kind, seed=1, hidden=16, layers=2)
    ids, mask = _batch(seed=6, left=left)
    at, as_ = get_adapter(teacher), get_adapter(student)
    with torch.no_grad():
        padded, _ = minilm_v2_loss(at.qkv(teacher, ids, mask, -1), as_.qkv(student, ids, mask, -1), mask, 4)
        per = []
        for b in range(ids.shape[0]):
            real = mask[b].bool()
            x = ids[b : b + 1, real]
            per.append(minilm_v2_loss(at.qkv(teacher, x, None, -1), as_.qkv(student, x, None, -1), None, 4)[0])
    assert padded.item() == pytest.approx(torch.stack(per).mean().item(), rel=1e-5)


def test_gradient_reaches_student_only():
    teacher, student = _tiny("bert"), _tiny("bert", seed=1, hidden=16, layers=2)
    ids, mask = _batch(seed=7)
    student.train()
    with torch.no_grad():
        tq = get_adapter(teacher).qkv(teacher, ids, mask, -2)
    loss, _ = minilm_v2_loss(tq, get_adapter(student).qkv(student, ids, mask, -1), mask, 4, chunk_size=2)
    loss.backward()
    assert all(p.grad is None for p in teacher.parameters())
    grads = [p.grad for p in student.encoder.layer[-1].attention.self.parameters()]
    assert all(g is not None and g.abs().sum() > 0 for g in grads)


def test_layer_out_of_range_and_unsupported_architecture():
    model = _tiny("bert")
    ad = get_adapter(model)
    ids, mask = _batch()
    assert ad.layer_index(-1) == 2 and ad.layer_index(-3) == 0
    for bad in (3, -4):
        with pytest.raises(KDError, match="out of range .* 3 layers"):
            ad.qkv(model, ids, mask, bad)
    gpt2 = tf.GPT2Model(tf.GPT2Config(vocab_size=64, n_embd=32, n_layer=1, n_head=4, n_positions=16))
    with pytest.raises(KDError, match="does not support architecture 'gpt2'.*bert, distilbert, llama"):
        get_adapter(gpt2)
