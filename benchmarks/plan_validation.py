"""The planner's memory model (kd_engine/memory_model.py) against the real engine's measured step memory, at three
model sizes, side by side in one run.

For each size a Llama teacher with random weights is written, and a child process trains ``--method kd`` (student:
every teacher layer copied, fused loss, eager attention, ZeRO-0 fp32 on this CPU, packed full rows) through the
real engine. The child measures the step peak: peak RSS growth over the training steps above the resting state once
models, data and engines are built (gradients, Adam moments, activations, the loss's chunks, the teacher's
transient forward). The planner predicts the same quantity from the student's shape: gradients + Adam moments
(``student_states`` minus the resident parameters) + ``activations`` + the teacher's one-layer forward.

    python benchmarks/plan_validation.py           # JSON last line; benchmarks/results/plan_validation.{json,md}

``plan_error_max``: the largest |predicted - measured| / measured over the sizes (target <= 0.15).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import RESULTS, ROOT, reset_peak, single_rank_env, status_kib, timed_fit  # noqa: E402

# (hidden, intermediate, heads, kv heads, layers, sequence length, micro-batch)
SIZES = [(256, 704, 4, 2, 4, 256, 4), (384, 1024, 6, 2, 4, 384, 4), (512, 1376, 8, 4, 4, 256, 8)]


def child(args) -> None:
    argv = ["--method", "kd", "--teacher", args.teacher, "--student.layers", str(args.layers), "--train_file",
            args.train_file, "--packing", "true", "--max_length", str(args.seq), "--per_device_train_batch_size",
            str(args.micro), "--max_steps", "3", "--learning_rate", "1e-4", "--output_dir", args.out, "--export",
            "false",
            "--disable_tqdm", "true", "--report_to", "none", "--attn_implementation", "eager"]
    marks = {}

    def before_step(tr):
        if tr.global_step == 0:
            marks["base"] = status_kib("VmRSS")
            marks["exact"] = reset_peak()

    timed_fit(argv, before_step)
    print("RESULT " + json.dumps({"step_peak_bytes": (status_kib("VmHWM") - marks["base"]) * 1024,
                                  "exact": marks["exact"]}), flush=True)


def _teacher(path: str, size) -> None:
    sys.path.insert(0, os.path.join(ROOT, "tests"))
    import tiny
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    h, i, heads, kv, layers, seq, _ = size
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(vocab_size=tiny.vocab_size(), hidden_size=h, intermediate_size=i,
                                 num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv,
                                 max_position_embeddings=seq, pad_token_id=0, bos_token_id=5, eos_token_id=6,
                                 tie_word_embeddings=False)).save_pretrained(path)
    tiny.make_tokenizer(path)


def predict(teacher: str, seq: int, micro: int) -> int:
    sys.path.insert(0, ROOT)
    from transformers import AutoConfig

    from kd_engine import memory_model as mm

    s = mm.shape_of(AutoConfig.from_pretrained(teacher))
    states = mm.student_states(s, 0, 1, dtype="fp32") - 4 * s.params  # the parameters are resident before
    act = mm.activations(s, micro, seq, 4, materialised_attention=True, fused_loss=True)
    teacher_fwd = mm.teacher_memory(s, "replica", 1, dtype_bytes=4, micro=micro, seq=seq) - 4 * s.params
    return states + act + teacher_fwd


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--teacher", help=argparse.SUPPRESS)
    ap.add_argument("--train_file", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    ap.add_argument("--layers", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--seq", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--micro", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--no_write", action="store_true", help="print only (the test's mode)")
    args = ap.parse_args()
    if args.child:
        child(args)
        return 0
    sys.path.insert(0, os.path.join(ROOT, "tests"))
    import tiny

    from kd_engine.dist import free_port

    work = tempfile.mkdtemp(prefix="plan_validation_")
    train = tiny.write_lines(os.path.join(work, "train.txt"), tiny.sentences(1500, min_len=20, max_len=40))
    rows = []
    for n, size in enumerate(SIZES):
        teacher = os.path.join(work, f"teacher{n}")
        _teacher(teacher, size)
        cmd = [sys.executable, os.path.abspath(__file__), "--child", "--teacher", teacher, "--train_file", train,
               "--out", os.path.join(work, f"run{n}"), "--layers", str(size[4]), "--seq", str(size[5]), "--micro",
               str(size[6])]
        env = single_rank_env(free_port(), DS_ACCELERATOR="cpu", OMP_NUM_THREADS="2",
                              KD_ENGINE_CACHE=os.path.join(work, "cache"))
        r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
        line = [x for x in r.stdout.splitlines() if x.startswith("RESULT ")]
        if r.returncode or not line:
            print(r.stderr[-3000:], file=sys.stderr)
            return 1
        measured = json.loads(line[0][7:])["step_peak_bytes"]
        predicted = predict(teacher, size[5], size[6])
        rows.append({"hidden": size[0], "intermediate": size[1], "heads": size[2], "layers": size[4], "seq": size[5],
                     "micro": size[6], "measured_mib": round(measured / 2 ** 20, 1),
                     "predicted_mib": round(predicted / 2 ** 20, 1),
                     "error": round((predicted - measured) / measured, 3)})
    res = {"sizes": rows, "plan_error_max": max(abs(r["error"]) for r in rows)}
    if not args.no_write:
        os.makedirs(RESULTS, exist_ok=True)
        with open(os.path.join(RESULTS, "plan_validation.json"), "w") as f:
            json.dump(res, f, indent=1)
        with open(os.path.join(RESULTS, "plan_validation.md"), "w") as f:
            f.write("| hidden | intermediate | heads | layers | seq | micro | measured MiB | predicted MiB | error |\n"
                    "|---|---|---|---|---|---|---|---|---|\n")
            f.writelines(f"| {r['hidden']} | {r['intermediate']} | {r['heads']} | {r['layers']} | {r['seq']} | "
                         f"{r['micro']} | {r['measured_mib']} | {r['predicted_mib']} | {r['error']} |\n" for r in rows)
    print(json.dumps(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
