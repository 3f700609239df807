"""Capacity planner: will this teacher / student pair fit, placed how, at which ZeRO stage?

    python -m kd_engine.plan --teacher meta-llama/Llama-3.1-70B --student meta-llama/Llama-3.1-8B \\
        --gpus_per_node 8 --gpu_memory_gib 80 --nodes 2 --seq 4096 --micro 1

For every teacher placement (a replica on each GPU, ZeRO-3 partitioned over all GPUs, tensor parallel over a
node's GPUs, an offline cache) and ZeRO stage 0-3 of the student it prints the memory per GPU (student states from
DeepSpeed's estimators, the student's activations, the teacher), whether it fits, and the teacher's traffic per
optimizer step; then a recommended command line. Models are given as a local folder, hub id, ``offline:<name>`` or
a ``config.json``: only the config is read (parameters are counted on the meta device). The arithmetic and its
limits: kd_engine/memory_model.py; its check against measured memory: benchmarks/plan_validation.py.
"""
from __future__ import annotations

import argparse
import sys

from .errors import KDError

PLACEMENTS = ("replica", "tp", "zero3", "cache")
ORDER = ("replica", "tp", "group", "zero3", "cache")  # recommendation order (see recommend)
HEADROOM = 0.9  # of a GPU's memory usable for these terms (the CUDA context, allocator and buffers need the rest)


def parse(argv):
    ap = argparse.ArgumentParser(prog="python -m kd_engine.plan", description=__doc__.split("\n")[0])
    ap.add_argument("--teacher", required=True, help="teacher: folder, hub id, offline:<name> or config.json")
    ap.add_argument("--student", required=True, help="student: folder, hub id, offline:<name> or config.json")
    ap.add_argument("--gpus_per_node", type=int, default=8, help="GPUs per node")
    ap.add_argument("--gpu_memory_gib", type=float, default=80.0, help="memory of one GPU, GiB")
    ap.add_argument("--nodes", type=int, default=1, help="nodes")
    ap.add_argument("--seq", type=int, default=2048, help="tokens per example (--max_length)")
    ap.add_argument("--micro", type=int, default=1, help="micro-batch per GPU (--per_device_train_batch_size)")
    ap.add_argument("--accumulation", type=int, default=1, help="micro-batches per step (gradient_accumulation_steps)")
    ap.add_argument("--dtype", default="bf16", choices=("bf16", "fp16", "fp32"), help="training dtype")
    ap.add_argument("--checkpointing", action="store_true", help="with --gradient_checkpointing")
    ap.add_argument("--attention", default="sdpa", choices=("sdpa", "flash_attention_2", "eager"),
                    help="attention kernel (eager materialises the s x s probabilities)")
    ap.add_argument("--kd_loss", default="fused", choices=("fused", "naive"), help="the KD loss implementation")
    ap.add_argument("--offload", action="store_true", help="ZeRO CPU offload of the optimizer (and ZeRO-3 params)")
    return ap.parse_args(argv)


def _check(a) -> None:
    for key in ("gpus_per_node", "nodes", "seq", "micro", "accumulation"):
        if getattr(a, key) < 1:
            raise KDError(f"{key} must be >= 1; got {getattr(a, key)}")
    if not 0 < a.gpu_memory_gib < 1e6:
        raise KDError(f"gpu_memory_gib must be a positive size in GiB; got {a.gpu_memory_gib}")


def load_shape(name: str):
    """The memory model's Shape of a model, from its config only; one error when it cannot be sized."""
    import os

    from . import memory_model as mm

    try:
        if name.endswith(".json") and os.path.isfile(name):
            from transformers import AutoConfig

            from .input_files import read_json

            raw = read_json(name, "model config")
            if "model_type" not in raw:
                raise KDError(f"cannot size {name}: the config has no model_type")
            config = AutoConfig.for_model(**raw)
        else:
            from .models.loading import load_config

            config = load_config(name)
        return mm.shape_of(config)
    except KDError:
        raise
    except Exception as exc:  # a config transformers cannot build a model from
        raise KDError(f"cannot size {name}: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}") from None


def tp_size(shape, gpus_per_node: int) -> int:
    """The largest tensor-parallel size within a node that divides the teacher's heads and KV heads."""
    return max(n for n in range(1, gpus_per_node + 1)
               if gpus_per_node % n == 0 and shape.heads % n == 0 and shape.kv_heads % n == 0)


def rows(a, teacher, student) -> list[dict]:
    from . import memory_model as mm

    gpus, nbytes = a.gpus_per_node * a.nodes, {"bf16": 2, "fp16": 2, "fp32": 4}[a.dtype]
    tp = tp_size(teacher, a.gpus_per_node)
    out = []
    for placement in PLACEMENTS:
        if placement == "tp" and (tp == 1 or not teacher.tensor_parallel):
            continue  # no tensor-parallel plan for this teacher, or no split of its heads within a node
        fused = a.kd_loss == "fused" and placement != "tp"  # a TP teacher returns gathered logits: the naive loss
        act = mm.activations(student, a.micro, a.seq, nbytes, a.checkpointing, a.attention == "eager", fused,
                             teacher_vocab=teacher.vocab)
        t_mem = mm.teacher_memory(teacher, placement, gpus, tp, nbytes, a.micro, a.seq, fused)
        traffic = mm.teacher_traffic(teacher, placement, gpus, tp, nbytes, a.micro, a.seq, a.accumulation)
        for stage in ((3,) if placement == "zero3" else (0, 1, 2, 3)):  # a ZeRO-3 teacher goes with a ZeRO-3 student
            states = mm.student_states(student, stage, gpus, a.nodes, a.dtype, a.offload)
            total = states + act + t_mem
            out.append({"placement": placement + (f" {tp}" if placement == "tp" else ""), "stage": stage,
                        "states": states, "activations": act, "teacher": t_mem, "total": total,
                        "fits": total <= HEADROOM * a.gpu_memory_gib * mm.GIB, "traffic": traffic, "tp": tp})
    return out + group_rows(a, teacher, student, tp, nbytes)


def group_rows(a, teacher, student, tp: int, nbytes: int) -> list[dict]:
    """--teacher_ranks on the first node (TEACHER_NODES=1): the students train on the other nodes with no teacher
    weights at all; a teacher GPU holds 1/tp of the teacher (tp: a TP copy per group of a node's GPUs, else a
    replica), one micro-batch's forward and its dense fp32 logits and log-probabilities for the rows. The total is
    the larger of a student GPU's and a teacher GPU's memory."""
    from . import memory_model as mm

    if a.nodes < 2:
        return []
    tp_g = tp if teacher.tensor_parallel else 1
    tokens = a.micro * a.seq
    t_gpu = teacher.params * nbytes / tp_g + tokens * (teacher.hidden + teacher.intermediate) * nbytes * 2 \
        + 2 * tokens * teacher.vocab * 4
    students = (a.nodes - 1) * a.gpus_per_node
    act = mm.activations(student, a.micro, a.seq, nbytes, a.checkpointing, a.attention == "eager",
                         a.kd_loss == "fused", teacher_vocab=teacher.vocab)
    traffic = mm.teacher_traffic(teacher, "teacher_group", students, 1, nbytes, a.micro, a.seq, a.accumulation)
    out = []
    for stage in (0, 1, 2, 3):
        states = mm.student_states(student, stage, students, a.nodes - 1, a.dtype, a.offload)
        total = max(states + act, t_gpu)
        out.append({"placement": "group 1n" + (f" tp {tp_g}" if tp_g > 1 else ""), "stage": stage, "states": states,
                    "activations": act, "teacher": t_gpu, "total": total, "traffic": traffic, "tp": tp_g,
                    "fits": total <= HEADROOM * a.gpu_memory_gib * mm.GIB})
    return out


def recommend(a, table: list[dict]) -> str:
    """The first placement that fits, in the order replica (no teacher traffic), tensor parallel (its all-reduces stay
    inside a node), a teacher group on one node (sparse rows cross nodes, a few hundred bytes per token; that node
    does not train), ZeRO-3 (the whole teacher gathered across nodes for every micro-batch), cache (a build first);
    then the lowest ZeRO stage."""
    fitting = [r for r in table if r["fits"]]
    if not fitting:
        return ("nothing fits: add GPUs or nodes, lower --micro / --seq, use --checkpointing or --offload, or a "
                "smaller student")
    order = {p: n for n, p in enumerate(ORDER)}
    best = min(fitting, key=lambda r: (order[r["placement"].split()[0]], r["stage"]))
    opts = [f"--teacher {a.teacher}", f"--student {a.student}", f"--deepspeed ds_configs/zero{best['stage']}.json",
            f"--max_length {a.seq}", f"--per_device_train_batch_size {a.micro}"]
    if best["placement"].startswith(("tp", "group")) and best["tp"] > 1:
        opts.append(f"--teacher_tp {best['tp']}")
    if a.checkpointing:
        opts.append("--gradient_checkpointing true")
    if a.dtype != "fp32":
        opts.append(f"--teacher_dtype {a.dtype}")
    launch = (f"torchrun --nproc_per_node {a.gpus_per_node} launch/train.py" if a.nodes == 1
              else f"sbatch --nodes {a.nodes} scripts/slurm/train.sbatch")
    if best["placement"].startswith("group"):
        launch = f"TEACHER_NODES=1 sbatch --nodes {a.nodes} scripts/slurm/train.sbatch"
    if best["placement"] == "cache":
        opts[0] = "--teacher_cache DIR"
        launch = f"python -m kd_engine.teacher_cache --teacher {a.teacher} --output_dir DIR ...; then {launch}"
    return f"{launch} --method kd " + " ".join(opts)


def main(argv=None) -> int:
    a = parse(sys.argv[1:] if argv is None else argv)
    try:
        _check(a)
        teacher, student = load_shape(a.teacher), load_shape(a.student)
        table = rows(a, teacher, student)
    except KDError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    gib = 1024 ** 3
    print(f"teacher {a.teacher}: {teacher.params / 1e9:.2f} B params; student {a.student}: "
          f"{student.params / 1e9:.2f} B params; {a.nodes} x {a.gpus_per_node} GPUs of {a.gpu_memory_gib:g} GiB; "
          f"{a.micro} x {a.seq} tokens per micro-batch, {a.dtype}")
    print("memory per GPU in GiB; teacher traffic per optimizer step received by each GPU (tp: inside a node; zero3: "
          "across all GPUs)")
    print(f"{'teacher placement':<18} {'ZeRO':>4} {'student states':>15} {'activations':>12} {'teacher':>9} "
          f"{'total GiB':>10} {'fits':>5} {'teacher GiB/step':>17}")
    for r in table:
        print(f"{r['placement']:<18} {r['stage']:>4} {r['states'] / gib:>15.2f} {r['activations'] / gib:>12.2f} "
              f"{r['teacher'] / gib:>9.2f} {r['total'] / gib:>10.2f} {'yes' if r['fits'] else 'no':>5} "
              f"{r['traffic'] / gib:>17.2f}")
    if a.nodes >= 2:
        print(f"group 1n: the teacher group on 1 node ({a.gpus_per_node} GPUs; teacher column: one teacher GPU) serves "
              f"{(a.nodes - 1) * a.gpus_per_node} student GPUs; total: the larger of a student and a teacher GPU")
    print("recommended: " + recommend(a, table))
    return 0


if __name__ == "__main__":
    sys.exit(main())
