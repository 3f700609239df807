"""Process-group setup that works under the deepspeed launcher, torchrun, mpirun and plain python.

- deepspeed launcher / torchrun set RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT: used as they are.
- mpirun (OpenMPI, MPICH/PMI, Slurm's srun --mpi): OMPI_COMM_WORLD_* / PMI_* are mapped to RANK/WORLD_SIZE/
  LOCAL_RANK; when MASTER_ADDR is not given, rank 0's address and a free port are broadcast with mpi4py.
- ``srun python launch/train.py`` (one SLURM task per rank): SLURM_PROCID / SLURM_NTASKS / SLURM_LOCALID inside a
  job step (SLURM_STEP_ID set; the batch shell itself is not a step) give RANK / WORLD_SIZE / LOCAL_RANK; without
  MASTER_ADDR/MASTER_PORT every rank derives the same ones: the first node of the step (its NodeAddr from
  ``scontrol``) and a port computed from the job and step ids.
- plain ``python``: one process, rank 0 of 1, loopback and a free port.
On a machine without CUDA, DeepSpeed's CPU accelerator (gloo backend) is selected before deepspeed is imported.
"""
from __future__ import annotations

import contextlib
import datetime
import logging
import os
import sys
import socket
from typing import Optional

logger = logging.getLogger(__name__)

_MPI_VARS = [
    ("OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_RANK"),
    ("PMI_RANK", "PMI_SIZE", "MPI_LOCALRANKID"),
    ("PMIX_RANK", "PMIX_SIZE", "PMIX_LOCAL_RANK"),
]


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _cuda_available() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except Exception:  # pragma: no cover
        return False


def setup_environment() -> str:
    """Normalise launcher variables; returns the launcher detected ('launcher', 'slurm', 'mpi', 'single'). On CPU also keeps
    freed memory in the process (``allocator.keep_freed_memory``: no page faults on every step's big buffers)."""
    if not _cuda_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
        from .allocator import keep_freed_memory

        keep_freed_memory()
    kind = "launcher"
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        kind = _map_slurm() or _map_mpi() or "single"
        if kind == "single":
            os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
            os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
            os.environ.setdefault("MASTER_PORT", str(free_port()))
    os.environ.setdefault("LOCAL_RANK", "0")
    if os.environ.get("DS_ACCELERATOR") == "cpu" and os.environ.get("MASTER_ADDR") in ("127.0.0.1", "localhost"):
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    return kind


def _map_slurm() -> str:
    """Inside an ``srun`` step (not the batch shell, which has no SLURM_STEP_ID): one task per rank."""
    env = os.environ
    if not ("SLURM_STEP_ID" in env and "SLURM_PROCID" in env and "SLURM_NTASKS" in env):
        return ""
    env["RANK"], env["WORLD_SIZE"] = env["SLURM_PROCID"], env.get("SLURM_STEP_NUM_TASKS", env["SLURM_NTASKS"])
    env["LOCAL_RANK"] = env.get("SLURM_LOCALID", "0")
    if "MASTER_ADDR" not in env:
        env["MASTER_ADDR"] = slurm_master_addr()
    if "MASTER_PORT" not in env:  # the same on every rank: derived from the job and step ids
        env["MASTER_PORT"] = str(20000 + (int(env.get("SLURM_JOB_ID", "0")) * 16 + int(env["SLURM_STEP_ID"])) % 20000)
    return "slurm"


def slurm_master_addr() -> str:
    """Address of the first node of the step: its NodeAddr as slurmctld knows it (a node name may not resolve)."""
    import subprocess

    nodelist = os.environ.get("SLURM_STEP_NODELIST") or os.environ.get("SLURM_JOB_NODELIST", "")
    try:
        first = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True,
                               check=True, timeout=30).stdout.split()[0]
        info = subprocess.run(["scontrol", "show", "node", first], capture_output=True, text=True, check=True,
                              timeout=30).stdout
    except (OSError, subprocess.SubprocessError, IndexError) as exc:
        from .errors import KDError

        raise KDError(f"under srun without MASTER_ADDR and cannot ask scontrol for the first node: {exc}")
    for tok in info.split():
        if tok.startswith("NodeAddr="):
            return tok.split("=", 1)[1]
    return first


def _map_mpi() -> str:
    for rank_v, size_v, local_v in _MPI_VARS:
        if rank_v in os.environ and size_v in os.environ:
            os.environ["RANK"] = os.environ[rank_v]
            os.environ["WORLD_SIZE"] = os.environ[size_v]
            os.environ["LOCAL_RANK"] = os.environ.get(local_v, os.environ[rank_v])
            if "MASTER_ADDR" not in os.environ or "MASTER_PORT" not in os.environ:
                _mpi_rendezvous()
            return "mpi"
    return ""


def _mpi_rendezvous() -> None:
    """Broadcast rank 0's address and a free port to every MPI rank (mpi4py)."""
    try:
        from mpi4py import MPI
    except ImportError as exc:  # pragma: no cover - depends on the install
        from .errors import KDError

        raise KDError(f"launched under MPI without MASTER_ADDR/MASTER_PORT and mpi4py is unusable: {exc}")
    comm = MPI.COMM_WORLD
    info = None
    if comm.Get_rank() == 0:
        addr = os.environ.get("MASTER_ADDR")
        if not addr:
            size = comm.Get_size()
            local = int(os.environ.get("OMPI_COMM_WORLD_LOCAL_SIZE", size))
            addr = "127.0.0.1" if local == size else socket.gethostbyname(socket.gethostname())
        info = (addr, os.environ.get("MASTER_PORT") or str(free_port()))
    addr, port = comm.bcast(info, root=0)
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = addr, port


def init_distributed(timeout_s: Optional[float] = None) -> tuple[int, int, int]:
    """Set up the environment and the process group; returns (rank, world_size, local_rank).

    ``timeout_s`` bounds every collective: when a rank dies or hangs, the others raise after that long instead of
    waiting forever (``lost_rank_message`` turns the backend's error into one line)."""
    setup_environment()
    import deepspeed
    import torch.distributed as dist

    if not dist.is_initialized():
        kwargs = {} if timeout_s is None else {"timeout": datetime.timedelta(seconds=float(timeout_s))}
        deepspeed.init_distributed(dist_init_required=True, verbose=False, **kwargs)
    if timeout_s is not None:  # groups created later without a timeout (DeepSpeed's data-parallel group) too
        import torch.distributed.distributed_c10d as c10d

        c10d.default_pg_timeout = c10d.default_pg_nccl_timeout = datetime.timedelta(seconds=float(timeout_s))
    return dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0))


def end_process(rc: int, meet: bool) -> int:
    """How every kd_engine entry point ends. A single process returns ``rc``. A process of a multi-process run
    (``meet``: the run succeeded, or stopped on a signal every rank agreed on) meets the other ranks and destroys the
    process group, then calls MPI_Finalize under mpirun (mpirun requires it), flushes log handlers and streams and
    leaves with ``os._exit(rc)``, skipping the interpreter's finalization: gloo work objects (with tensors) that
    DeepSpeed's engine still holds, destroyed there, abort the process after it has finished and written everything
    (SIGABRT, "terminate called without an active exception"; seen twice on 2-rank CPU test runs here, the problem
    pytorch/pytorch#179291 describes)."""
    if int(os.environ.get("KD_GLOBAL_WORLD_SIZE", os.environ.get("WORLD_SIZE", "1"))) <= 1:
        return rc
    import torch.distributed as dist

    if meet:
        try:
            if dist.is_initialized():
                dist.barrier()
                dist.destroy_process_group()
        except Exception:  # a peer already gone (killed after a stop signal): nothing left to tear down in order
            pass
    mpi = sys.modules.get("mpi4py.MPI")
    if mpi is not None and mpi.Is_initialized() and not mpi.Is_finalized():
        mpi.Finalize()
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(rc)


def device():
    from deepspeed.accelerator import get_accelerator

    acc = get_accelerator()
    if acc.device_name() == "cpu":
        import torch

        return torch.device("cpu")
    import torch

    return torch.device(acc.device_name(int(os.environ.get("LOCAL_RANK", 0))))


def barrier() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        dist.barrier()


@contextlib.contextmanager
def main_process_first():
    """Rank 0 runs the block first (e.g. builds a cache), then the other ranks (which then read it)."""
    import torch.distributed as dist

    active = dist.is_initialized() and dist.get_world_size() > 1
    if active and dist.get_rank() != 0:
        dist.barrier()
    try:
        yield
    finally:
        if active and dist.get_rank() == 0:
            dist.barrier()


def broadcast_object(obj, src: int = 0):
    import torch.distributed as dist

    if not dist.is_initialized() or dist.get_world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def all_reduce_sums(values: dict[str, tuple[float, float]]) -> dict[str, tuple[float, float]]:
    """Sum {name: (total, count)} over ranks (same keys on every rank)."""
    import torch
    import torch.distributed as dist

    if not dist.is_initialized() or dist.get_world_size() == 1 or not values:
        return values
    keys = sorted(values)
    t = torch.tensor([[values[k][0], values[k][1]] for k in keys], dtype=torch.float64)
    dist.all_reduce(t)
    return {k: (float(t[i, 0]), float(t[i, 1])) for i, k in enumerate(keys)}


def is_lost_rank_error(exc: BaseException) -> bool:
    """Whether ``exc`` is a collective that failed because another rank died, hung or became unreachable."""
    import torch.distributed as dist

    if getattr(exc, "names_the_peer", False):  # the teacher service's bridge: its message names the global rank
        return True
    if isinstance(exc, getattr(dist, "DistBackendError", ())) or isinstance(exc, getattr(dist, "DistError", ())):
        return True
    text = str(exc)
    return isinstance(exc, RuntimeError) and any(s in text for s in (
        "Connection closed by peer", "Connection reset by peer", "Timed out waiting", "timed out", "Broken pipe",
        "NCCL communicator was aborted", "Connection refused"))


def lost_rank_message(exc: BaseException, rank: int, world_size: int) -> str:
    """One line for a lost rank: names it where the world has only one other rank, else says which rank reports."""
    offset = int(os.environ.get("KD_GLOBAL_RANK", rank)) - rank  # --teacher_ranks: name global ranks
    if getattr(exc, "names_the_peer", False):
        return f"rank {rank + offset}: {exc}"
    first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
    if os.environ.get("KD_ROLE") == "student":  # --teacher_ranks: probe which process is gone (a student first)
        from .engine.teacher_service import gone_ranks

        gone = [f"{'student' if r >= offset else 'teacher'} global rank {r}" for r in gone_ranks()]
        if gone:  # several: one died, the others exited on noticing it (their own errors say which died)
            return (f"rank {rank + offset}: {' and '.join(gone)} {'is' if len(gone) == 1 else 'are'} gone (connection "
                    f"closed; this rank's collective failed with it: {first[:200]}); every rank stops; resume from the "
                    f"last checkpoint with --resume")
    who = f"rank {1 - rank + offset}" if world_size == 2 else "another rank"
    group = f" of the {os.environ['KD_ROLE']} group" if os.environ.get("KD_ROLE") else ""
    return (f"rank {rank + offset} lost contact with {who}{group} during a collective ({first}); every rank stops; "
            "resume from the last checkpoint with --resume")
