"""Build an offline top-k teacher cache: ``python -m kd_engine.teacher_cache --teacher T --train_file F --top_k K
--output_dir C`` (also under torchrun / deepspeed / mpirun: one shard per rank).

The training file is tokenized exactly as ``--method kd`` does (same columns, max length, tokenizer); for every
real target token the teacher's top-k token ids, log-probabilities at ``--temperature`` and the log of the
remaining mass are stored (format and bytes/token: ``teacher_cache_store``). Rank r takes examples
``r, r + W, ...`` of each chunk of ``--chunk_size`` examples and writes one part file per chunk; a killed build
rerun with the same arguments skips the parts already written; when all are done each rank merges its parts into
``shard-r.pt`` and rank 0 writes ``complete.json``. Train with ``--method kd --teacher_cache C`` (no teacher loaded).
"""
from __future__ import annotations

import argparse
import logging
import os
import sys

logger = logging.getLogger("kd_engine")
LOGP_DTYPES = ("fp16", "bf16", "fp32")


def parse(argv):
    ap = argparse.ArgumentParser(prog="python -m kd_engine.teacher_cache", description=__doc__.split("\n")[0])
    ap.add_argument("--teacher", required=True, help="teacher model (path, hub id or offline:NAME)")
    ap.add_argument("--train_file", required=True, help="training data, as passed to --method kd")
    ap.add_argument("--output_dir", required=True, help="cache folder to create (or resume)")
    ap.add_argument("--top_k", type=int, default=32, help="teacher tokens kept per position (1..vocab)")
    ap.add_argument("--temperature", type=float, default=2.0, help="temperature of the cached log-probs "
                    "(must equal the training run's --temperature)")
    ap.add_argument("--tail_samples", type=int, default=8, help="tokens sampled per position from the teacher's tail "
                    "(outside the top k; 0 = store only the tail's mass): makes the loss an unbiased full-KL estimate")
    ap.add_argument("--seed", type=int, default=0, help="seed of the tail samples (with each example's content hash)")
    ap.add_argument("--max_length", type=int, default=128, help="max tokens per example (as in training)")
    ap.add_argument("--text_column", default="text", help="text (or prompt / source) column")
    ap.add_argument("--target_column", default=None, help="response / target column (prompt-response or seq2seq)")
    ap.add_argument("--task", default="auto", help="auto | causal_lm | seq2seq_lm")
    ap.add_argument("--tokenizer", default=None, help="tokenizer (default: the teacher's)")
    ap.add_argument("--batch_size", type=int, default=8, help="examples per teacher forward")
    ap.add_argument("--chunk_size", type=int, default=256, help="examples per part file (resume granularity)")
    ap.add_argument("--teacher_dtype", default="fp32", help="fp32 | bf16 (the teacher's compute dtype)")
    ap.add_argument("--logp_dtype", default="fp16", help="fp16 | bf16 | fp32: stored log-prob precision "
                    "(6 (k+1+tail_samples) bytes/token at fp16/bf16, 8 (...) at fp32)")
    ap.add_argument("--teacher_tp", type=int, default=1, help="split the teacher over N ranks (tensor parallel, "
                    "transformers' tp_plan): each group of N consecutive ranks holds one copy")
    ap.add_argument("--zero3", type=lambda v: str(v).lower() in ("1", "true", "yes"), default=False,
                    help="partition the teacher across all ranks with DeepSpeed ZeRO-3 (for a model --teacher_tp "
                    "cannot split)")
    ap.add_argument("--zero3_persistence_threshold", type=int, default=100000, help="with --zero3: parameters of "
                    "fewer elements stay whole on every rank (DeepSpeed's stage3_param_persistence_threshold)")
    ap.add_argument("--local_rank", "--local-rank", type=int, default=-1, help=argparse.SUPPRESS)  # deepspeed launcher
    return ap.parse_args(argv)


def _validate(a, tokenizer) -> None:
    from .errors import ConfigError

    if not os.path.isfile(a.train_file):
        raise ConfigError(f"--train_file {a.train_file}: no such file")
    if a.top_k <= 0 or (tokenizer is not None and a.top_k > len(tokenizer)):
        raise ConfigError(f"top_k must be in [1, vocab size{f' {len(tokenizer)}' if tokenizer else ''}]; got "
                          f"{a.top_k}")
    if a.tail_samples < 0:
        raise ConfigError(f"tail_samples must be >= 0; got {a.tail_samples}")
    if a.temperature <= 0:
        raise ConfigError(f"temperature must be > 0; got {a.temperature}")
    for key in ("max_length", "batch_size", "chunk_size", "teacher_tp"):
        if getattr(a, key) < 1:
            raise ConfigError(f"{key} must be >= 1; got {getattr(a, key)}")
    if a.task not in ("auto", "causal_lm", "seq2seq_lm"):
        raise ConfigError(f"task must be auto, causal_lm or seq2seq_lm; got {a.task!r}")
    if a.logp_dtype not in LOGP_DTYPES:
        raise ConfigError(f"logp_dtype must be fp16, bf16 or fp32; got {a.logp_dtype!r}")
    if a.teacher_dtype not in ("fp32", "bf16"):
        raise ConfigError(f"teacher_dtype must be fp32 or bf16; got {a.teacher_dtype!r}")
    if a.zero3 and a.teacher_tp > 1:
        raise ConfigError("--zero3 and --teacher_tp exclude each other: pick one way to split the teacher")
    if a.zero3_persistence_threshold < 0:
        raise ConfigError(f"zero3_persistence_threshold must be >= 0; got {a.zero3_persistence_threshold}")


def train_config(a):
    """The engine config ``--method kd`` would have for the same data options (tokenization must be identical)."""
    from .config import TrainConfig

    cfg = TrainConfig()
    cfg.teacher, cfg.train_file, cfg.max_length, cfg.teacher_tp = a.teacher, a.train_file, a.max_length, a.teacher_tp
    cfg.text_column, cfg.target_column, cfg.eval_split, cfg.eval_file = a.text_column, a.target_column, 0.0, None
    return cfg


def build(a, rank: int = 0, world: int = 1) -> dict:
    import torch

    from . import teacher_cache_store as store
    from .data.supervised import build_supervised_data
    from .dist import barrier, broadcast_object
    from .errors import KDError
    from .input_files import load_tensors, read_json
    from .teachers.sparse_rows import forward_logits, rows_from_logits
    from .models.build import load_teacher_model, resolve_task
    from .models.loading import load_tokenizer

    _validate(a, None)  # cheap checks first
    tok = load_tokenizer(a.tokenizer or a.teacher)
    _validate(a, tok)
    if a.top_k == len(tok):
        a.tail_samples = 0  # nothing outside the top k
    cfg = train_config(a)
    task = resolve_task(a.task, cfg)
    if task not in ("causal_lm", "seq2seq_lm"):
        raise KDError(f"teacher caches are for causal and seq2seq LMs; {a.teacher} is {task}")
    manifest = store.make_manifest(teacher=a.teacher, tokenizer=tok, tokenizer_name=a.tokenizer or a.teacher,
                                   train_file=a.train_file, text_column=a.text_column, target_column=a.target_column,
                                   task=task, max_length=a.max_length, top_k=a.top_k, temperature=a.temperature,
                                   logp_dtype=a.logp_dtype, tail_samples=a.tail_samples, seed=a.seed)
    data = build_supervised_data(cfg, tok, task)  # bad/empty data fails here, before anything is written
    if len(data.train) == 0:
        raise KDError(f"{a.train_file}: no examples")
    if a.teacher_tp > 1:  # before the cache folder is written
        from .models.loading import load_config
        from .models.tensor_parallel import check_tp_request

        check_tp_request(load_config(a.teacher), a.teacher_tp, world, a.teacher)
    error = None
    if rank == 0:
        try:
            store.open_for_build(a.output_dir, manifest)
        except KDError as e:
            error = str(e)
    error = broadcast_object(error)  # every rank stops on rank 0's error (no rank left waiting)
    if error:
        raise KDError(error)
    done = os.path.join(a.output_dir, store.COMPLETE)
    if os.path.isfile(done):
        return read_json(done, "teacher cache marker")
    teacher = load_teacher_model(cfg, task).eval()
    if a.teacher_dtype == "bf16":
        teacher = teacher.to(torch.bfloat16)
    for p in teacher.parameters():
        p.requires_grad_(False)
    if a.zero3:
        teacher = zero3_teacher(teacher, a)
    collective = a.teacher_tp > 1 or a.zero3  # every rank takes part in every forward
    model = getattr(teacher, "module", teacher)  # the model's config for its inputs, not a DeepSpeed engine's
    vocab, n = len(tok), len(data.train)
    ldt = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[a.logp_dtype]
    for start in range(0, n, a.chunk_size):
        path = store.part_path(a.output_dir, start, rank)
        if all_ranks_have(os.path.exists(path), world):  # a split teacher needs every rank of its group forwarding
            continue
        mine = list(range(start + rank, min(n, start + a.chunk_size), world))
        parts = {"keys": [], "offsets": [0], "ids": [], "logp": [], "log_tail": [], "targets": [], "tail_ids": [],
                 "tail_logp": []}
        per_rank = -(-(min(n, start + a.chunk_size) - start) // world)
        for b in range(0, per_rank, a.batch_size):  # the same number of forwards on every rank
            idx = mine[b:b + a.batch_size]
            if not idx and not collective:
                break
            batch = data.collate_fn([data.train[i] for i in (idx or [start])])  # [start]: a forward for the group
            logits = forward_logits(teacher, model, batch, task)
            if not idx:
                continue
            rows = rows_from_logits(logits, batch, task, a.top_k, a.temperature, vocab, a.tail_samples, a.seed)
            parts["keys"] += rows["keys"]
            for n_rows in rows["counts"]:
                parts["offsets"].append(parts["offsets"][-1] + n_rows)
            if a.tail_samples:
                parts["tail_ids"].append(rows["tail_ids"])
                parts["tail_logp"].append(rows["tail_logp"].to(ldt))
            parts["ids"].append(rows["ids"])
            parts["logp"].append(rows["logp"].to(ldt))
            parts["log_tail"].append(rows["log_tail"].to(ldt))
            parts["targets"].append(rows["targets"])
        def cat(name, shape, dt):
            return torch.cat(parts[name]) if parts[name] else torch.empty(shape, dtype=dt)

        merged = {"keys": parts["keys"], "offsets": torch.tensor(parts["offsets"], dtype=torch.int64),
                  "ids": cat("ids", (0, a.top_k), torch.int32), "logp": cat("logp", (0, a.top_k), ldt),
                  "log_tail": cat("log_tail", (0,), ldt), "targets": cat("targets", (0,), torch.int32)}
        if a.tail_samples:
            merged["tail_ids"] = cat("tail_ids", (0, a.tail_samples), torch.int32)
            merged["tail_logp"] = cat("tail_logp", (0, a.tail_samples), ldt)
        store.save(merged, path)
        logger.info("teacher cache: examples %d-%d done (rank %d)", start, min(n, start + a.chunk_size), rank)
    starts = list(range(0, n, a.chunk_size))
    pieces = [load_tensors(store.part_path(a.output_dir, s, rank), "teacher cache part") for s in starts]
    store.save(store.concat_parts(pieces, a.top_k, ldt, a.tail_samples), store.shard_path(a.output_dir, rank))
    barrier()
    for s in starts:
        os.remove(store.part_path(a.output_dir, s, rank))
    info = None
    if rank == 0:
        shards = [load_tensors(store.shard_path(a.output_dir, r), "teacher cache shard", mmap=True)
                  for r in range(world)]
        tokens = sum(int(sh["offsets"][-1]) for sh in shards)
        info = {"shards": [os.path.basename(store.shard_path(a.output_dir, r)) for r in range(world)],
                "examples": n, "tokens": tokens, "bytes_per_token": (4 + ldt.itemsize) * (a.top_k + 1 + a.tail_samples),
                "logp_dtype": a.logp_dtype, "top_k": a.top_k, "tail_samples": a.tail_samples}
        store.save(info, os.path.join(a.output_dir, store.COMPLETE))
    return broadcast_object(info)


def zero3_teacher(teacher, a):
    """The teacher partitioned across every rank by a DeepSpeed ZeRO-3 inference engine (no optimizer)."""
    import deepspeed

    from .engine.teacher import freeze

    ds = {"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1, "steps_per_print": 10 ** 9,
          "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": a.zero3_persistence_threshold}}
    if a.teacher_dtype == "bf16":
        ds["bf16"] = {"enabled": True}
    engine, *_ = deepspeed.initialize(model=teacher, config=ds)
    freeze(engine.module)
    engine.eval()
    return engine


def all_ranks_have(flag: bool, world: int) -> bool:
    """True when ``flag`` is true on every rank (a collective when world > 1)."""
    if world == 1:
        return flag
    import torch
    import torch.distributed as dist

    t = torch.tensor([int(flag)])
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return bool(t.item())


def main(argv=None) -> int:
    from .errors import KDError

    a = parse(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s] %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    from .dist import end_process, init_distributed, setup_environment

    try:

        setup_environment()  # launcher variables (torchrun, deepspeed, mpirun), CPU accelerator when no GPU
        rank, world = 0, 1
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            rank, world, _ = init_distributed()
        info = build(a, rank, world)
    except KDError as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        return end_process(2, meet=False)
    if rank == 0:
        print(f"teacher cache: {info['examples']} examples, {info['tokens']} tokens, top-{info['top_k']}"
              f"{' + %d tail samples' % info['tail_samples'] if info.get('tail_samples') else ''}, "
              f"{info['bytes_per_token']} bytes/token -> {a.output_dir}", flush=True)
    return end_process(0, meet=True)


if __name__ == "__main__":
    sys.exit(main())
