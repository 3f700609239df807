"""A synthetic seq2seq task with many correct outputs per input, a T5 teacher trained on it from scratch, and the
held-out comparison of distilled T5 students (issue 15 section 3). Driven by ``scripts/onpolicy_t5_demo.sh``.

Task ("one member of each category"): the input names 3 different categories, each with its slot number
(``1:tool 2:fruit 3:river``; the tokenizer has one piece per slot and category), a correct output names one member
of each, in order (``kalo mire tusa``). 16 categories x 8 members; members are
two-syllable pseudo-words over shared syllables (``ka lo mi ...``), so a syllable-level model can also emit
non-words or members of the wrong category. Every input has 8^3 = 512 correct outputs. Inputs (ordered category
triples) are split into train / held-out; each training input appears with several uniformly drawn outputs.

    python benchmarks/onpolicy_t5.py data OUT            # task files, SentencePiece tokenizer, random T5 teacher
    python benchmarks/onpolicy_t5.py student OUT/student_s1 --tokenizer OUT/tok --seed 1   # random small T5
    python benchmarks/onpolicy_t5.py eval --teacher T --model name=DIR ... --test OUT/test.jsonl --out FILE.json
    python benchmarks/onpolicy_t5.py report RUN_JSONS... --out benchmarks/results/onpolicy_t5

Metrics on the held-out inputs, ``--samples`` pure samples per input (temperature 1, no top-k/top-p):
``precision`` share of samples that are correct; ``coverage`` per input and slot, the share of the category's
members that appear in that slot among the correct samples, averaged; ``teacher_logp`` mean over samples of
log p_teacher(y | x) (nats per sequence); ``rev_kl`` mean over samples of sum_t KL(q_t || p_t), the exact per-token
KL over the vocabulary along the student's own samples (an unbiased estimate of the sequence-level KL(q || p));
``len`` mean response length in tokens. Exact (teacher-forced) on the first slot: ``slot1_mass`` the student's
total probability of the category's members, ``slot1_evenness`` the entropy of that distribution renormalised over
the members, divided by log 8 (1: all correct members equally likely; a coverage measure that does not depend on
precision or on the number of samples).
"""
from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import random
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

CATEGORIES = ("fruit tool animal color city river metal tree bird fish car dance drink game star cloud").split()
SYLLABLES = [c + v for c in "klmnprstv" for v in "aeiou"]
MEMBERS_PER_CATEGORY = 8
SLOTS = 3


def task(seed: int = 0) -> dict[str, list[str]]:
    """Category -> members (fixed by ``seed``, independent of the experiment's seeds)."""
    rng = random.Random(seed)
    words = [a + b for a in SYLLABLES for b in SYLLABLES if a != b]
    rng.shuffle(words)
    n = MEMBERS_PER_CATEGORY
    return {c: words[i * n:(i + 1) * n] for i, c in enumerate(CATEGORIES)}


def prompt_text(cats) -> str:
    return " ".join(f"{i + 1}:{c}" for i, c in enumerate(cats))


def categories(prompt: str) -> list[str]:
    return [w.split(":", 1)[1] for w in prompt.split()]


def is_correct(members: dict, prompt: str, output: str) -> bool:
    cats, words = categories(prompt), output.split()
    return len(words) == len(cats) and all(w in members[c] for c, w in zip(cats, words))


def write_jsonl(path: str, rows: list[dict]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")


def make_data(out: str, heldout: int, per_input: int, seed: int = 0) -> None:
    members = task(seed)
    rng = random.Random(seed + 1)
    triples = list(itertools.permutations(CATEGORIES, SLOTS))
    rng.shuffle(triples)
    test, train = triples[:heldout], triples[heldout:]
    rows = [{"text": prompt_text(t), "answer": " ".join(rng.choice(members[c]) for c in t)}
            for t in train for _ in range(per_input)]
    rng.shuffle(rows)
    os.makedirs(out, exist_ok=True)
    write_jsonl(os.path.join(out, "train.jsonl"), rows)
    write_jsonl(os.path.join(out, "test.jsonl"), [{"text": prompt_text(t), "answer": " ".join(members[c][0] for c in t)}
                                                  for t in test])
    with open(os.path.join(out, "members.json"), "w") as f:
        json.dump(members, f, indent=1)
    make_tokenizer(out, rows)
    make_t5(os.path.join(out, "teacher_init"), os.path.join(out, "tok"), d_model=128, layers=3, seed=seed)
    print(json.dumps({"train_rows": len(rows), "train_inputs": len(train), "heldout_inputs": len(test),
                      "correct_outputs_per_input": MEMBERS_PER_CATEGORY ** SLOTS}))


def make_tokenizer(out: str, rows: list[dict]) -> None:
    import sentencepiece as spm
    from transformers import T5Tokenizer

    corpus = os.path.join(out, "spm_corpus.txt")
    with open(corpus, "w", encoding="utf-8") as f:
        for r in rows:
            f.write(r["text"] + "\n" + r["answer"] + "\n")
    tok_dir = os.path.join(out, "tok")
    os.makedirs(tok_dir, exist_ok=True)
    # a slot-and-category name is one piece (an input is 3 pieces + EOS); other pieces have at most 3 characters
    # ("▁ka", "lo"): a member is two pieces, an output six plus EOS
    spm.SentencePieceTrainer.train(input=corpus, model_prefix=os.path.join(tok_dir, "spiece"), vocab_size=160,
                                   model_type="unigram", pad_id=0, eos_id=1, unk_id=2, bos_id=-1, minloglevel=2,
                                   character_coverage=1.0, max_sentencepiece_length=3, hard_vocab_limit=False,
                                   user_defined_symbols=[f"▁{i + 1}:{c}" for i in range(SLOTS)
                                                         for c in CATEGORIES])
    T5Tokenizer.from_pretrained(tok_dir, extra_ids=0).save_pretrained(tok_dir)


def make_t5(path: str, tok_dir: str, d_model: int, layers: int, seed: int, decoder_layers: int | None = None):
    from transformers import T5Config, T5ForConditionalGeneration, T5Tokenizer

    tok = T5Tokenizer.from_pretrained(tok_dir, extra_ids=0)
    torch.manual_seed(seed)
    heads = 4
    cfg = T5Config(vocab_size=len(tok), d_model=d_model, d_kv=d_model // heads, d_ff=2 * d_model, num_layers=layers,
                   num_decoder_layers=decoder_layers or layers, num_heads=heads, dropout_rate=0.0,
                   decoder_start_token_id=0, pad_token_id=0, eos_token_id=1, feed_forward_proj="relu")
    T5ForConditionalGeneration(cfg).save_pretrained(path)
    tok.save_pretrained(path)


# ---- evaluation ---------------------------------------------------------------------------------------------
@torch.no_grad()
def evaluate(model, teacher, tok, members: dict, prompts: list[str], samples: int, max_new: int, seed: int) -> dict:
    from kd_engine.data.prompt_response import PromptResponseCollator
    from kd_engine.models.response_logits import response_logits
    from kd_engine.models.sampling import mixed_sample

    V = len(tok)
    collate = PromptResponseCollator(tok.pad_token_id, causal=False)
    gen = torch.Generator().manual_seed(seed)
    n_ok = n = 0
    tlp = rkl = length = 0.0
    cover, masses, evens = [], [], []
    for prompt in prompts:
        ids = tok(prompt)["input_ids"]
        b = collate([{"prompt_ids": ids}] * samples)
        r = mixed_sample(model, teacher, b["prompt_ids"], b["prompt_mask"], max_new_tokens=max_new,
                         eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, alpha=0.0, generator=gen,
                         vocab_size=V)
        m = r.response_mask.float()
        args = (b["prompt_ids"], b["prompt_mask"], r.response_ids, r.response_mask)
        lq = torch.log_softmax(response_logits(model, *args).float()[..., :V], -1)
        lp = torch.log_softmax(response_logits(teacher, *args).float()[..., :V], -1)
        kl = ((lq.exp() * (lq - lp)).sum(-1) * m).sum(-1)
        rkl += float(kl.sum())
        tlp += float(r.teacher_logprobs.sum())
        length += float(m.sum())
        cats = categories(prompt)
        seen = [set() for _ in cats]
        for row, mask in zip(r.response_ids, r.response_mask):
            text = tok.decode([int(t) for t, k in zip(row, mask) if k], skip_special_tokens=True)
            n += 1
            if is_correct(members, prompt, text):
                n_ok += 1
                for s, w in zip(seen, text.split()):
                    s.add(w)
        cover.append(sum(len(s) for s in seen) / (len(cats) * MEMBERS_PER_CATEGORY))
        mass, even = first_slot(model, tok, ids, members[cats[0]], V)
        masses.append(mass)
        evens.append(even)
    return {"precision": n_ok / n, "coverage": sum(cover) / len(cover), "slot1_mass": sum(masses) / len(masses),
            "slot1_evenness": sum(evens) / len(evens), "teacher_logp": tlp / n, "rev_kl": rkl / n,
            "len": length / n, "samples": n}


@torch.no_grad()
def first_slot(model, tok, prompt_ids: list, words: list, V: int) -> tuple[float, float]:
    """Exact first-slot distribution over the category's members (teacher-forced): their total probability
    ``q(member)`` (a precision that needs no sampling) and the evenness of q renormalised over them (entropy / log 8:
    1 = every correct member equally likely, 0 = one member only), a coverage that does not depend on precision."""
    from kd_engine.models.response_logits import response_logits

    resp = [tok(w, add_special_tokens=False)["input_ids"] for w in words]
    width = max(len(r) for r in resp)
    ids = torch.tensor([r + [0] * (width - len(r)) for r in resp])
    mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in resp])
    prompt = torch.tensor([prompt_ids] * len(words))
    lq = torch.log_softmax(response_logits(model, prompt, torch.ones_like(prompt), ids, mask).float()[..., :V], -1)
    logq = (lq.gather(-1, ids.unsqueeze(-1)).squeeze(-1) * mask).sum(-1)
    q = logq.exp()
    p = q / q.sum()
    entropy = float(-(p * p.clamp_min(1e-30).log()).sum())
    return float(q.sum()), entropy / math.log(len(words))


def cmd_eval(a) -> None:
    from transformers import T5ForConditionalGeneration, T5Tokenizer

    members = json.load(open(a.members))
    prompts = [json.loads(x)["text"] for x in open(a.test) if x.strip()][: a.inputs or None]
    tok = T5Tokenizer.from_pretrained(a.teacher)
    teacher = T5ForConditionalGeneration.from_pretrained(a.teacher).eval()
    out = {}
    for spec in a.model:
        name, path = spec.split("=", 1)
        model = teacher if path == "teacher" else T5ForConditionalGeneration.from_pretrained(path).eval()
        out[name] = evaluate(model, teacher, tok, members, prompts, a.samples, a.max_new_tokens, a.seed)
        print(name, json.dumps(out[name]), flush=True)
    with open(a.out, "w") as f:
        json.dump({"seed": a.seed, "inputs": len(prompts), "samples_per_input": a.samples, "metrics": out}, f,
                  indent=1)


# ---- report -------------------------------------------------------------------------------------------------
METRICS = ("precision", "coverage", "slot1_mass", "slot1_evenness", "teacher_logp", "rev_kl", "len")


def mean_sd(xs: list[float]) -> tuple[float, float]:
    m = sum(xs) / len(xs)
    sd = math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1)) if len(xs) > 1 else 0.0
    return m, sd


def cmd_report(a) -> None:
    runs = [json.load(open(p)) for p in a.runs]
    names: list[str] = []
    for r in runs:
        names += [k for k in r["metrics"] if k not in names]
    table = {}
    for name in names:
        vals = [r["metrics"][name] for r in runs if name in r["metrics"]]
        table[name] = {"seeds": len(vals), **{k: mean_sd([v[k] for v in vals]) for k in METRICS}}
        secs = [float(open(f).read()) for f in (os.path.join(os.path.dirname(p), f"{name}.seconds") for p in a.runs)
                if os.path.isfile(f)]
        table[name]["train_seconds"] = mean_sd(secs) if secs else None
    setup = json.load(open(a.setup)) if a.setup else {}
    lines = ["# On-policy distillation family on a trained T5 teacher (synthetic multi-answer task)", "",
             "Generated by `scripts/onpolicy_t5_demo.sh` (`benchmarks/onpolicy_t5.py`); mean ± sd over the seeds "
             "(teacher: one model, sd over the seeds' samples).", ""]
    for k, v in setup.items():
        lines.append(f"- {k}: {v}")
    lines += ["", "| model | seeds | precision | coverage | slot-1 correct mass | slot-1 evenness | teacher log p "
              "(nats/seq) | reverse KL (nats/seq) | length (tokens) | run wall time (s) |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    for name, row in table.items():
        cells = " | ".join(f"{row[k][0]:.3f} ± {row[k][1]:.3f}" for k in METRICS)
        t = row["train_seconds"]
        lines.append(f"| {name} | {row['seeds']} | {cells} | {f'{t[0]:.0f} ± {t[1]:.0f}' if t else '-'} |")
    os.makedirs(os.path.dirname(a.out) or ".", exist_ok=True)
    with open(a.out + ".md", "w") as f:
        f.write("\n".join(lines) + "\n")
    result = {"setup": setup, "runs": list(a.runs),
              "table": {n: {k: (list(v) if isinstance(v, tuple) else v) for k, v in r.items()}
                        for n, r in table.items()}}
    with open(a.out + ".json", "w") as f:
        json.dump(result, f, indent=1)
    print("\n".join(lines))
    print(json.dumps(result))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    d = sub.add_parser("data", help="task files, tokenizer and the random teacher")
    d.add_argument("out")
    d.add_argument("--heldout", type=int, default=200, help="held-out category triples")
    d.add_argument("--per_input", type=int, default=4, help="training rows (drawn outputs) per training input")
    s = sub.add_parser("student", help="a random small T5 student")
    s.add_argument("out")
    s.add_argument("--tokenizer", required=True)
    s.add_argument("--seed", type=int, default=1)
    s.add_argument("--d_model", type=int, default=64)
    s.add_argument("--layers", type=int, default=1)
    e = sub.add_parser("eval", help="held-out metrics of the teacher and students")
    e.add_argument("--teacher", required=True)
    e.add_argument("--model", action="append", required=True, help="name=DIR (DIR 'teacher': the teacher)")
    e.add_argument("--test", required=True)
    e.add_argument("--members", required=True)
    e.add_argument("--samples", type=int, default=32, help="samples per held-out input")
    e.add_argument("--inputs", type=int, default=0, help="held-out inputs evaluated (0: all)")
    e.add_argument("--max_new_tokens", type=int, default=16)
    e.add_argument("--seed", type=int, default=0)
    e.add_argument("--out", required=True)
    r = sub.add_parser("report", help="mean and sd over seeds -> .md and .json")
    r.add_argument("runs", nargs="+")
    r.add_argument("--setup", help="JSON file of setup lines for the report")
    r.add_argument("--out", required=True)
    a = p.parse_args()
    if a.cmd == "data":
        make_data(a.out, a.heldout, a.per_input)
    elif a.cmd == "student":
        make_t5(a.out, a.tokenizer, a.d_model, a.layers, a.seed)
    elif a.cmd == "eval":
        cmd_eval(a)
    else:
        cmd_report(a)


if __name__ == "__main__":
    main()
