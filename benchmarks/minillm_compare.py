"""Held-out comparison of causal-LM students with their teacher (issue 6's MiniLLM vs SFT vs KD table).

    python benchmarks/minillm_compare.py --teacher offline:smollm2-135m --prompts heldout.jsonl \
        --model student_init=outputs/.../student_init/final --model minillm=outputs/.../minillm/final ... \
        [--out benchmarks/results/minillm_compare]

For every model (and the teacher itself) on the same prompts (``text``; label word in ``answer``), prompts
tokenized as ``--method minillm`` does (special tokens added, truncated from the LEFT to ``--max_prompt_length``):

* ``--samples`` pure-student samples per prompt (temperature 1, ``--max_new_tokens``, EOS stops), scored by both
  models (``kd_engine.models.sampling.mixed_sample`` with alpha = 0):
  ``rev_kl_seq`` = mean over samples of sum_t (log q - log p) (unbiased Monte-Carlo estimate of the sequence-level
  KL(q || p), nats per response), ``rev_kl_k3`` = the plugin's logged estimate (length-normalised k3, per token),
  ``rev_kl_token_exact`` = token mean of the exact KL(q_t || p_t) over the vocabulary along the samples.
* greedy answers (``--answer_max_tokens``): first word compared with the label word (``answer_accuracy``), with
  the teacher's first word (``teacher_agreement``), and ``label_word_rate`` (answer is one of the label words).

Last line of stdout: the JSON object also written to ``<out>.json`` (a Markdown table goes to ``<out>.md``).
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import platform
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from kd_engine.losses import minillm as L  # noqa: E402
from kd_engine.methods.minillm import first_word  # noqa: E402
from kd_engine.models.loading import load_model, load_tokenizer  # noqa: E402
from kd_engine.models.response_logits import response_logits  # noqa: E402
from kd_engine.models.sampling import mixed_sample  # noqa: E402

LABELS = ("entailment", "contradiction", "neutral")


def load_prompts(path: str, n: int | None) -> list[dict]:
    with open(path, encoding="utf-8") as fh:
        rows = [json.loads(line) for line in fh if line.strip()]
    return rows[:n] if n else rows


def left_pad(ids: list[list[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(x) for x in ids)
    inp = torch.full((len(ids), width), pad, dtype=torch.long)
    mask = torch.zeros((len(ids), width), dtype=torch.long)
    for i, x in enumerate(ids):
        inp[i, width - len(x):] = torch.tensor(x)
        mask[i, width - len(x):] = 1
    return inp, mask


@torch.no_grad()
def evaluate(student, teacher, tok, prompt_ids, answers, teacher_words, args, samples: int) -> dict:
    vocab = len(tok)
    seq_kl, k3, tok_kl_sum, tok_n, lens, n_seq = 0.0, 0.0, 0.0, 0.0, 0.0, 0
    words = []
    gen = torch.Generator().manual_seed(args.seed)
    bs = args.batch_size
    for start in range(0, len(prompt_ids), bs):
        inp, mask = left_pad(prompt_ids[start:start + bs], tok.pad_token_id)
        for _ in range(samples):
            r = mixed_sample(student, teacher, inp, mask, max_new_tokens=args.max_new_tokens,
                             eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, alpha=0.0,
                             generator=gen, vocab_size=vocab)
            m = r.response_mask.float()
            d = (r.student_logprobs - r.teacher_logprobs) * m
            seq_kl += float(d.sum())
            k3 += float(L.k3_reverse_kl(r.student_logprobs, r.teacher_logprobs, r.response_mask, True)) * m.shape[0]
            args_rl = (r.prompt_ids, r.prompt_mask, r.response_ids, r.response_mask)
            s_logits = response_logits(student, *args_rl).float()
            t_logits = response_logits(teacher, *args_rl).float()
            n_tok = float(m.sum())
            tok_kl_sum += float(L.single_step_reverse_kl(s_logits, t_logits, r.response_mask, vocab)) * n_tok
            tok_n += n_tok
            lens += n_tok
            n_seq += m.shape[0]
        g = mixed_sample(student, None, inp, mask, max_new_tokens=args.answer_max_tokens,
                         eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, alpha=0.0, do_sample=False,
                         vocab_size=vocab)
        ids = g.response_ids.masked_fill(g.response_mask == 0, -1)
        for row in ids:
            text = tok.decode([int(i) for i in row if i >= 0], skip_special_tokens=True)
            words.append((first_word(text), text))
    firsts = [w for w, _ in words]
    n = len(firsts)
    out = {
        "rev_kl_seq": seq_kl / max(n_seq, 1),
        "rev_kl_k3": k3 / max(n_seq, 1),
        "rev_kl_token_exact": tok_kl_sum / max(tok_n, 1.0),
        "response_len": lens / max(n_seq, 1),
        "answer_accuracy": sum(a == first_word(t) for a, t in zip(firsts, answers)) / n,
        "label_word_rate": sum(a in LABELS for a in firsts) / n,
        "answer_counts": dict(collections.Counter(firsts).most_common(6)),
        "examples": [t for _, t in words[:3]],
    }
    if teacher_words is not None:
        out["teacher_agreement"] = sum(a == b for a, b in zip(firsts, teacher_words)) / n
    return out, firsts


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--teacher", required=True)
    p.add_argument("--model", action="append", default=[], help="NAME=PATH of an exported student (repeatable)")
    p.add_argument("--prompts", required=True, help="jsonl with 'text' (prompt) and 'answer' (label word)")
    p.add_argument("--max_prompts", type=int, default=None)
    p.add_argument("--max_prompt_length", type=int, default=128)
    p.add_argument("--max_new_tokens", type=int, default=16)
    p.add_argument("--answer_max_tokens", type=int, default=8)
    p.add_argument("--samples", type=int, default=2, help="student samples per prompt for the reverse-KL")
    p.add_argument("--batch_size", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="benchmarks/results/minillm_compare")
    p.add_argument("--reuse", action="store_true",
                   help="keep the rows already in <out>.json (same prompts and settings) and evaluate only new names")
    p.add_argument("--reuse_from", action="append", default=[],
                   help="also keep the rows of this earlier result json (same settings; repeatable)")
    args = p.parse_args()
    models = [m.split("=", 1) for m in args.model]
    if any(len(m) != 2 for m in models):
        sys.exit("error: --model takes NAME=PATH")

    tok = load_tokenizer(args.teacher)
    rows = load_prompts(args.prompts, args.max_prompts)
    ids = tok([r["text"] for r in rows], add_special_tokens=True)["input_ids"]
    truncated = sum(len(x) > args.max_prompt_length for x in ids)
    prompt_ids = [x[-args.max_prompt_length:] for x in ids]
    answers = [r["answer"] for r in rows]
    teacher = load_model(args.teacher, "causal_lm", dtype=torch.float32).eval()

    settings = {"teacher": args.teacher, "prompts": args.prompts, "n_prompts": len(rows),
                "max_prompt_length": args.max_prompt_length, "max_new_tokens": args.max_new_tokens,
                "samples_per_prompt": args.samples, "answer_max_tokens": args.answer_max_tokens, "seed": args.seed}
    results = {}
    for path in ([args.out + ".json"] if args.reuse else []) + args.reuse_from:
        if os.path.exists(path):
            with open(path, encoding="utf-8") as fh:
                old = json.load(fh)
            if all(old.get(k) == v for k, v in settings.items()):
                results.update({k: v for k, v in old["results"].items() if k not in results})
    if "teacher" in results:
        teacher_words = results["teacher"]["first_words"]
    else:
        t0 = time.perf_counter()
        # the teacher's own reverse KL is 0 by definition: greedy answers only
        res, teacher_words = evaluate(teacher, teacher, tok, prompt_ids, answers, None, args, samples=0)
        res.update(teacher_agreement=1.0, rev_kl_seq=0.0, rev_kl_k3=0.0, rev_kl_token_exact=0.0, response_len=None,
                   first_words=teacher_words, seconds=round(time.perf_counter() - t0, 1))
        results["teacher"] = res
        print(json.dumps({"teacher": res}), flush=True)
    for name, path in models:
        if name in results:
            continue
        t0 = time.perf_counter()
        student = load_model(path, "causal_lm", dtype=torch.float32).eval()
        if student.get_output_embeddings().weight.shape[0] < len(tok):
            sys.exit(f"error: {path} has a smaller vocabulary than the teacher's tokenizer")
        res, words = evaluate(student, teacher, tok, prompt_ids, answers, teacher_words, args, args.samples)
        res["first_words"] = words
        res["params"] = sum(p.numel() for p in student.parameters())
        res["seconds"] = round(time.perf_counter() - t0, 1)
        results[name] = res
        print(json.dumps({name: res}), flush=True)
        del student

    summary = {
        "benchmark": "minillm_compare", **settings, "truncated_prompts": truncated, "torch": torch.__version__,
        "machine": f"{platform.machine()} CPU, {torch.get_num_threads()} threads", "results": results,
    }
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out + ".json", "w", encoding="utf-8") as fh:
        json.dump(summary, fh, indent=2)
    lines = [f"# MiniLLM vs SFT vs KD on {len(rows)} held-out ANLI prompts (teacher {args.teacher})", "",
             f"Reverse KL from {args.samples} pure-student samples per prompt (<= {args.max_new_tokens} new tokens, "
             f"temperature 1); answers greedy (<= {args.answer_max_tokens} tokens), first word compared.", "",
             "| model | rev-KL seq (nats) | rev-KL k3 / token | exact token rev-KL | resp. len | teacher agreement "
             "| answer acc. | label-word rate | greedy first words |",
             "|---|---|---|---|---|---|---|---|---|"]
    for name, r in results.items():
        counts = ", ".join(f"{k or '(none)'} {v}" for k, v in r["answer_counts"].items())
        lines.append(f"| {name} | {r['rev_kl_seq']:.3f} | {r['rev_kl_k3']:.3f} | {r['rev_kl_token_exact']:.3f} | "
                     f"{'-' if r['response_len'] is None else format(r['response_len'], '.1f')} | {r['teacher_agreement']:.3f} | {r['answer_accuracy']:.3f} | "
                     f"{r['label_word_rate']:.3f} | {counts} |")
    with open(args.out + ".md", "w", encoding="utf-8") as fh:
        fh.write("\n".join(lines) + "\n")
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
