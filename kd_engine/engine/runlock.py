"""One run per output folder: rank 0 holds ``OUTPUT_DIR/.kd_engine.lock`` while it trains.

The lock is created atomically (``O_CREAT | O_EXCL``) right before the run's first write, so of two runs started at
the same time into one folder exactly one trains; the other stops with one error naming the holder (host, pid,
SLURM job, start time) and has written nothing. The lock records ``host``, ``pid``, ``slurm_job_id`` and a nonce;
a thread refreshes its modification time every ``HEARTBEAT_S`` seconds. A lock is stale, and is taken over, when

- its process is gone (same host, pid not alive: a crash or ``kill -9``);
- it belongs to this same SLURM job (a requeued job resumes its own run, on whatever node it lands);
- its heartbeat stopped for more than ``STALE_S`` seconds (a holder on another host that died with it).

Taking over renames the stale lock to a name of our own first and checks that what was renamed is the stale lock
read before (not a lock another process just took), so two processes never both take one stale lock.
"""
from __future__ import annotations

import json
import os
import socket
import threading
import time
import uuid
from typing import Optional

from ..errors import KDError
from ..input_files import InputFileError, read_json

LOCK = ".kd_engine.lock"
HEARTBEAT_S = 30.0
STALE_S = 300.0


def _me() -> dict:
    return {"host": socket.gethostname(), "pid": os.getpid(), "slurm_job_id": os.environ.get("SLURM_JOB_ID"),
            "started": time.time(), "nonce": uuid.uuid4().hex}


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def read_lock(output_dir: str) -> Optional[dict]:
    path = os.path.join(output_dir, LOCK)
    if not os.path.lexists(path):
        return None
    try:
        info = read_json(path, "run lock")
        info["_mtime"] = os.path.getmtime(path)
        return info
    except (InputFileError, OSError):  # half-written by a process that died in between: judge it by its age
        try:
            return {"_mtime": os.path.getmtime(path), "unreadable": True}
        except OSError:
            return None


def stale_reason(info: dict) -> Optional[str]:
    """Why the lock ``info`` no longer guards a live run, or None when it does."""
    job = os.environ.get("SLURM_JOB_ID")
    if job and info.get("slurm_job_id") == job:
        return f"it belongs to this SLURM job ({job}), requeued"
    if info.get("host") == socket.gethostname() and isinstance(info.get("pid"), int):
        if info["pid"] == os.getpid():
            return "it is this process's"
        if not _pid_alive(info["pid"]):
            return f"process {info['pid']} on this host is gone"
    age = time.time() - float(info.get("_mtime", 0))
    if age > STALE_S:
        return f"its heartbeat stopped {age:.0f} s ago"
    return None


def describe(info: dict) -> str:
    if info.get("unreadable"):
        return "a kd_engine process (lock being written)"
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(float(info.get("started", 0))))
    job = f", SLURM job {info['slurm_job_id']}" if info.get("slurm_job_id") else ""
    return f"pid {info.get('pid')} on {info.get('host')}{job}, started {when}"


def check_free(output_dir: str) -> None:
    """KDError when a live run holds ``output_dir`` (a read-only check, for the pre-flight)."""
    info = read_lock(output_dir)
    if info is not None and stale_reason(info) is None:
        raise busy_error(output_dir, info)


def busy_error(output_dir: str, info: dict) -> KDError:
    return KDError(f"output_dir {output_dir} is in use by another kd_engine run ({describe(info)}); wait for it to "
                   f"end or pick another --output_dir")


class RunLock:
    """``acquire()`` before the first write (rank 0), ``release()`` when the process ends its run."""

    def __init__(self, output_dir: str):
        self.output_dir = output_dir
        self.path = os.path.join(output_dir, LOCK)
        self.info: Optional[dict] = None
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None

    def _create(self) -> bool:
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(self.info, f)
            f.flush()
            os.fsync(f.fileno())
        return True

    def acquire(self) -> None:
        os.makedirs(self.output_dir, exist_ok=True)
        self.info = _me()
        for _ in range(3):
            if self._create():
                break
            held = read_lock(self.output_dir)
            if held is None:
                continue  # released in between: try again
            if stale_reason(held) is None:
                raise busy_error(self.output_dir, held)
            aside = f"{self.path}.stale-{self.info['nonce']}"
            try:
                os.rename(self.path, aside)
            except FileNotFoundError:
                continue
            moved = read_lock_file(aside)
            if moved is not None and moved.get("nonce") != held.get("nonce") and not held.get("unreadable"):
                os.rename(aside, self.path)  # another process took the stale lock first: it is live, give it back
                raise busy_error(self.output_dir, moved)
            os.remove(aside)
        else:
            raise KDError(f"output_dir {self.output_dir}: could not take the run lock {self.path}")
        self._thread = threading.Thread(target=self._beat, name="kd-runlock", daemon=True)
        self._thread.start()

    def _beat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            try:
                os.utime(self.path)
            except OSError:
                return

    def release(self) -> None:
        self._stop.set()
        if self.info is None:
            return
        held = read_lock(self.output_dir)
        if held is not None and held.get("nonce") == self.info["nonce"]:
            try:
                os.remove(self.path)
            except FileNotFoundError:
                pass
        self.info = None


def take_on_rank0(output_dir: str, rank: int, broadcast) -> Optional[RunLock]:
    """Rank 0 takes the folder's lock; every rank raises the same KDError when it could not (``broadcast``: an
    object broadcast from rank 0, e.g. ``dist.broadcast_object``). Returns rank 0's lock (None elsewhere)."""
    lock, err = None, None
    if rank == 0:
        try:
            lock = RunLock(output_dir)
            lock.acquire()
        except KDError as exc:
            lock, err = None, str(exc)
    err = broadcast(err)
    if err is not None:
        raise KDError(err)
    return lock


def read_lock_file(path: str) -> Optional[dict]:
    try:
        return read_json(path, "run lock")
    except InputFileError:
        return None
