"""A student rank's side of the teacher service (``--teacher_ranks``; protocol: ``teacher_service``): row requests
sent ahead from a copy of the sampler and their answers looked up as ``TeacherCache.lookup`` does, blocking
hidden-state and rollout requests, pauses, and the final drain; and the trainer's hooks (connect, start, pause, finish,
describe)."""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Optional

import torch

from .teacher_service import (KIND_HIDDEN, KIND_PAUSE, KIND_ROLL_START, KIND_ROLL_STEP, KIND_ROWS, KIND_STOP,
                              KIND_STOPPED, TAG_HEAD, TAG_HEAD_W, TAG_HEADER, TAG_HIDDEN, TAG_INPUTS, TAG_READY,
                              TAG_READY_MSG, TAG_ROWS, _wait, teacher_group_of)


def n_target_rows(labels: torch.Tensor, task: str) -> int:
    from ..teachers.sparse_rows import target_labels

    return int((target_labels(labels, task) != -100).sum())


@dataclass
class _Pending:
    idx: list
    batch: dict
    sends: list
    rows: list  # [ids, logp, log_tail, (tail_ids, tail_logp)] receive buffers
    recvs: list = field(default_factory=list)


class TeacherClient:
    """A student rank's side: requests ahead, answers looked up in the offline cache's ``lookup`` form."""

    def __init__(self, split, tp: int, task: str, top_k: int, tail_samples: int, depth: int, mode: str = "rows"):
        self.split, self.task, self.k, self.m, self.depth, self.mode = split, task, top_k, tail_samples, depth, mode
        self.targets = teacher_group_of(split.group_rank, split.teacher_ranks, tp)
        self.leader = self.targets[0]
        self.pending: deque[_Pending] = deque()
        self.current: Optional[_Pending] = None
        self.lookahead = None  # iterator of future batches' indices (a copy of the trainer's sampler)
        self.collate = None
        self.paused: list = []  # pause headers and their sends (waited at close)
        self.on_wait = lambda seconds: None  # time spent waiting for answers (the teacher's forward not hidden)

    # ---- start-up -------------------------------------------------------------------------------------
    def wait_ready(self) -> Optional[str]:
        """The teacher group's start-up status: None when ready, else its error message."""
        head = torch.zeros(2, dtype=torch.int64)
        _wait(self.split.bridge.recv([head], self.leader, TAG_READY), "waiting for the teacher: teacher",
              self.leader, self.split.timeout_s)
        if int(head[0]) == 0:
            return None
        msg = torch.zeros(int(head[1]), dtype=torch.uint8)
        _wait(self.split.bridge.recv([msg], self.leader, TAG_READY_MSG), "teacher", self.leader, self.split.timeout_s)
        return bytes(msg.tolist()).decode("utf-8", "replace")

    def recv_head(self) -> torch.Tensor:
        """Hidden mode: the teacher's output layer weight ``[V, H]``, sent once after a ready status."""
        from .served_teacher import DTYPES, wire

        head = torch.zeros(3, dtype=torch.int64)
        _wait(self.split.bridge.recv([head], self.leader, TAG_HEAD), "start-up: teacher", self.leader,
              self.split.timeout_s)
        v, h, code = (int(x) for x in head)
        weight = torch.empty((v, h), dtype=DTYPES[code])
        _wait(self.split.bridge.recv([wire(weight)], self.leader, TAG_HEAD_W), "start-up: teacher", self.leader,
              self.split.timeout_s)
        self.hidden_size, self.hidden_dtype = h, weight.dtype
        return weight

    def start(self, lookahead, collate) -> None:
        self.lookahead, self.collate = lookahead, collate

    # ---- requests and answers -------------------------------------------------------------------------
    def _send(self, idx: list, batch: dict) -> None:
        bridge = self.split.bridge
        ids, labels = batch["input_ids"], batch["labels"]
        mask = batch.get("attention_mask")
        mask = torch.ones_like(ids) if mask is None else mask
        header = torch.tensor([KIND_ROWS, ids.shape[0], ids.shape[1], labels.shape[1], 0, 0], dtype=torch.int64)
        wire = [t.to(torch.int64).contiguous() for t in (ids, mask, labels)]
        sends = []
        for dst in self.targets:
            sends.append(bridge.send([header], dst, TAG_HEADER))
            sends += [bridge.send([t], dst, tag) for t, tag in zip(wire, TAG_INPUTS)]
        n = n_target_rows(labels, self.task)
        rows = [torch.empty((n, self.k), dtype=torch.int32), torch.empty((n, self.k)), torch.empty(n)]
        if self.m:
            rows += [torch.empty((n, self.m), dtype=torch.int32), torch.empty((n, self.m))]
        p = _Pending(idx, batch, [header, *wire, *sends], rows)
        if n:
            p.recvs = [bridge.recv([t], self.leader, tag) for t, tag in zip(rows, TAG_ROWS)]
        self.pending.append(p)

    def take(self, idx: list) -> dict:
        """The collated (host) batch of ``idx``, the trainer's next micro-batch; keeps ``depth`` more requested."""
        if self.mode == "hidden":  # nothing to request ahead: the method asks for hidden states as it goes
            return self.collate(idx)
        while len(self.pending) < self.depth + 1:
            nxt = next(self.lookahead)
            self._send(nxt, self.collate(nxt))
        p = self.pending.popleft()
        if p.idx != idx:  # the lookahead copy and the trainer's sampler went different ways: a bug, never silent
            raise RuntimeError(f"teacher prefetch out of step: requested {p.idx[:4]}..., training on {idx[:4]}...")
        self.current = p
        return p.batch

    def lookup(self, keys, targets):
        """The current batch's rows as ``TeacherCache.lookup`` returns them; checks the answer's row count."""
        import time

        p = self.current
        t0 = time.perf_counter()
        for w in p.recvs:
            _wait(w, "the teacher service: teacher", self.leader, self.split.timeout_s)
        self.on_wait(time.perf_counter() - t0)
        n = sum(int(t.numel()) for t in targets)
        if n != p.rows[0].shape[0]:
            raise RuntimeError(f"teacher service answered {p.rows[0].shape[0]} rows for a batch of {n} targets")
        ids, logp, tail = p.rows[0].long(), p.rows[1], p.rows[2]
        sampled = (p.rows[3].long(), p.rows[4]) if self.m else (None, None)
        return ids, logp, tail, *sampled

    def hidden(self, ids, mask=None, dec_ids=None, dec_mask=None, pos=None, keep: int = 0) -> torch.Tensor:
        """The teacher's final hidden states of one batch (hidden mode), waited for (a blocking call)."""
        ld = 0 if dec_ids is None else dec_ids.shape[1]
        tagged = [(ids, TAG_INPUTS[0]), (torch.ones_like(ids) if mask is None else mask, TAG_INPUTS[1])]
        if ld:
            tagged += [(dec_ids, TAG_INPUTS[2]), (torch.ones_like(dec_ids) if dec_mask is None else dec_mask,
                                                  TAG_INPUTS[3])]
        if pos is not None:
            tagged.append((pos, TAG_INPUTS[4]))
        header = [KIND_HIDDEN, ids.shape[0], ids.shape[1], ld, int(pos is not None), keep]
        return self._ask(header, tagged, keep or ld or ids.shape[1])

    def rollout_start(self, ids, mask) -> torch.Tensor:
        """A decoding session on the teacher group from the prompt (left-padded for a causal LM): the hidden state of
        the position that predicts the first response token."""
        return self._ask([KIND_ROLL_START, ids.shape[0], ids.shape[1], 0, 0, 0],
                         [(ids, TAG_INPUTS[0]), (mask, TAG_INPUTS[1])], 1)

    def rollout_step(self, tokens) -> torch.Tensor:
        """One more token per row of the session: the new position's hidden state."""
        return self._ask([KIND_ROLL_STEP, tokens.shape[0], 1, 0, 0, 0], [(tokens.reshape(-1, 1), TAG_INPUTS[0])], 1)

    def _ask(self, header: list, tagged: list, n: int) -> torch.Tensor:
        """Send one request to the teacher group and wait for its hidden-state answer ``[B, n, H]``."""
        from .served_teacher import wire

        bridge = self.split.bridge
        head = torch.tensor(header, dtype=torch.int64)
        tensors = [(t.to("cpu", torch.int64).contiguous(), tag) for t, tag in tagged]
        sends = []
        for dst in self.targets:
            sends.append((bridge.send([head], dst, TAG_HEADER), dst))
            sends += [(bridge.send([t], dst, tag), dst) for t, tag in tensors]
        out = torch.empty((header[1], n, self.hidden_size), dtype=self.hidden_dtype)
        _wait(bridge.recv([wire(out)], self.leader, TAG_HIDDEN), "the teacher service: teacher", self.leader,
              self.split.timeout_s)
        for work, dst in sends:
            _wait(work, "the teacher service: teacher", dst, self.split.timeout_s)
        return out

    def pause(self) -> None:
        """Before an evaluation or a checkpoint write: the next request may come later than --dist_timeout."""
        header = torch.tensor([KIND_PAUSE, 0, 0, 0, 0, 0], dtype=torch.int64)
        self.paused.append(header)
        self.paused += [self.split.bridge.send([header], dst, TAG_HEADER) for dst in self.targets]

    def close(self, stopped: bool = False) -> None:
        """Drain the answers still in flight, then tell the teacher group this student is done."""
        for p in self.pending:
            for w in p.recvs:
                _wait(w, "the teacher service: teacher", self.leader, self.split.timeout_s)
        self.pending.clear()
        for w in self.paused:
            if not torch.is_tensor(w):
                _wait(w, "finishing: teacher", self.leader, self.split.timeout_s)
        self.paused.clear()
        header = torch.tensor([KIND_STOPPED if stopped else KIND_STOP, 0, 0, 0, 0, 0], dtype=torch.int64)
        for dst in self.targets:
            _wait(self.split.bridge.send([header], dst, TAG_HEADER), "finishing: teacher", dst, self.split.timeout_s)


# ---- the trainer's hooks (student ranks) ------------------------------------------------------------------------


def connect(trainer):
    """On a student rank of a job with a teacher group: the client, once every student's teacher group reported
    ready (before the run's first write: a teacher that cannot load, or a vocabulary mismatch it finds, stops every
    rank with its error). None in a job without a teacher group."""
    import torch.distributed as dist

    from ..errors import KDError
    from .world_split import current

    split = current()
    if split is None:
        return None
    opts, cfg = trainer.opts, trainer.cfg
    task, mode = trainer.method._task(), trainer.method.served_outputs()
    client = TeacherClient(split, cfg.teacher_tp, task, getattr(opts, "teacher_top_k", 0),
                           getattr(opts, "teacher_tail_samples", 0), cfg.teacher_prefetch, mode)
    error = client.wait_ready()
    status = torch.tensor([0 if error is None else 1])
    dist.all_reduce(status)  # every student rank stops when any one's teacher group failed
    if error is not None:
        raise KDError(error)
    if int(status):
        raise KDError("a teacher group reported an error at start-up (printed by the student ranks it serves)")
    if mode == "hidden":  # the methods call this stand-in as their teacher (engine/served_teacher.py)
        from .served_teacher import ServedTeacher

        from ..models.loading import load_config

        config = load_config(cfg.teacher, trust_remote_code=cfg.trust_remote_code)
        trainer.teacher = trainer.teacher_model = ServedTeacher(client, client.recv_head().to(trainer.device), config)

    def waited(seconds: float) -> None:
        trainer.teacher_seconds += seconds

    client.on_wait = waited
    return client


def start(trainer) -> None:
    """Before the first training batch (after resume): requests are drawn from a copy of the sampler, so the
    sampler's own position (what checkpoints record) moves only as batches are trained on."""
    import copy

    from ..data.sampler import infinite_batches

    if trainer.served is not None:
        trainer.served.start(infinite_batches(copy.deepcopy(trainer.sampler)),
                             lambda idx: trainer.collate(trainer.data.train, idx))


def finish(trainer, stopped: bool = False) -> None:
    """After the last step (or a stop signal): the teacher group is told, once."""
    client, trainer.served = trainer.served, None
    if client is not None:
        client.close(stopped=stopped)


def describe(trainer) -> str:
    """The teacher's placement for the start-up log line of a student rank."""
    from .world_split import current

    split, cfg = current(), trainer.cfg
    if split is None:
        return "none"
    tp = f", tensor parallel in groups of {cfg.teacher_tp}" if cfg.teacher_tp > 1 else ""
    what = (f"sparse rows, {cfg.teacher_prefetch} micro-batches ahead" if trainer.served.mode == "rows" else
            "final hidden states, on demand")
    return f"served by global ranks 0-{split.teacher_ranks - 1}{tp} ({what})"


def pause(trainer) -> None:
    if trainer.served is not None:
        trainer.served.pause()
