"""MiniLLM rollout throughput: KV-cached lockstep teacher-mixed sampling vs recomputing the full prefix each step.

Both variants are ``kd_engine.models.sampling.mixed_sample`` (``use_cache=True`` / ``False``) on the same models,
prompts and ``torch.Generator`` seed, so they must draw the same tokens (checked and reported). The models are
random-weight Llama models with SmolLM2-135M's architecture (hidden 576, 9 heads / 3 KV heads, MLP 1536,
vocabulary 49152, tied embeddings) shrunk in depth: teacher ``--teacher-layers`` (default 6), student
``--student-layers`` (default 3). Prompts are left-padded random token ids of ragged length (``--prompt-len`` / 2
to ``--prompt-len``); every row generates exactly ``--new-tokens`` tokens (no EOS), alpha = 0.2, pure sampling.

    python benchmarks/minillm_rollout.py                      # B=4, prompt <= 64, 64 new tokens, 1 thread
    python benchmarks/minillm_rollout.py --threads 1 --batch 8

Prints a table; the last line printed is a JSON object with ``rollout_speedup`` (cached tokens/s over uncached
tokens/s; target >= 5). The same figures go to ``benchmarks/results/minillm_rollout.{json,md}``.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
RESULTS = os.path.join(HERE, "results")
sys.path.insert(0, ROOT)

SMOLLM2_135M = dict(hidden_size=576, intermediate_size=1536, num_attention_heads=9, num_key_value_heads=3,
                    vocab_size=49152, max_position_embeddings=8192, rope_theta=100000.0, rms_norm_eps=1e-5,
                    tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, pad_token_id=2)


def build(layers: int, seed: int):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(num_hidden_layers=layers, **SMOLLM2_135M)
    cfg._attn_implementation = "sdpa"
    return LlamaForCausalLM(cfg).eval()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--prompt-len", type=int, default=64)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--teacher-layers", type=int, default=6)
    p.add_argument("--student-layers", type=int, default=3)
    p.add_argument("--alpha", type=float, default=0.2)
    p.add_argument("--threads", type=int, default=1, help="torch threads (1: stable on a shared machine)")
    p.add_argument("--repeats", type=int, default=2, help="timed runs of the cached variant (best is kept)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()

    import torch

    from kd_engine.models.sampling import mixed_sample

    torch.set_num_threads(args.threads)
    teacher, student = build(args.teacher_layers, args.seed), build(args.student_layers, args.seed + 1)
    V = SMOLLM2_135M["vocab_size"]
    g = torch.Generator().manual_seed(args.seed)
    B, P = args.batch, args.prompt_len
    ids = torch.randint(3, V, (B, P), generator=g)
    lens = torch.randint(P // 2, P + 1, (B,), generator=g)
    mask = (torch.arange(P)[None, :] >= (P - lens)[:, None]).long()  # left padding
    ids = ids.masked_fill(mask == 0, SMOLLM2_135M["pad_token_id"])

    def run(use_cache: bool, n: int):
        gen = torch.Generator().manual_seed(args.seed + 7)
        t0 = time.perf_counter()
        r = mixed_sample(student, teacher, ids, mask, max_new_tokens=n, eos_token_id=None,
                         pad_token_id=SMOLLM2_135M["pad_token_id"], alpha=args.alpha, generator=gen,
                         use_cache=use_cache)
        sec = time.perf_counter() - t0
        print(f"{'cached' if use_cache else 'uncached'} {n} new tokens: {sec:.2f} s", file=sys.stderr, flush=True)
        return r, sec

    run(True, 2), run(False, 2)  # warm-up (allocator, kernels)
    cached_times = []
    for _ in range(max(1, args.repeats)):
        r_cached, sec = run(True, args.new_tokens)
        cached_times.append(sec)
    r_full, full_sec = run(False, args.new_tokens)
    cached_sec = min(cached_times)
    n_tok = int(r_cached.response_mask.sum())
    same = bool(torch.equal(r_cached.response_ids, r_full.response_ids))
    max_lp_diff = float((r_cached.student_logprobs - r_full.student_logprobs).abs().max())
    rows = [("kv_cached_lockstep", cached_sec, n_tok / cached_sec), ("full_prefix_recompute", full_sec,
                                                                     int(r_full.response_mask.sum()) / full_sec)]
    speedup = rows[0][2] / rows[1][2]
    n_params = lambda m: sum(x.numel() for x in m.parameters())  # noqa: E731
    result = {
        "rollout_speedup": round(speedup, 2),
        "cached_tokens_per_s": round(rows[0][2], 1),
        "uncached_tokens_per_s": round(rows[1][2], 1),
        "cached_seconds": round(cached_sec, 3),
        "uncached_seconds": round(full_sec, 3),
        "tokens_equal": same,
        "max_abs_student_logprob_diff": max_lp_diff,
        "batch": B, "prompt_len_max": P, "prompt_lens": lens.tolist(), "new_tokens": args.new_tokens,
        "generated_tokens": n_tok, "alpha": args.alpha,
        "teacher": f"Llama (SmolLM2-135M arch) {args.teacher_layers} layers, {n_params(teacher) / 1e6:.1f}M params",
        "student": f"Llama (SmolLM2-135M arch) {args.student_layers} layers, {n_params(student) / 1e6:.1f}M params",
        "threads": args.threads, "load_avg_1m_at_end": round(os.getloadavg()[0], 2), "torch": torch.__version__,
        "cpu": platform.processor() or platform.machine(),
    }
    table = ["| variant | seconds | tokens/s |", "|---|---|---|"]
    table += [f"| {name} | {sec:.2f} | {tps:.1f} |" for name, sec, tps in rows]
    md = "\n".join([
        "# MiniLLM rollout: KV-cached lockstep mixed sampling vs full-prefix recompute", "",
        f"`python benchmarks/minillm_rollout.py --batch {B} --prompt-len {P} --new-tokens {args.new_tokens} "
        f"--teacher-layers {args.teacher_layers} --student-layers {args.student_layers} --threads {args.threads}`", "",
        f"Teacher: {result['teacher']}; student: {result['student']}; random weights; alpha {args.alpha}; "
        f"{B} prompts of {lens.tolist()} tokens; {args.new_tokens} new tokens each; CPU, {args.threads} threads; "
        f"1-minute load average at the end {result['load_avg_1m_at_end']} (shared machine).", "",
        *table, "",
        f"Speedup: **{speedup:.1f}x**. Same tokens drawn by both variants: {same} "
        f"(max |log q| difference {max_lp_diff:.2e}).", "",
    ])
    print(md)
    os.makedirs(RESULTS, exist_ok=True)
    with open(os.path.join(RESULTS, "minillm_rollout.json"), "w") as f:
        json.dump(result, f, indent=2)
    with open(os.path.join(RESULTS, "minillm_rollout.md"), "w") as f:
        f.write(md)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
