"""MATE-KD pure pieces (kd_engine/losses/mate_kd.py, kd_engine/models/generator.py): methods.md §4.4's four sanity
checks on tiny random BERT and RoBERTa models, hand-computed divergences, the generator builder."""
from __future__ import annotations

import math

import pytest
import torch

import tiny
from kd_engine.errors import KDError
from kd_engine.losses.mate_kd import (changed_fraction, divergence, gumbel_softmax_st, mask_positions,
                                      perturbed_embeddings, position_ids_for, substitute, supervised_loss)

V = tiny.vocab_size()


def bert(num_labels=3, layers=2, extra_rows=0):
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    return BertForSequenceClassification(BertConfig(
        vocab_size=V + extra_rows, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
        num_attention_heads=4, max_position_embeddings=64, num_labels=num_labels, hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0)).eval()


def roberta(num_labels=3, layers=2):
    from transformers import RobertaConfig, RobertaForSequenceClassification

    torch.manual_seed(0)
    return RobertaForSequenceClassification(RobertaConfig(
        vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=layers, num_attention_heads=4,
        max_position_embeddings=70, num_labels=num_labels, pad_token_id=0, hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0)).eval()


def batch(left_pad: bool = False, pad: int = 0, seed: int = 0):
    """[CLS]=2 w1 .. wk [SEP]=3 then pad (right) or pad first (left); ids of words start at 7."""
    g = torch.Generator().manual_seed(seed)
    lengths = [9, 6, 12, 4]
    n = max(lengths)
    ids = torch.full((len(lengths), n), pad, dtype=torch.long)
    am = torch.zeros_like(ids)
    for i, L in enumerate(lengths):
        row = [2] + torch.randint(7, V, (L - 2,), generator=g).tolist() + [3]
        sl = slice(n - L, n) if left_pad else slice(0, L)
        ids[i, sl] = torch.tensor(row)
        am[i, sl] = 1
    return ids, am


SPECIAL = torch.arange(7)


@pytest.mark.parametrize("arch", ["bert", "roberta"])
@pytest.mark.parametrize("left_pad", [False, True])
def test_forward_equivalence_perturbed_embeddings_vs_substituted_ids(arch, left_pad):
    """§4.4.1: the inputs_embeds path with the straight-through sample (and with a soft sample at tau -> 0) gives the
    logits of input_ids with the argmax tokens substituted, with the model's own position ids."""
    model = bert() if arch == "bert" else roberta()
    ids, am = batch(left_pad)
    g = torch.Generator().manual_seed(1)
    m = mask_positions(ids, am, SPECIAL, 0.5, g)
    assert m.any()
    gen_logits = torch.randn(int(m.sum()), V, generator=g)
    y = gumbel_softmax_st(gen_logits, 1.0, V, torch.Generator().manual_seed(2))
    x_sub = substitute(ids, m, y.argmax(-1))
    E = model.get_input_embeddings().weight
    emb = perturbed_embeddings(model.get_input_embeddings()(x_sub), m, y, E)
    pad_idx = model.get_input_embeddings().padding_idx
    pos = position_ids_for(model.config.model_type, x_sub, pad_idx)
    with torch.no_grad():
        want = model(input_ids=x_sub, attention_mask=am).logits
        got = model(inputs_embeds=emb, attention_mask=am, position_ids=pos).logits
        # the reference's formula with a soft sample at tau -> 0: (y @ E) * m + E[ids] * (1 - m)
        y_soft = gumbel_softmax_st(gen_logits, 1e-4, V, torch.Generator().manual_seed(2), hard=False)
        ref = E[ids].clone()
        ref[m] = y_soft @ E[:V]
        soft = model(inputs_embeds=ref, attention_mask=am, position_ids=pos).logits
    assert torch.equal(y_soft.argmax(-1), y.argmax(-1))
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(soft, want, atol=1e-4, rtol=1e-4)
    if arch == "roberta" and left_pad:  # the default inputs_embeds positions ignore the padding: different logits
        with torch.no_grad():
            naive = model(inputs_embeds=emb, attention_mask=am).logits
        assert not torch.allclose(naive, want, atol=1e-3)


def test_straight_through_gradient_is_the_soft_one():
    """d/dy of the perturbed embeddings is g @ E^T at the masked rows; forward value is exactly E[argmax]."""
    E = torch.randn(V, 8)
    logits = torch.randn(3, V, requires_grad=True)
    y = gumbel_softmax_st(logits, 1.0, V, torch.Generator().manual_seed(0))
    assert torch.equal(y.detach().sum(-1), torch.ones(3)) and set(y.detach().unique().tolist()) <= {0.0, 1.0}
    ids = torch.tensor([[2, 10, 11, 12, 3]])
    m = torch.tensor([[False, True, False, True, False]])
    x_sub = substitute(ids, m, y.argmax(-1)[:2])
    emb = perturbed_embeddings(E[x_sub], m, y[:2], E)
    torch.testing.assert_close(emb, E[x_sub])
    w = torch.randn_like(emb)
    (emb * w).sum().backward()
    # reference: y_soft's gradient = (w at masked rows) @ E^T through the softmax Jacobian
    l2 = logits.detach().clone().requires_grad_(True)
    y2 = gumbel_softmax_st(l2, 1.0, V, torch.Generator().manual_seed(0), hard=False)
    ((y2[:2] @ E) * w[m]).sum().backward()
    torch.testing.assert_close(logits.grad, l2.grad)


def test_padded_vocab_rows_are_never_sampled():
    logits = torch.zeros(500, V + 6)
    logits[:, V:] = 100.0  # padded rows would win every draw
    y = gumbel_softmax_st(logits, 1.0, V, torch.Generator().manual_seed(0))
    assert y.shape == (500, V) and int(y.argmax(-1).max()) < V


def test_gradients_reach_the_generator_only():
    """§4.4.2: after (-D).backward() in a generator step the generator has non-zero gradients, the frozen teacher
    and student none (gradient flows through their activations only)."""
    from kd_engine.models.generator import build_from_teacher

    teacher, student = bert(layers=2), bert(layers=1)
    gen = build_from_teacher(teacher, 1).train()
    for p in list(teacher.parameters()) + list(student.parameters()):
        p.requires_grad_(False)
    ids, am = batch()
    g = torch.Generator().manual_seed(0)
    m = mask_positions(ids, am, SPECIAL, 0.3, g)
    y = gumbel_softmax_st(gen(input_ids=ids.masked_fill(m, 4), attention_mask=am).logits[m], 1.0, V, g)
    x_sub = substitute(ids, m, y.argmax(-1))
    logits = []
    for model in (student, teacher):
        emb = perturbed_embeddings(model.get_input_embeddings()(x_sub), m, y, model.get_input_embeddings().weight)
        logits.append(model(inputs_embeds=emb, attention_mask=am).logits)
    d = divergence(logits[0], logits[1], "kl")
    (-d).backward()
    grads = [p.grad for p in gen.parameters() if p.grad is not None]
    assert grads and sum(float(gr.abs().sum()) for gr in grads) > 0
    assert all(p.grad is None for p in list(teacher.parameters()) + list(student.parameters()))


def test_divergence_hand_computed_and_floor():
    """§4.4.3: teacher = student -> KL is 0, the reference's soft CE is the teacher entropy; hand-computed values."""
    s = torch.tensor([[0.0, 0.0]])
    t = torch.tensor([[math.log(3.0), 0.0]])  # p = (3/4, 1/4), q = (1/2, 1/2)
    kl = 0.75 * math.log(0.75 / 0.5) + 0.25 * math.log(0.25 / 0.5)
    assert float(divergence(s, t, "kl")) == pytest.approx(kl, abs=1e-6)
    assert float(divergence(s, t, "ce")) == pytest.approx(math.log(2.0), abs=1e-6)
    assert float(divergence(s, t, "mse")) == pytest.approx(math.log(3.0) ** 2 / 2, abs=1e-6)
    # temperature: T^2 * KL at the softened distributions
    p = torch.softmax(t / 2, -1)[0]
    kl2 = 4 * float((p * (p.log() - math.log(0.5))).sum())
    assert float(divergence(s, t, "kl", 2.0)) == pytest.approx(kl2, abs=1e-6)
    logits = torch.randn(5, 4)
    assert float(divergence(logits, logits, "kl")) == pytest.approx(0.0, abs=1e-6)
    ent = float(-(torch.softmax(logits, -1) * torch.log_softmax(logits, -1)).sum(-1).mean())
    assert float(divergence(logits, logits, "ce")) == pytest.approx(ent, abs=1e-5) and ent > 0.1
    # bf16 inputs are computed in fp32
    assert divergence(logits.bfloat16(), logits.bfloat16(), "kl").dtype == torch.float32
    with pytest.raises(ValueError):
        divergence(s, t, "js")


def test_supervised_loss_ce_and_regression():
    logits = torch.tensor([[2.0, 0.0], [0.0, 1.0]])
    want = -(math.log(math.exp(2) / (math.exp(2) + 1)) + math.log(math.e / (math.e + 1))) / 2
    assert float(supervised_loss(logits, torch.tensor([0, 1]))) == pytest.approx(want, abs=1e-6)
    assert float(supervised_loss(torch.tensor([[1.0], [3.0]]), torch.tensor([2.0, 2.0]))) == pytest.approx(1.0)


def test_mask_rate_and_never_special_or_pad():
    """§4.4.4: ~30% of eligible tokens masked; special and pad tokens never."""
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(7, V, (64, 40), generator=g)
    ids[:, 0], ids[:, 20] = 2, 3
    am = torch.ones_like(ids)
    am[::2, 30:] = 0
    ids[am == 0] = 0
    m = mask_positions(ids, am, SPECIAL, 0.3, g)
    eligible = (am == 1) & (ids >= 7)
    rate = float(m.sum()) / float(eligible.sum())
    n = float(eligible.sum())
    assert abs(rate - 0.3) < 4 * math.sqrt(0.3 * 0.7 / n)
    assert not bool((m & ~eligible).any())
    x_sub = substitute(ids, m, torch.full((int(m.sum()),), 9))
    assert float(changed_fraction(ids, x_sub, m)) == pytest.approx(float((ids[m] != 9).float().mean()))
    assert float(changed_fraction(ids, ids, torch.zeros_like(m))) == 0.0


def test_roberta_position_ids_match_the_model():
    from transformers.models.roberta.modeling_roberta import RobertaEmbeddings

    ids, _ = batch(left_pad=True, pad=1)
    want = RobertaEmbeddings.create_position_ids_from_input_ids(ids, padding_idx=1)
    assert torch.equal(position_ids_for("roberta", ids, 1), want)
    assert torch.equal(position_ids_for("bert", ids, 0)[0], torch.arange(ids.shape[1]))


def test_generator_built_from_teacher_layers(tmp_path):
    from transformers import AutoModelForMaskedLM

    from kd_engine.models.generator import build_from_teacher, check_generator_source

    for teacher in (bert(layers=3), roberta(layers=3)):
        gen = build_from_teacher(teacher, 2)
        assert gen.config.num_hidden_layers == 2 and type(gen).__name__.endswith("ForMaskedLM")
        tb, gb = teacher.base_model, gen.base_model
        assert torch.equal(gb.embeddings.word_embeddings.weight, tb.embeddings.word_embeddings.weight)
        for i in range(2):
            for (n1, p1), (n2, p2) in zip(tb.encoder.layer[i].named_parameters(), gb.encoder.layer[i].named_parameters()):
                assert n1 == n2 and torch.equal(p1, p2)
        out = gen.get_output_embeddings()
        assert out.weight.data_ptr() == gen.get_input_embeddings().weight.data_ptr()  # tied head
        gen.save_pretrained(tmp_path / teacher.config.model_type)
        reloaded = AutoModelForMaskedLM.from_pretrained(tmp_path / teacher.config.model_type)
        assert torch.equal(reloaded.get_output_embeddings().weight, gen.get_input_embeddings().weight)
        check_generator_source(str(tmp_path / teacher.config.model_type))
    with pytest.raises(KDError, match="out of range"):
        build_from_teacher(bert(layers=2), 3)
    bert().save_pretrained(tmp_path / "clf")
    with pytest.raises(KDError, match="no masked-LM head"):
        check_generator_source(str(tmp_path / "clf"))


@pytest.mark.parametrize("arch", ["bert", "roberta"])
def test_generator_head_on_masked_rows_equals_full_forward(arch):
    """The plugin runs the generator's masked-LM head on the masked rows only; same logits as the full forward."""
    from kd_engine.models.generator import build_from_teacher

    from kd_engine.models.generator import masked_lm_logits

    gen = build_from_teacher(bert(layers=2) if arch == "bert" else roberta(layers=2), 2).eval()
    ids, am = batch()
    m = mask_positions(ids, am, SPECIAL, 0.3, torch.Generator().manual_seed(0))
    with torch.no_grad():
        full = gen(input_ids=ids, attention_mask=am).logits[m]
        rows = masked_lm_logits(gen, m, input_ids=ids, attention_mask=am)
    assert rows.shape == (int(m.sum()), V)
    torch.testing.assert_close(rows, full)


def test_mlm_warmup_learns_the_corpus(tmp_path):
    """The generator's masked-LM warm-up (corpus cache -> packed blocks -> masked rows) lowers its MLM loss on a
    small repetitive corpus."""
    from kd_engine.models.generator import build_from_teacher, warmup_mlm

    tok = tiny.make_tokenizer(str(tmp_path / "tok"), "bert")
    tiny.write_lines(str(tmp_path / "c.txt"), ["the big dog runs and the small cat sleeps"] * 200)
    gen = build_from_teacher(bert(layers=2), 1)
    losses = warmup_mlm(gen, tok, str(tmp_path / "c.txt"), 40, lr=3e-3, batch_size=8, block_size=16,
                        mask_prob=0.3, seed=0, cache_dir=str(tmp_path / "cache"), num_workers=1)
    assert len(losses) == 40 and sum(losses[-5:]) / 5 < 0.5 * sum(losses[:5]) / 5
