"""The synthetic multi-answer task and the held-out metrics of benchmarks/onpolicy_t5.py."""
import json
import os
import sys


sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))
import onpolicy_t5 as bench  # noqa: E402


def test_task_has_disjoint_categories_and_many_correct_outputs():
    members = bench.task()
    words = [w for ms in members.values() for w in ms]
    assert len(members) == 16 and all(len(ms) == 8 for ms in members.values()) and len(set(words)) == len(words)
    assert members == bench.task()  # fixed by its seed
    assert bench.categories(bench.prompt_text(["fruit", "tool", "river"])) == ["fruit", "tool", "river"]
    fruit, tool, river = members["fruit"], members["tool"], members["river"]
    assert bench.is_correct(members, "1:fruit 2:tool 3:river", f"{fruit[3]} {tool[0]} {river[7]}")
    assert not bench.is_correct(members, "1:fruit 2:tool 3:river", f"{tool[0]} {fruit[3]} {river[7]}")  # wrong order
    assert not bench.is_correct(members, "1:fruit 2:tool 3:river", f"{fruit[3]} {tool[0]}")  # too short
    assert not bench.is_correct(members, "1:fruit 2:tool 3:river", f"{fruit[3]} {tool[0]} {river[7]} {river[1]}")
    assert not bench.is_correct(members, "1:fruit 2:tool 3:river", f"{fruit[3]} {tool[0]} {river[7][:2]}")


def test_data_split_and_metrics(tmp_path):
    bench.make_data(str(tmp_path), heldout=50, per_input=1)
    members = json.load(open(tmp_path / "members.json"))
    train = [json.loads(x) for x in open(tmp_path / "train.jsonl")]
    test = [json.loads(x) for x in open(tmp_path / "test.jsonl")]
    assert len(test) == 50 and len(train) == 16 * 15 * 14 - 50
    assert not {r["text"] for r in train} & {r["text"] for r in test}  # held-out inputs never seen in training
    assert all(bench.is_correct(members, r["text"], r["answer"]) for r in train + test)
    from transformers import T5ForConditionalGeneration, T5Tokenizer

    tok = T5Tokenizer.from_pretrained(str(tmp_path / "tok"))
    ids = tok(train[0]["answer"])["input_ids"]
    assert ids[-1] == tok.eos_token_id and len(ids) == 7  # two pieces per member, then EOS
    assert len(tok(train[0]["text"])["input_ids"]) == 4  # one piece per category name, then EOS
    teacher = T5ForConditionalGeneration.from_pretrained(str(tmp_path / "teacher_init")).eval()
    bench.make_t5(str(tmp_path / "s"), str(tmp_path / "tok"), d_model=32, layers=1, seed=1)
    student = T5ForConditionalGeneration.from_pretrained(str(tmp_path / "s")).eval()
    prompts = [r["text"] for r in test[:3]]
    same = bench.evaluate(teacher, teacher, tok, members, prompts, samples=4, max_new=8, seed=0)
    other = bench.evaluate(student, teacher, tok, members, prompts, samples=4, max_new=8, seed=0)
    assert same["samples"] == other["samples"] == 12
    assert abs(same["rev_kl"]) < 1e-5 and other["rev_kl"] > 0.1
    assert 0 <= other["precision"] <= 1 and 0 <= other["coverage"] <= 1 and other["teacher_logp"] < 0
    assert 1 <= same["len"] <= 8 and 1 <= other["len"] <= 8
    assert 0 < other["slot1_mass"] < 1 and 0 < other["slot1_evenness"] <= 1
    # slot-1 mass is the probability of sampling a member first: the sampled share of correct first words agrees
    cats = bench.categories(prompts[0])
    ids = tok(prompts[0])["input_ids"]
    mass, even = bench.first_slot(student, tok, ids, members[cats[0]], len(tok))
    import torch
    from kd_engine.models.sampling import mixed_sample

    n = 2000
    prompt = torch.tensor([ids] * n)
    r = mixed_sample(student, None, prompt, torch.ones_like(prompt), max_new_tokens=2, eos_token_id=tok.eos_token_id,
                     pad_token_id=0, alpha=0.0, generator=torch.Generator().manual_seed(0), vocab_size=len(tok))
    want = {tuple(tok(w, add_special_tokens=False)["input_ids"]) for w in members[cats[0]]}
    hits = sum(tuple(row) in want for row in r.response_ids.tolist())
    assert abs(hits / n - mass) < 4 * (mass * (1 - mass) / n) ** 0.5 + 1e-3
