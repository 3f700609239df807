"""Student builder (kd_engine.models.student) on tiny random models (CPU, fast); the CLI: test_shrink_cli.py."""
from __future__ import annotations

import logging

import pytest
import torch
import transformers
from transformers import (
    AutoModelForCausalLM,
    AutoModelForMaskedLM,
    AutoModelForSeq2SeqLM,
    AutoModelForSequenceClassification,
)

from kd_engine.errors import KDError
from kd_engine.models.student import LAYERS_TO_COPY, create_student, layers_to_copy

V = 101  # tiny vocab


def tiny(kind: str, n: int = 12, n_dec: int | None = None):
    """A tiny randomly initialised teacher; n = depth (encoder depth for encoder-decoder)."""
    torch.manual_seed(0)
    n_dec = n if n_dec is None else n_dec
    if kind == "bart_cls":
        cfg = transformers.BartConfig(
            vocab_size=V, d_model=16, encoder_layers=n, decoder_layers=n_dec, encoder_attention_heads=2,
            decoder_attention_heads=2, encoder_ffn_dim=32, decoder_ffn_dim=32, max_position_embeddings=64,
            num_labels=3,
        )
        model = transformers.BartForSequenceClassification(cfg)
    elif kind == "bart_lm":
        cfg = transformers.BartConfig(
            vocab_size=V, d_model=16, encoder_layers=n, decoder_layers=n_dec, encoder_attention_heads=2,
            decoder_attention_heads=2, encoder_ffn_dim=32, decoder_ffn_dim=32, max_position_embeddings=64,
        )
        model = transformers.BartForConditionalGeneration(cfg)
    elif kind == "t5":
        cfg = transformers.T5Config(
            vocab_size=V, d_model=16, d_kv=8, d_ff=32, num_layers=n, num_decoder_layers=n_dec, num_heads=2,
            relative_attention_num_buckets=8, decoder_start_token_id=0, pad_token_id=0,
        )
        model = transformers.T5ForConditionalGeneration(cfg)
    elif kind == "bert_cls":
        cfg = transformers.BertConfig(
            vocab_size=V, hidden_size=16, num_hidden_layers=n, num_attention_heads=2, intermediate_size=32,
            max_position_embeddings=64, num_labels=2,
        )
        model = transformers.BertForSequenceClassification(cfg)
    elif kind == "roberta_mlm":
        cfg = transformers.RobertaConfig(
            vocab_size=V, hidden_size=16, num_hidden_layers=n, num_attention_heads=2, intermediate_size=32,
            max_position_embeddings=64,
        )
        model = transformers.RobertaForMaskedLM(cfg)
    elif kind == "distilbert_mlm":
        cfg = transformers.DistilBertConfig(
            vocab_size=V, dim=16, n_layers=n, n_heads=2, hidden_dim=32, max_position_embeddings=64,
        )
        model = transformers.DistilBertForMaskedLM(cfg)
    elif kind == "llama":
        cfg = transformers.LlamaConfig(
            vocab_size=V, hidden_size=24, num_hidden_layers=n, num_attention_heads=6, num_key_value_heads=2,
            intermediate_size=48, max_position_embeddings=64, tie_word_embeddings=False,
        )
        model = transformers.LlamaForCausalLM(cfg)
    elif kind == "qwen2":
        cfg = transformers.Qwen2Config(
            vocab_size=V, hidden_size=24, num_hidden_layers=n, num_attention_heads=6, num_key_value_heads=2,
            intermediate_size=48, max_position_embeddings=64, tie_word_embeddings=True,
        )
        model = transformers.Qwen2ForCausalLM(cfg)
    else:
        raise ValueError(kind)
    return model.eval()


# the stacks (qualified ModuleList name) of each tiny model, and which config key holds their depth
STACKS = {
    "bart_cls": {"encoder": ("model.encoder.layers", "encoder_layers"),
                 "decoder": ("model.decoder.layers", "decoder_layers")},
    "bart_lm": {"encoder": ("model.encoder.layers", "encoder_layers"),
                "decoder": ("model.decoder.layers", "decoder_layers")},
    "t5": {"encoder": ("encoder.block", "num_layers"), "decoder": ("decoder.block", "num_decoder_layers")},
    "bert_cls": {"encoder": ("bert.encoder.layer", "num_hidden_layers")},
    "roberta_mlm": {"encoder": ("roberta.encoder.layer", "num_hidden_layers")},
    "distilbert_mlm": {"encoder": ("distilbert.transformer.layer", "n_layers")},
    "llama": {"decoder": ("model.layers", "num_hidden_layers")},
    "qwen2": {"decoder": ("model.layers", "num_hidden_layers")},
}
AUTO = {
    "bart_cls": AutoModelForSequenceClassification, "bart_lm": AutoModelForSeq2SeqLM, "t5": AutoModelForSeq2SeqLM,
    "bert_cls": AutoModelForSequenceClassification, "roberta_mlm": AutoModelForMaskedLM,
    "distilbert_mlm": AutoModelForMaskedLM, "llama": AutoModelForCausalLM, "qwen2": AutoModelForCausalLM,
}


def inputs_for(kind: str) -> dict:
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, V, (2, 9), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    batch = {"input_ids": ids, "attention_mask": mask}
    if kind == "bart_cls":
        ids[:, -1] = 2  # BART classification pools the last eos token
        ids[1, 5] = 2
        ids[1, 6:] = 1
    if kind in ("t5", "bart_lm"):
        batch["decoder_input_ids"] = torch.randint(3, V, (2, 5), generator=g)
    return batch


def logits(model, kind):
    with torch.no_grad():
        return model(**inputs_for(kind)).logits


# ------------------------------------------------------------------------------------------------ layer maps


def test_layer_map_table_matches_methods_md():
    assert layers_to_copy(12, 1) == [0]
    assert layers_to_copy(12, 2) == [0, 6]
    assert layers_to_copy(12, 3) == [0, 6, 11]
    assert layers_to_copy(12, 4) == [0, 4, 8, 11]
    assert layers_to_copy(12, 6) == [0, 2, 4, 7, 9, 11]
    assert layers_to_copy(12, 9) == [0, 1, 2, 4, 5, 7, 9, 10, 11]
    assert layers_to_copy(16, 4) == [0, 5, 10, 15]
    assert layers_to_copy(16, 6) == [0, 3, 6, 9, 12, 15]
    assert layers_to_copy(6, 3) == [0, 2, 5]
    for n_t, table in LAYERS_TO_COPY.items():
        for n_s, picked in table.items():
            assert len(picked) == n_s and picked == sorted(set(picked)) and max(picked) < n_t


def test_layer_map_same_depth_is_identity():
    assert layers_to_copy(30, 30) == list(range(30))
    assert layers_to_copy(1, 1) == [0]


@pytest.mark.parametrize("n_t,n_s", [(30, 10), (24, 6), (7, 5), (5, 2), (32, 31)])
def test_layer_map_evenly_spaced_keeps_first_and_last(n_t, n_s, caplog):
    with caplog.at_level(logging.WARNING, logger="kd_engine.models.student"):
        picked = layers_to_copy(n_t, n_s)
    assert len(picked) == n_s and picked[0] == 0 and picked[-1] == n_t - 1
    assert all(b > a for a, b in zip(picked, picked[1:]))
    gaps = [b - a for a, b in zip(picked, picked[1:])]
    assert max(gaps) - min(gaps) <= 1  # evenly spaced up to rounding
    assert "evenly spaced" in caplog.text


def test_layer_map_30_to_10():
    assert layers_to_copy(30, 10) == [0, 3, 6, 10, 13, 16, 19, 23, 26, 29]


@pytest.mark.parametrize("n_s", [0, -1, 13])
def test_layer_map_rejects_bad_depths(n_s):
    with pytest.raises(KDError, match="at least 1|more layers"):
        layers_to_copy(12, n_s)


# ------------------------------------------------------------------------------------------- teacher_layers


@pytest.mark.parametrize("kind", list(STACKS))
def test_same_depth_copy_reproduces_teacher_logits_exactly(kind):
    teacher = tiny(kind)
    student = create_student(teacher, layers=None).eval()
    assert type(student) is type(teacher)
    assert torch.equal(logits(student, kind), logits(teacher, kind))
    # explicit same depth too
    n = {"decoder_layers": 12} if len(STACKS[kind]) == 2 else {}
    student = create_student(teacher, layers=12, **n).eval()
    assert torch.equal(logits(student, kind), logits(teacher, kind))


def _assert_shrunk_copy(teacher, student, kind, maps: dict[str, list[int]]):
    t_sd, s_sd = teacher.state_dict(), student.state_dict()
    prefixes = {name: STACKS[kind][name][0] + "." for name in maps}
    n_checked = 0
    for key, value in s_sd.items():
        stack = next((name for name, p in prefixes.items() if key.startswith(p)), None)
        if stack is None:  # embeddings, positions, norms, heads: the teacher's own
            assert torch.equal(value, t_sd[key]), key
            continue
        rest = key[len(prefixes[stack]):]
        k, tail = rest.split(".", 1)
        t_key = f"{prefixes[stack]}{maps[stack][int(k)]}.{tail}"
        assert torch.equal(value, t_sd[t_key]), (key, t_key)
        n_checked += 1
    assert n_checked > 0
    for name, picked in maps.items():
        module_name, depth_key = STACKS[kind][name]
        assert len(student.get_submodule(module_name)) == len(picked)
        assert getattr(student.config, depth_key) == len(picked)


def test_bart_cls_12_to_6_decoder():
    teacher = tiny("bart_cls")
    student = create_student(teacher, decoder_layers=6)
    _assert_shrunk_copy(teacher, student, "bart_cls",
                        {"encoder": list(range(12)), "decoder": [0, 2, 4, 7, 9, 11]})
    assert student.config.encoder_layers == 12 and student.config.decoder_layers == 6
    for name, p in teacher.classification_head.named_parameters():
        assert torch.equal(p, student.classification_head.get_parameter(name))
    assert torch.equal(student.model.shared.weight, teacher.model.shared.weight)
    assert torch.equal(student.model.decoder.embed_positions.weight, teacher.model.decoder.embed_positions.weight)
    assert student.config.kd_lineage["decoder_layers_copied"] == [0, 2, 4, 7, 9, 11]
    assert student.config.kd_lineage["encoder_layers_copied"] == list(range(12))
    assert student.config.id2label == teacher.config.id2label


def test_bart_lm_keeps_final_logits_bias_and_tied_head():
    teacher = tiny("bart_lm")
    with torch.no_grad():
        teacher.final_logits_bias.normal_()
    student = create_student(teacher, layers=3, decoder_layers=1)
    _assert_shrunk_copy(teacher, student, "bart_lm", {"encoder": [0, 6, 11], "decoder": [0]})
    assert torch.equal(student.final_logits_bias, teacher.final_logits_bias)
    assert torch.equal(student.lm_head.weight, teacher.lm_head.weight)
    assert student.lm_head.weight.data_ptr() == student.model.shared.weight.data_ptr()  # still tied


def test_t5_both_stacks_and_one_stack():
    teacher = tiny("t5")
    student = create_student(teacher, layers=6, decoder_layers=3)
    _assert_shrunk_copy(teacher, student, "t5", {"encoder": [0, 2, 4, 7, 9, 11], "decoder": [0, 6, 11]})
    assert student.config.num_layers == 6 and student.config.num_decoder_layers == 3
    assert torch.equal(student.shared.weight, teacher.shared.weight)
    student = create_student(teacher, layers=4)  # decoder kept
    _assert_shrunk_copy(teacher, student, "t5", {"encoder": [0, 4, 8, 11], "decoder": list(range(12))})
    assert student.config.num_decoder_layers == 12


@pytest.mark.parametrize("kind", ["bert_cls", "roberta_mlm", "distilbert_mlm", "llama", "qwen2"])
def test_single_stack_12_to_6(kind):
    teacher = tiny(kind)
    student = create_student(teacher, layers=6)
    stack = next(iter(STACKS[kind]))
    _assert_shrunk_copy(teacher, student, kind, {stack: [0, 2, 4, 7, 9, 11]})
    assert student.config.kd_lineage[f"{stack}_layers_copied"] == [0, 2, 4, 7, 9, 11]
    out = logits(student, kind)
    assert out.shape == logits(teacher, kind).shape and torch.isfinite(out).all()


def test_qwen2_layer_types_follow_depth():
    student = create_student(tiny("qwen2"), layers=5)
    assert len(student.config.layer_types) == 5


def test_llama_head_and_norm_equal_teacher():
    teacher = tiny("llama")
    student = create_student(teacher, layers=2)
    assert torch.equal(student.lm_head.weight, teacher.lm_head.weight)
    assert torch.equal(student.model.norm.weight, teacher.model.norm.weight)
    assert torch.equal(student.model.embed_tokens.weight, teacher.model.embed_tokens.weight)


@pytest.mark.parametrize("kind", ["bart_cls", "t5", "bert_cls", "llama"])
def test_student_saves_and_reloads_with_auto_class_and_lineage(kind, tmp_path):
    teacher = tiny(kind)
    teacher.config._name_or_path = "some/teacher"
    kwargs = {"decoder_layers": 6} if kind == "bart_cls" else {"layers": 6}
    student = create_student(teacher, **kwargs).eval()
    student.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").exists()
    reloaded = AUTO[kind].from_pretrained(tmp_path).eval()
    assert type(reloaded) is type(teacher)
    lin = reloaded.config.kd_lineage
    assert lin["teacher"] == "some/teacher" and lin["init"] == "teacher_layers"
    stack = "decoder" if kind in ("bart_cls", "llama") else "encoder"
    assert lin[f"{stack}_layers_copied"] == [0, 2, 4, 7, 9, 11]
    assert torch.equal(logits(reloaded, kind), logits(student, kind))


def test_bf16_teacher_gives_bf16_copy_and_generation_config():
    teacher = tiny("bart_lm").to(torch.bfloat16)
    teacher.generation_config.num_beams = 3
    student = create_student(teacher, decoder_layers=2)
    assert student.dtype == torch.bfloat16
    assert torch.equal(student.model.decoder.layers[1].fc1.weight, teacher.model.decoder.layers[6].fc1.weight)
    assert student.generation_config.num_beams == 3


def test_student_of_a_student_records_new_lineage():
    teacher = tiny("bert_cls")
    s1 = create_student(teacher, layers=6)
    s2 = create_student(s1, layers=3)
    assert s2.config.kd_lineage["encoder_layers_copied"] == [0, 2, 5]
    assert torch.equal(s2.bert.encoder.layer[2].output.dense.weight, teacher.bert.encoder.layer[11].output.dense.weight)


# ------------------------------------------------------------------------------------------------ random init


def test_random_init_bert_sizes_and_intermediate_default():
    teacher = tiny("bert_cls")
    student = create_student(teacher, layers=3, hidden=32, heads=4, init="random")
    c = student.config
    assert (c.num_hidden_layers, c.hidden_size, c.num_attention_heads, c.intermediate_size) == (3, 32, 4, 128)
    assert student.bert.encoder.layer[0].intermediate.dense.weight.shape == (128, 32)
    assert student.bert.embeddings.word_embeddings.weight.shape == (V, 32)
    assert c.kd_lineage["init"] == "random"
    student = create_student(teacher, layers=3, hidden=32, heads=4, intermediate=48, init="random")
    assert student.config.intermediate_size == 48
    assert student.bert.encoder.layer[0].intermediate.dense.weight.shape == (48, 32)


def test_random_init_same_width_differs_from_teacher():
    teacher = tiny("bert_cls")
    student = create_student(teacher, layers=12, init="random")
    assert student.config.intermediate_size == teacher.config.intermediate_size  # width untouched
    assert not torch.equal(student.bert.encoder.layer[0].attention.self.query.weight,
                           teacher.bert.encoder.layer[0].attention.self.query.weight)


def test_random_init_llama_kv_heads_and_head_dim():
    teacher = tiny("llama")  # 6 heads, 2 KV heads: groups of 3
    student = create_student(teacher, layers=2, hidden=36, heads=3, init="random")
    c = student.config
    assert (c.hidden_size, c.num_attention_heads, c.num_key_value_heads, c.head_dim, c.intermediate_size) == (
        36, 3, 1, 12, 144)
    assert c.num_attention_heads % c.num_key_value_heads == 0
    out = logits(student, "llama")
    assert out.shape == (2, 9, V) and torch.isfinite(out).all()
    student = create_student(teacher, hidden=32, heads=4, init="random")  # 4 % 3 != 0 -> MHA
    assert student.config.num_key_value_heads == 4


def test_random_init_keeps_explicit_head_sizes_when_width_unchanged():
    t5 = transformers.T5ForConditionalGeneration(transformers.T5Config(
        vocab_size=V, d_model=16, d_kv=4, d_ff=32, num_layers=4, num_heads=2, decoder_start_token_id=0))
    student = create_student(t5, layers=2, init="random")
    assert student.config.d_kv == 4 and student.config.d_ff == 32
    qwen3 = transformers.Qwen3ForCausalLM(transformers.Qwen3Config(
        vocab_size=V, hidden_size=24, head_dim=16, num_hidden_layers=4, num_attention_heads=6,
        num_key_value_heads=2, intermediate_size=48))
    student = create_student(qwen3, layers=2, init="random")
    c = student.config
    assert (c.head_dim, c.num_key_value_heads, len(c.layer_types)) == (16, 2, 2)
    assert student.model.layers[0].self_attn.q_proj.weight.shape == (96, 24)


def test_random_init_t5_and_bart_widths():
    t5 = create_student(tiny("t5"), layers=2, decoder_layers=2, hidden=24, heads=3, init="random")
    assert (t5.config.d_model, t5.config.num_heads, t5.config.d_kv, t5.config.d_ff) == (24, 3, 8, 96)
    assert torch.isfinite(logits(t5, "t5")).all()
    bart = create_student(tiny("bart_cls"), layers=2, decoder_layers=1, hidden=24, heads=4, init="random")
    c = bart.config
    assert (c.d_model, c.encoder_attention_heads, c.decoder_attention_heads, c.encoder_ffn_dim,
            c.decoder_ffn_dim) == (24, 4, 4, 96, 96)
    assert logits(bart, "bart_cls").shape == (2, 3)


# ------------------------------------------------------------------------------------------------ bad input


@pytest.mark.parametrize("kwargs,match", [
    ({"layers": 13}, "more encoder layers"),
    ({"layers": 0}, "at least 1"),
    ({"decoder_layers": 6}, "decoder_layers"),
    ({"hidden": 32}, "init='random'"),
    ({"heads": 4}, "init='random'"),
    ({"intermediate": 64}, "init='random'"),
    ({"hidden": 30, "heads": 4, "init": "random"}, "must divide"),
    ({"heads": 3, "init": "random"}, "must divide"),
    ({"hidden": 0, "init": "random"}, "positive"),
    ({"layers": 2, "init": "copy"}, "init must be"),
])
def test_bad_inputs_bert(kwargs, match):
    with pytest.raises(KDError, match=match):
        create_student(tiny("bert_cls"), **kwargs)


def test_bad_inputs_encoder_decoder():
    teacher = tiny("bart_cls")
    with pytest.raises(KDError, match="more decoder layers"):
        create_student(teacher, decoder_layers=13)
    with pytest.raises(KDError, match="at least 1 decoder"):
        create_student(teacher, decoder_layers=0)
    with pytest.raises(KDError, match="decoder_layers"):
        create_student(tiny("llama"), decoder_layers=2)


def test_same_width_is_not_a_width_change():
    teacher = tiny("bert_cls")
    student = create_student(teacher, layers=2, hidden=16, heads=2)
    assert student.config.hidden_size == 16


def test_unsupported_architecture_names_supported_ones():
    gpt2 = transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=V, n_embd=16, n_layer=2, n_head=2))
    with pytest.raises(KDError, match="unsupported architecture 'gpt2'.*bart.*llama.*t5"):
        create_student(gpt2, layers=1)
