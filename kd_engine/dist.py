"""Process-group setup that works under the deepspeed launcher, torchrun, mpirun and plain python.

- deepspeed launcher / torchrun set RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT: used as they are.
- mpirun (OpenMPI, MPICH/PMI, Slurm's srun --mpi): OMPI_COMM_WORLD_* / PMI_* are mapped to RANK/WORLD_SIZE/
  LOCAL_RANK; when MASTER_ADDR is not given, rank 0's address and a free port are broadcast with mpi4py.
- plain ``python``: one process, rank 0 of 1, loopback and a free port.
On a machine without CUDA, DeepSpeed's CPU accelerator (gloo backend) is selected before deepspeed is imported.
"""
from __future__ import annotations

import contextlib
import logging
import os
import socket

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
    """Normalise launcher variables; returns the launcher detected ('launcher', 'mpi', 'single'). On CPU also keeps
    freed memory in the process (``allocator.keep_freed_memory``: no page faults on every step's big buffers)."""
    if not _cuda_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
        from .allocator import keep_freed_memory

        keep_freed_memory()
    kind = "launcher"
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        for rank_v, size_v, local_v in _MPI_VARS:
            if rank_v in os.environ and size_v in os.environ:
                os.environ["RANK"] = os.environ[rank_v]
                os.environ["WORLD_SIZE"] = os.environ[size_v]
                os.environ["LOCAL_RANK"] = os.environ.get(local_v, os.environ[rank_v])
                kind = "mpi"
                if "MASTER_ADDR" not in os.environ or "MASTER_PORT" not in os.environ:
                    _mpi_rendezvous()
                break
        else:
            kind = "single"
            os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
            os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
            os.environ.setdefault("MASTER_PORT", str(free_port()))
    os.environ.setdefault("LOCAL_RANK", "0")
    if os.environ.get("DS_ACCELERATOR") == "cpu" and os.environ.get("MASTER_ADDR") in ("127.0.0.1", "localhost"):
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    return kind


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


def init_distributed() -> tuple[int, int, int]:
    """Set up the environment and the process group; returns (rank, world_size, local_rank)."""
    setup_environment()
    import deepspeed
    import torch.distributed as dist

    if not dist.is_initialized():
        deepspeed.init_distributed(dist_init_required=True, verbose=False)
    return dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0))


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
