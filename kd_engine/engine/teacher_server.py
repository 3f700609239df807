"""A teacher rank's side of ``--teacher_ranks``: load the teacher (tensor-parallel over its group with
``--teacher_tp``), report ready, then answer each student's micro-batches with sparse rows until every student it
serves has finished (protocol: ``teacher_service``). The teacher is stateless: nothing here is checkpointed."""
from __future__ import annotations

import logging
from collections import deque

import torch

from ..errors import KDError
from . import faults, teacher_service as svc

logger = logging.getLogger("kd_engine")
MAX_IN_FLIGHT = 64  # answers sent but not yet received; the oldest is waited for beyond this


def load(parsed, split):
    """(teacher module to call, model whose config gives decoder inputs, task, vocabulary size, device)."""
    from .. import dist
    from ..models.build import load_teacher_model, resolve_task
    from ..models.loading import check_teacher_tokenizer
    from ..models.tensor_parallel import TensorParallelTeacher
    from .teacher import DTYPES, freeze

    cfg, opts = parsed.train, parsed.method_options
    method = parsed.method_cls(cfg, opts)
    tok = method.load_tokenizer(None)  # the student's tokenizer, as the student ranks load it
    task = resolve_task(opts.task, cfg)
    teacher = load_teacher_model(cfg, task)
    model = teacher.module if isinstance(teacher, TensorParallelTeacher) else teacher  # every group rank: one input
    check_teacher_tokenizer(cfg, tok, model, None)
    rows = getattr(model.config.get_text_config(), "vocab_size", None)
    if rows is not None and rows < len(tok):
        raise KDError(f"teacher has {rows} logit rows but the tokenizer has {len(tok)} tokens")
    dtype = "fp32" if cfg.teacher_dtype == "auto" else cfg.teacher_dtype
    device = dist.device()
    model.to(device=device, dtype=DTYPES[dtype])
    freeze(model)
    return model, task, len(tok), device


def serve(parsed, split) -> int:
    """Returns the process's exit code: 0 when every student finished, EXIT_STOPPED when they stopped on a signal."""
    from .signals import EXIT_STOPPED
    from ..teachers.sparse_rows import forward_logits, rows_from_logits

    cfg, opts = parsed.train, parsed.method_options
    tp = cfg.teacher_tp
    students = svc.students_of(split.global_rank, split.teacher_ranks, tp, split.global_world)
    leader = split.global_rank % tp == 0
    error = None
    try:
        model, task, vocab, device = load(parsed, split)
    except KDError as exc:
        error = str(exc)
    if leader:
        svc.send_ready(split, students, error)
    if error is not None:
        raise KDError(error)
    logger.warning("teacher rank %d ready: serving student ranks %s (top-%d, %d tail samples)", split.global_rank,
                   students, opts.teacher_top_k, opts.teacher_tail_samples)
    in_flight: deque = deque()
    live, stopped, answered = list(students), False, 0
    while live:
        for src in list(live):
            kind, batch = svc.recv_request(split, src)
            if batch is None:
                live.remove(src)
                stopped = stopped or kind == svc.KIND_STOPPED
                continue
            faults.in_teacher(answered + 1, split.global_rank)
            batch = {k: v.to(device) for k, v in batch.items()}
            with torch.inference_mode():
                logits = forward_logits(model, model, batch, task)
                rows = rows_from_logits(logits, batch, task, opts.teacher_top_k, opts.temperature, vocab,
                                        opts.teacher_tail_samples, opts.teacher_seed)
            answered += 1
            if not leader:
                continue
            rows = {k: (v.cpu() if torch.is_tensor(v) else v) for k, v in rows.items()}
            in_flight.extend(svc.send_rows(split, src, rows, opts.teacher_tail_samples))
            while len(in_flight) > MAX_IN_FLIGHT:
                work, _, dst = in_flight.popleft()
                svc._wait(work, "answering: student", dst, split.timeout_s)
    while in_flight:
        work, _, dst = in_flight.popleft()
        svc._wait(work, "answering: student", dst, split.timeout_s)
    logger.warning("teacher rank %d: %d micro-batches answered", split.global_rank, answered)
    return EXIT_STOPPED if stopped else 0
