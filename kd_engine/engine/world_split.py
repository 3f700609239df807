"""Split the job's world into a teacher group and a student group (``--teacher_ranks N``).

The first N global ranks form the teacher group, the others the student group. Each group gets a default process
group of its own (``torch.distributed.init_process_group`` over the job's rendezvous store under a group prefix), so
everything that runs inside a group — DeepSpeed's engine, its barriers and checkpoints, the data sampler, a
tensor-parallel teacher — sees an ordinary world of its own and needs no change: rank 0 of the student group writes
the checkpoints and the export, exactly as rank 0 of a student-only job does. Between the groups there is one more
process group over all ranks, the *bridge* (gloo, host tensors: a request is a micro-batch of token ids, an answer is
the sparse rows of the offline teacher cache, a few hundred bytes per token), used only for point-to-point sends.

After the split, ``RANK`` / ``WORLD_SIZE`` in the environment are the rank and size inside the process's own group;
``KD_GLOBAL_RANK`` / ``KD_GLOBAL_WORLD_SIZE`` keep the job-wide ones (error messages name global ranks).
"""
from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from typing import Any, Optional

_SPLIT: Optional["Split"] = None


@dataclass
class Split:
    role: str  # "teacher" | "student"
    global_rank: int
    global_world: int
    teacher_ranks: int  # global ranks 0 .. teacher_ranks - 1 are the teacher group
    bridge: Any  # ProcessGroupGloo over every global rank (point-to-point only)
    timeout_s: float

    @property
    def group_rank(self) -> int:
        return self.global_rank if self.role == "teacher" else self.global_rank - self.teacher_ranks

    @property
    def student_ranks(self) -> int:
        return self.global_world - self.teacher_ranks


def current() -> Optional[Split]:
    """The split of this process (None in a job without a teacher group)."""
    return _SPLIT


def split_world(teacher_ranks: int, timeout_s: float, backend: Optional[str] = None) -> Split:
    """Rendezvous over the job's ``MASTER_ADDR:MASTER_PORT`` (as ``env://`` does, torchrun's agent store included),
    then one default process group per role and the bridge. Call once, after ``dist.setup_environment``."""
    global _SPLIT
    import torch.distributed as dist

    if _SPLIT is not None:
        return _SPLIT
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    timeout = datetime.timedelta(seconds=float(timeout_s))
    store, _, _ = next(dist.rendezvous("env://", rank, world, timeout=timeout))
    role = "teacher" if rank < teacher_ranks else "student"
    size = teacher_ranks if role == "teacher" else world - teacher_ranks
    group_rank = rank if role == "teacher" else rank - teacher_ranks
    if backend is None:
        from deepspeed.accelerator import get_accelerator

        backend = get_accelerator().communication_backend_name()
    dist.init_process_group(backend, store=dist.PrefixStore(f"kd_{role}s", store), rank=group_rank,
                            world_size=size, timeout=timeout)
    bridge = dist.ProcessGroupGloo(dist.PrefixStore("kd_bridge", store), rank, world, timeout)
    os.environ.update(KD_GLOBAL_RANK=str(rank), KD_GLOBAL_WORLD_SIZE=str(world), RANK=str(group_rank),
                      WORLD_SIZE=str(size), KD_ROLE=role)
    _SPLIT = Split(role, rank, world, teacher_ranks, bridge, float(timeout_s))
    return _SPLIT
