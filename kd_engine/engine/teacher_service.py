"""The online teacher service (``--teacher_ranks N``): teacher ranks answer student micro-batches with sparse rows.

Placement: the first N global ranks hold the teacher (``world_split``), in groups of ``--teacher_tp`` ranks (one
tensor-parallel copy per group; replicas when 1); student rank s is served by teacher group ``s % groups``.

Protocol over the bridge (gloo point-to-point, host tensors; every message has a fixed tag, and messages between
two ranks with one tag arrive in order):

- start-up: each teacher group's first rank sends each of its students ``[status, n]`` and an ``n``-byte message;
  status 0 means the teacher loaded and checked (tokenizer, vocabulary), otherwise the message is the error and every
  student rank raises it before writing anything.
- request (student -> every rank of its teacher group): ``[kind, B, L, Ld, 0, 0]`` (kind 1: rows wanted; 0: finished;
  2: stopped on a signal; 3: pause, an evaluation or a checkpoint write follows, so the teacher waits up to
  ``PAUSE_TIMEOUT_S`` instead of ``--dist_timeout`` for this student's next request), then ``input_ids [B, L]``,
  ``attention_mask [B, L]``, ``labels [B, Ld]`` (int64). Headers are 6 int64 values; unused ones are 0.
- hidden request (kind 4, ``served_outputs() == "hidden"``): ``[4, B, L, Ld, P, K]``, ``input_ids``,
  ``attention_mask`` ``[B, L]``, for an encoder-decoder (``Ld > 0``) ``decoder_input_ids``,
  ``decoder_attention_mask`` ``[B, Ld]``, with ``P = 1`` ``position_ids [B, L]``; the answer is the hidden states
  entering the teacher's output layer ``[B, K or Ld or L, H]`` (``K``: ``logits_to_keep``) in the teacher's dtype,
  whose output layer ``[V, H]`` the group's first rank sent each student once after the start-up status
  (``[V, H, dtype]``, then the weight; ``served_teacher.ServedTeacher`` applies it).
- rollout (kinds 5 and 6): ``[5, B, L, 0, 0, 0]`` with the prompt ``input_ids``, ``attention_mask`` (left-padded
  for a causal LM; an encoder-decoder's encoder runs on it once) starts a decoding session with its own KV cache on
  the teacher ranks (one per student, dropped at its next other request); ``[6, B, 1, 0, 0, 0]`` with
  ``tokens [B, 1]`` extends it by one position. Both are answered with the newest position's hidden state
  ``[B, 1, H]``. Students run their rollouts in lockstep
  (``synced_ranks``), so every student makes the same number of requests, which round-robin serving needs.
- answer (the group's first rank -> the student): the rows of ``teachers.sparse_rows`` in the cache's row format:
  ``ids [N, k]`` int32, ``logp [N, k]``, ``log_tail [N]``, and with tail samples ``tail_ids [N, m]`` int32,
  ``tail_logp [N, m]`` (fp32), N = the batch's real target tokens, which the student counts itself, so it posts
  its receives when it sends the request. An answer with N = 0 sends nothing.

Row requests run ahead (hidden requests do not: on-policy samples exist only once the student made them): the
student keeps ``--teacher_prefetch`` micro-batches requested beyond the one it trains on,
drawn from a copy of its data sampler (the sampler's own position, which checkpoints record, moves only when a
batch is trained on; resume is exact). The teacher answers with non-blocking sends and goes on to the next request.

The student's side (``TeacherClient`` and the trainer's hooks: connect, start, pause, finish) is ``teacher_client``;
the teacher's loop is ``teacher_server``.
"""
from __future__ import annotations

import logging
from typing import Any, Optional

import torch

logger = logging.getLogger("kd_engine")

TAG_READY, TAG_READY_MSG, TAG_HEAD, TAG_HEAD_W, TAG_HEADER, TAG_HIDDEN = 100, 101, 102, 103, 110, 130
TAG_PROBE = 190  # never received: a send that fails at once (not by timing out) finds a process that is gone
TAG_INPUTS = (111, 112, 113, 114, 115)  # input_ids, attention_mask, labels (rows) or decoder ids, decoder mask;
# position ids
TAG_ROWS = (120, 121, 122, 123, 124)  # ids, logp, log_tail, tail_ids, tail_logp
KIND_STOP, KIND_ROWS, KIND_STOPPED, KIND_PAUSE, KIND_HIDDEN, KIND_ROLL_START, KIND_ROLL_STEP = 0, 1, 2, 3, 4, 5, 6
HEADER = 6  # int64 values per request header
PAUSE_TIMEOUT_S = 6 * 3600.0  # how long a teacher waits for a student's next request after it announced a pause


class LostTeacherPeer(RuntimeError):
    """A rank on the other side of the bridge died, hung past --dist_timeout or closed its connection."""

    names_the_peer = True  # dist.lost_rank_message prints this message as it is


def teacher_group_of(student_group_rank: int, teacher_ranks: int, tp: int) -> list[int]:
    """Global ranks of the teacher group that serves a student (group rank ``student_group_rank``)."""
    groups = teacher_ranks // tp
    g = student_group_rank % groups
    return list(range(g * tp, (g + 1) * tp))


def students_of(teacher_global_rank: int, teacher_ranks: int, tp: int, world: int) -> list[int]:
    """Global ranks of the students a teacher rank serves."""
    groups, g = teacher_ranks // tp, teacher_global_rank // tp
    return [teacher_ranks + s for s in range(world - teacher_ranks) if s % groups == g]


def _wait(work, what: str, peer: int, timeout_s: float) -> None:
    import datetime

    try:
        work.wait(datetime.timedelta(seconds=float(timeout_s)))
    except RuntimeError as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        raise LostTeacherPeer(f"{what} global rank {peer} failed ({first}): that rank died, hung for more than "
                              f"--dist_timeout {timeout_s:g} s or stopped; every rank stops; resume from the last "
                              f"checkpoint with --resume") from None


def gone_ranks() -> list[int]:
    """After a student rank's collective failed: the global ranks (teacher or student) whose process is gone. A
    teacher's death can surface first in the students' own all-reduce (gloo resets the survivors' connections), and
    the error should name the rank that died. Probes go over the bridge on a tag nobody receives: a live rank's send
    times out (gloo sends wait for a matching receive), a dead one's fails at once. At most 2 s in all."""
    import datetime
    import time

    from .world_split import current

    split = current()
    if split is None or split.role != "student":
        return []
    probe, works, gone = torch.zeros(1, dtype=torch.int64), [], []
    for r in range(split.global_world):
        if r == split.global_rank:
            continue
        try:
            works.append((r, split.bridge.send([probe], r, TAG_PROBE)))
        except RuntimeError:  # the connection is already known to be closed or reset
            gone.append(r)
    deadline = time.monotonic() + 2.0
    for r, work in works:
        try:
            work.wait(datetime.timedelta(seconds=max(0.01, deadline - time.monotonic())))
        except RuntimeError as exc:
            if "timed out" not in str(exc).lower():  # closed or reset: that process is gone
                gone.append(r)
    return sorted(gone)


def send_ready(split, students: list[int], error: Optional[str]) -> None:
    """Start-up status to each student (status 0, or 1 and the error text)."""
    msg = torch.tensor(list((error or "").encode("utf-8")), dtype=torch.uint8)
    head = torch.tensor([0 if error is None else 1, msg.numel()], dtype=torch.int64)
    for s in students:
        _wait(split.bridge.send([head], s, TAG_READY), "start-up: student", s, split.timeout_s)
        if error is not None and msg.numel():
            _wait(split.bridge.send([msg], s, TAG_READY_MSG), "start-up: student", s, split.timeout_s)


def send_head(split, students: list[int], weight: torch.Tensor) -> None:
    """Hidden mode, after a ready status: the teacher's output layer weight to each student."""
    from .served_teacher import dtype_code, wire

    w = weight.detach().cpu().contiguous()
    head = torch.tensor([w.shape[0], w.shape[1], dtype_code(w.dtype)], dtype=torch.int64)
    for s in students:
        _wait(split.bridge.send([head], s, TAG_HEAD), "start-up: student", s, split.timeout_s)
        _wait(split.bridge.send([wire(w)], s, TAG_HEAD_W), "start-up: student", s, split.timeout_s)


def send_hidden(split, dst: int, hidden: torch.Tensor) -> list[Any]:
    """Non-blocking send of one hidden-state answer (the work and the tensor it needs kept alive)."""
    from .served_teacher import wire

    t = wire(hidden.cpu())
    return [(split.bridge.send([t], dst, TAG_HIDDEN), t, dst)]


def recv_request(split, src: int, paused: bool = False) -> tuple[int, Optional[dict]]:
    """``(kind, batch)`` from student ``src``: batch None for a finish, stop or pause message."""
    header = torch.zeros(HEADER, dtype=torch.int64)
    _wait(split.bridge.recv([header], src, TAG_HEADER), "serving: student", src,
          max(PAUSE_TIMEOUT_S, split.timeout_s) if paused else split.timeout_s)
    kind, b, length, ld, has_pos, keep = (int(v) for v in header)
    ids, mask = ("input_ids", (b, length), TAG_INPUTS[0]), ("attention_mask", (b, length), TAG_INPUTS[1])
    if kind == KIND_ROWS:
        wanted = [ids, mask, ("labels", (b, ld), TAG_INPUTS[2])]
    elif kind == KIND_HIDDEN:
        wanted = [ids, mask]
        if ld:
            wanted += [("decoder_input_ids", (b, ld), TAG_INPUTS[2]), ("decoder_attention_mask", (b, ld),
                                                                       TAG_INPUTS[3])]
        if has_pos:
            wanted.append(("position_ids", (b, length), TAG_INPUTS[4]))
    elif kind == KIND_ROLL_START:
        wanted = [ids, mask]
    elif kind == KIND_ROLL_STEP:
        wanted = [("tokens", (b, 1), TAG_INPUTS[0])]
    else:
        return kind, None
    bufs = {name: torch.empty(shape, dtype=torch.int64) for name, shape, _ in wanted}
    works = [split.bridge.recv([bufs[name]], src, tag) for name, _, tag in wanted]
    for w in works:
        _wait(w, "serving: student", src, split.timeout_s)
    if kind == KIND_HIDDEN and keep:
        bufs["logits_to_keep"] = keep
    return kind, bufs


def send_rows(split, dst: int, rows: dict, tail_samples: int) -> list[Any]:
    """Non-blocking sends of one answer; returns the works and the tensors they need kept alive."""
    if rows["ids"].shape[0] == 0:
        return []
    tensors = [rows["ids"].contiguous(), rows["logp"].contiguous(), rows["log_tail"].contiguous()]
    if tail_samples:
        tensors += [rows["tail_ids"].contiguous(), rows["tail_logp"].contiguous()]
    return [(split.bridge.send([t], dst, tag), t, dst) for t, tag in zip(tensors, TAG_ROWS)]
