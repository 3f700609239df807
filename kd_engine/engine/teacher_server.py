"""A teacher rank's side of ``--teacher_ranks``: load the teacher (tensor-parallel over its group with
``--teacher_tp``), report ready, then answer each student's micro-batches with sparse rows (or, for a loss that
needs the whole distribution, the hidden states entering the output layer) until every student it serves has
finished (protocol: ``teacher_service``). The teacher is stateless: nothing here is checkpointed."""
from __future__ import annotations

import logging
import time
from collections import deque

import torch

from ..errors import KDError
from . import faults, teacher_service as svc

logger = logging.getLogger("kd_engine")
MAX_IN_FLIGHT = 64  # answers sent but not yet received; the oldest is waited for beyond this


def load(parsed, split):
    """(teacher module, task, vocabulary size, device, what to serve, output layer weight in hidden mode)."""
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
    mode, weight = method.served_outputs(), None
    if mode == "hidden":  # every group rank takes part (a tensor-parallel layer is gathered)
        from ..models import lm_head

        weight = lm_head.output_layer(model, "teacher").weight.detach()
        weight = weight.full_tensor() if hasattr(weight, "full_tensor") else weight
        if weight.shape[0] < len(tok):
            raise KDError(f"the teacher's output layer has {weight.shape[0]} rows on this rank, fewer than the "
                          f"tokenizer's {len(tok)} tokens (split by --teacher_tp?): use --teacher_tp 1")
    return model, task, len(tok), device, mode, weight


def serve(parsed, split) -> int:
    """Returns the process's exit code: 0 when every student finished, EXIT_STOPPED when they stopped on a signal."""
    from .signals import EXIT_STOPPED

    cfg, opts = parsed.train, parsed.method_options
    tp = cfg.teacher_tp
    students = svc.students_of(split.global_rank, split.teacher_ranks, tp, split.global_world)
    leader = split.global_rank % tp == 0
    error = None
    try:
        model, task, vocab, device, mode, weight = load(parsed, split)
    except KDError as exc:
        error = str(exc)
    if leader:
        svc.send_ready(split, students, error)
    if error is not None:
        raise KDError(error)
    if leader and mode == "hidden":
        svc.send_head(split, students, weight)
    what = ("final hidden states" if mode == "hidden" else
            f"top-{opts.teacher_top_k}, {opts.teacher_tail_samples} tail samples")
    logger.warning("teacher rank %d ready: serving student ranks %s (%s)", split.global_rank, students, what)
    _keep_serving_on_stop_signals(cfg.stop_signals, split.global_rank)
    in_flight: deque = deque()
    sessions: dict = {}  # student -> its rollout's decoding state (KV cache), until its next other request
    paused: set = set()  # students that announced an evaluation or a checkpoint write
    live, stopped, answered, busy = list(students), False, 0, 0.0
    while live:
        for src in list(live):
            kind, batch = svc.recv_request(split, src, src in paused)
            paused.discard(src)
            if kind != svc.KIND_ROLL_STEP:
                sessions.pop(src, None)
            if kind == svc.KIND_PAUSE:
                paused.add(src)
                continue
            if batch is None:
                live.remove(src)
                stopped = stopped or kind == svc.KIND_STOPPED
                continue
            faults.in_teacher(answered + 1, split.global_rank)
            batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}
            t0 = time.perf_counter()
            with torch.inference_mode():
                if kind in (svc.KIND_ROLL_START, svc.KIND_ROLL_STEP):
                    answer = _rollout(kind, model, batch, sessions, src)
                else:
                    answer = _answer(kind, model, batch, task, vocab, opts)
            answered += 1
            busy += time.perf_counter() - t0
            if not leader:
                continue
            if kind in (svc.KIND_HIDDEN, svc.KIND_ROLL_START, svc.KIND_ROLL_STEP):
                in_flight.extend(svc.send_hidden(split, src, answer))
            else:
                rows = {k: (v.cpu() if torch.is_tensor(v) else v) for k, v in answer.items()}
                in_flight.extend(svc.send_rows(split, src, rows, opts.teacher_tail_samples))
            while len(in_flight) > MAX_IN_FLIGHT:
                work, _, dst = in_flight.popleft()
                svc._wait(work, "answering: student", dst, split.timeout_s)
    while in_flight:
        work, _, dst = in_flight.popleft()
        svc._wait(work, "answering: student", dst, split.timeout_s)
    logger.warning("teacher rank %d: %d micro-batches answered, %.1f ms of forward and rows each", split.global_rank,
                   answered, 1000.0 * busy / max(answered, 1))
    return EXIT_STOPPED if stopped else 0


def _answer(kind: int, model, batch: dict, task: str, vocab: int, opts):
    """Sparse rows of a row request, or the hidden states entering the output layer of a hidden request."""
    from ..models import lm_head
    from ..teachers.sparse_rows import forward_logits, rows_from_logits

    if kind == svc.KIND_HIDDEN:
        return lm_head.hidden_states(model, model, "teacher", **batch)
    logits = forward_logits(model, model, batch, task)
    return rows_from_logits(logits, batch, task, opts.teacher_top_k, opts.temperature, vocab,
                            opts.teacher_tail_samples, opts.teacher_seed)


def _rollout(kind: int, model, batch: dict, sessions: dict, src: int):
    """A student's rollout session: start it from the prompt, or extend it by one token; the newest position's
    hidden state (``models.sampling``'s decoding state with its own KV cache, as a co-located teacher runs; an
    encoder-decoder runs its encoder once per session and decodes from its own start token)."""
    from ..models import lm_head
    from ..models.sampling import _CausalState, _Seq2SeqState

    if kind == svc.KIND_ROLL_START:
        State = _Seq2SeqState if getattr(model.config, "is_encoder_decoder", False) else _CausalState
        state = sessions[src] = State(model, batch["input_ids"], batch["attention_mask"], use_cache=True)
        return lm_head.hidden_states(lambda: state.first(), model, "teacher")
    state = sessions.get(src)
    if state is None:
        raise KDError(f"student global rank {src} sent a rollout step without a session (protocol error)")
    return lm_head.hidden_states(lambda: state.step(batch["tokens"][:, 0]), model, "teacher")


def _keep_serving_on_stop_signals(names, rank: int) -> None:
    """A stop signal (USR1 before a time limit, TERM at preemption) reaches every rank of a SLURM step: the teacher
    keeps answering until its students have written their checkpoint and say they stopped (then exits 75 as they
    do); dying at once would leave them without the rows of the steps before their checkpoint."""
    import signal

    from ..signal_names import parse_signals

    def noted(signum, frame):
        logger.warning("teacher rank %d: %s received; serving until the student ranks stop", rank,
                       signal.Signals(signum).name)

    for sig in parse_signals(names):
        signal.signal(sig, noted)
