"""Engine overhead: one KD training step of kd_engine (DeepSpeed ZeRO-0, one process) vs a plain PyTorch loop doing
the same forward/backward/AdamW (torch's fused kernel) on the same models and batches, measured side by side in one
run, plus the machine's measured matmul FLOP/s for an MFU figure.

    python benchmarks/engine_overhead.py [--steps 8] [--hidden 768] [--seq 256] [--batch 8]

Last line printed: {"engine_vs_plain": plain step time / engine step time (target >= 0.95),
                    "mfu": achieved model FLOP/s of the engine step / measured matmul FLOP/s (target >= 0.40)}
Also writes benchmarks/results/engine_overhead.{json,md}.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def matmul_flops(n: int = 2048, reps: int = 10) -> float:
    import torch

    a, b = torch.randn(n, n), torch.randn(n, n)
    for _ in range(3):
        a @ b
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        a @ b
        times.append(time.perf_counter() - t)
    return 2 * n ** 3 / min(times)


def build_models(d: str, hidden: int, vocab: int, teacher_layers: int, student_layers: int):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    def make(path, layers, seed):
        torch.manual_seed(seed)
        cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=hidden * 8 // 3,
                          num_hidden_layers=layers, num_attention_heads=hidden // 64, num_key_value_heads=hidden // 64,
                          max_position_embeddings=1024, tie_word_embeddings=False, pad_token_id=0)
        m = LlamaForCausalLM(cfg)
        m.save_pretrained(path)
        return m

    make(os.path.join(d, "teacher"), teacher_layers, 0)
    make(os.path.join(d, "student"), student_layers, 1)


def corpus(path: str, n: int, seq: int) -> None:
    """Real text (WikiText-2 from ../shared/data when present, else a generated stand-in) with >= seq tokens a line."""
    src = os.path.join(ROOT, "..", "shared", "data", "wikitext-2-raw", "wiki.valid.raw")
    words = open(src, encoding="utf-8").read().split() if os.path.isfile(src) else \
        [f"w{i % 997}" for i in range(200000)]
    per = seq * 2
    with open(path, "w", encoding="utf-8") as fh:
        for i in range(n):
            fh.write(" ".join(words[(i * per) % (len(words) - per):][:per]) + "\n")


def model_flops_per_step(student, teacher, tokens: int, seq: int) -> float:
    """6 N tokens for the trained student + 2 N tokens for the teacher forward (N without the input embedding),
    plus attention score/value matmuls (12 L n d per token trained, 4 L n d forward only)."""
    def n_params(m):
        return sum(p.numel() for n, p in m.named_parameters() if "embed_tokens" not in n)

    def attn(m):
        c = m.config
        return c.num_hidden_layers * seq * c.hidden_size
    return tokens * (6 * n_params(student) + 12 * attn(student) + 2 * n_params(teacher) + 4 * attn(teacher))


def main() -> None:
    ap = argparse.ArgumentParser()
    for name, default in (("steps", 8), ("warmup", 2), ("hidden", 768), ("seq", 256), ("batch", 8),
                          ("teacher_layers", 6), ("student_layers", 3)):
        ap.add_argument(f"--{name}", type=int, default=default)
    args = ap.parse_args()

    from kd_engine.dist import free_port, setup_environment

    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    setup_environment()
    import torch

    from kd_engine.config import build_config
    from kd_engine.engine.trainer import Trainer
    from kd_engine.losses.kd import logit_kd_loss, shift_for_causal_lm
    from kd_engine.models.loading import offline_model_path

    torch.set_num_threads(os.cpu_count() or 1)
    tok_dir = offline_model_path("all-minilm-l6-v2")
    vocab = 30522
    tmp = tempfile.mkdtemp(prefix="kd-bench-")
    build_models(tmp, args.hidden, vocab, args.teacher_layers, args.student_layers)
    n_steps = args.steps + args.warmup
    corpus(os.path.join(tmp, "train.txt"), args.batch * n_steps, args.seq)

    argv = ["--method", "kd", "--teacher", os.path.join(tmp, "teacher"), "--student", os.path.join(tmp, "student"),
            "--tokenizer", tok_dir, "--train_file", os.path.join(tmp, "train.txt"), "--max_length", str(args.seq),
            "--per_device_train_batch_size", str(args.batch), "--max_steps", str(n_steps), "--learning_rate", "1e-4",
            "--output_dir", os.path.join(tmp, "out"), "--report_to", "none", "--disable_tqdm", "true",
            "--temperature", "2.0", "--alpha", "0.5", "--group_by_length", "false", "--lr_scheduler_type",
            "constant", "--max_grad_norm", "0"]
    tr = Trainer(build_config(argv))
    tr._setup()
    from kd_engine.data.sampler import infinite_batches

    tr._batch_iter = infinite_batches(tr.sampler)
    # the exact batches the engine will see, for the plain loop
    batches = [tr.collate(tr.data.train, idx) for idx in list(iter(tr.sampler))[:n_steps]]
    tr.sampler.load_state_dict({"epoch": 0, "position": 0, "seed": tr.cfg.seed,
                                "num_examples": len(tr.data.train), "world_size": 1, "batch_size": args.batch})
    tr._batch_iter = infinite_batches(tr.sampler)

    # plain PyTorch: same weights (fresh copies from disk), same batches, same loss, torch's fused AdamW
    from transformers import AutoModelForCausalLM

    student = AutoModelForCausalLM.from_pretrained(os.path.join(tmp, "student")).train()
    teacher = AutoModelForCausalLM.from_pretrained(os.path.join(tmp, "teacher")).eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    # the fastest correct optimizer on this device: torch's fused AdamW kernel (CPU and GPU)
    opt = torch.optim.AdamW(student.parameters(), lr=1e-4, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0,
                            fused=True)

    def plain_step(i):
        b = batches[i]
        inputs = {"input_ids": b["input_ids"], "attention_mask": b["attention_mask"]}
        s_logits = student(**inputs).logits
        with torch.no_grad():
            t_logits = teacher(**inputs).logits
        s, lab = shift_for_causal_lm(s_logits, b["labels"])
        t, _ = shift_for_causal_lm(t_logits, b["labels"])
        loss = sum(logit_kd_loss(s, t, lab, 2.0, 0.5, vocab).values())
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    # interleaved: engine step i, then plain step i on the same batch, so load drift hits both alike
    engine_times, plain_times = [], []
    for i in range(n_steps):
        t = time.perf_counter()
        tr.method.train_step(tr.ctx)
        engine_times.append(time.perf_counter() - t)
        t = time.perf_counter()
        plain_step(i)
        plain_times.append(time.perf_counter() - t)
    engine_times, plain_times = engine_times[args.warmup:], plain_times[args.warmup:]
    peak = matmul_flops()
    eng, pln = statistics.median(engine_times), statistics.median(plain_times)
    tokens = args.batch * args.seq
    flops = model_flops_per_step(tr.student.module, tr.teacher_model, tokens, args.seq)
    result = {
        "engine_vs_plain": round(pln / eng, 4),
        "mfu": round(flops / eng / peak, 4),
        "engine_step_s": round(eng, 4), "plain_step_s": round(pln, 4),
        "plain_mfu": round(flops / pln / peak, 4),
        "matmul_gflops": round(peak / 1e9, 2), "model_gflop_per_step": round(flops / 1e9, 2),
        "config": vars(args), "threads": torch.get_num_threads(),
    }
    out_dir = os.path.join(ROOT, "benchmarks", "results")
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "engine_overhead.json"), "w") as fh:
        json.dump(result, fh, indent=2)
    md = ["# engine_overhead", "", "| | engine (kd_engine, ZeRO-0) | plain PyTorch |", "|---|---|---|",
          f"| median step (s) | {eng:.4f} | {pln:.4f} |",
          f"| MFU | {result['mfu']:.3f} | {result['plain_mfu']:.3f} |", "",
          f"engine_vs_plain = {result['engine_vs_plain']}, matmul peak {result['matmul_gflops']} GFLOP/s, "
          f"{result['model_gflop_per_step']} GFLOP per step, config {vars(args)}"]
    with open(os.path.join(out_dir, "engine_overhead.md"), "w") as fh:
        fh.write("\n".join(md) + "\n")
    print("\n".join(md))
    print(json.dumps({"engine_vs_plain": result["engine_vs_plain"], "mfu": result["mfu"]}))


if __name__ == "__main__":
    main()
