"""Stop at a step boundary on a signal (SLURM preemption, time limit, ``scancel --signal``), checkpoint, requeue.

- ``StopSignals(names)`` installs handlers for the configured signals (``--stop_signals``, default USR1,TERM). A
  handler only records the signal; nothing is interrupted, so a signal that lands during a checkpoint write is
  seen after the write.
- ``should_stop()`` is called by the training loop at every step boundary: the flag is all-reduced (MAX) over the
  ranks, so all of them stop at the same step even when only some received the signal.
- ``stop(trainer)``: every rank writes the checkpoint (the engine's atomic save), then rank 0 requeues the job
  when it runs under a SLURM batch job that is requeueable (``#SBATCH --requeue``, or the cluster's
  ``JobRequeue=1``) and still RUNNING (a plain ``scancel`` also sends TERM; that job stays cancelled) and
  ``--requeue_on_stop`` is true (the default), writes one log line (step, checkpoint,
  requeued or not) and the process leaves with ``EXIT_STOPPED`` (75, EX_TEMPFAIL: "stopped early, run it again";
  the restarted run continues with ``--resume auto``). ``scontrol requeue`` kills the job's processes at once,
  so it is the very last thing done.
"""
from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import time
from typing import Optional

from ..signal_names import parse_signals  # noqa: F401  (parse_signals lived here)

logger = logging.getLogger("kd_engine")

EXIT_STOPPED = 75
DEFAULT_SIGNALS = ["USR1", "TERM"]
STOPPED_FILE = "stopped.json"  # written by rank 0 when a stop signal ended the run (step, signal, checkpoint)


class Stopped(Exception):
    """Raised out of ``Trainer.fit`` after a signal-triggered checkpoint; the CLI exits with EXIT_STOPPED."""

    def __init__(self, step: int, path: str, requeued: bool, signame: str):
        super().__init__(f"stopped by {signame} at step {step}; checkpoint {path}; "
                         f"{'requeued' if requeued else 'not requeued'}")
        self.step, self.path, self.requeued, self.signame = step, path, requeued, signame


class StopSignals:
    def __init__(self, names: list[str]):
        self.signals = parse_signals(names)
        self.received: Optional[int] = None
        self.received_at: Optional[float] = None
        self._previous = {}
        self._restart_logged = False
        for sig in self.signals:
            prev = signal.signal(sig, self._handler)
            owner = getattr(prev, "__self__", None)
            if isinstance(owner, StopSignals):  # an earlier in-process run that never restored: keep the original
                prev = owner._previous.get(sig, signal.SIG_DFL)
            self._previous[sig] = prev

    def _handler(self, signum, frame) -> None:  # only records: the loop acts at the next step boundary
        if self.received is None:
            self.received, self.received_at = signum, time.time()

    def at_step_boundary(self, trainer) -> None:
        """Called by the loop before every step: logs the restart count once, raises ``Stopped`` on a signal."""
        if not self._restart_logged:
            from .autoresume import restart_count

            trainer.monitor.scalars(trainer.global_step, {"restart_count": restart_count()}, "run")
            self._restart_logged = True
        if self.should_stop():
            raise stop(trainer, self)

    def should_stop(self) -> bool:
        """Collective: True on every rank when any rank received a stop signal."""
        import torch
        import torch.distributed as dist

        flag = 1 if self.received is not None else 0
        if dist.is_initialized() and dist.get_world_size() > 1:
            t = torch.tensor([flag], dtype=torch.int32)
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
            flag = int(t.item())
        return bool(flag)

    def name(self) -> str:
        return signal.Signals(self.received).name if self.received is not None else "a signal on another rank"

    def restore(self) -> None:
        for sig, prev in self._previous.items():
            signal.signal(sig, prev if prev is not None else signal.SIG_DFL)
        self._previous = {}


def slurm_job_to_requeue() -> Optional[str]:
    """The id ``scontrol requeue`` needs (array task: ARRAYJOB_TASK), or None outside a SLURM batch job."""
    env = os.environ
    if "SLURM_JOB_ID" not in env:
        return None
    if env.get("SLURM_ARRAY_JOB_ID") and env.get("SLURM_ARRAY_TASK_ID"):
        return f"{env['SLURM_ARRAY_JOB_ID']}_{env['SLURM_ARRAY_TASK_ID']}"
    return env["SLURM_JOB_ID"]


def job_is_requeueable(job: str) -> bool:
    """A batch job submitted with --requeue (or under JobRequeue=1 without --no-requeue) that is still RUNNING (a
    USR1 warning, ``scancel --signal``, or a partition-priority preemption during its grace time), or one that
    reached its time limit: SLURM then sends TERM with the job COMPLETING and ``Reason=TimeLimit``, and
    ``scontrol requeue`` still takes it (measured on the local cluster: the job restarted with
    SLURM_RESTART_COUNT=1). ``scancel JOB`` also sends TERM with the job COMPLETING for another reason: it must stay
    cancelled."""
    try:
        info = subprocess.run(["scontrol", "show", "job", job], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return False
    toks = set(info.split())
    if "Requeue=1" not in toks or "BatchFlag=1" not in toks:
        return False
    return "JobState=RUNNING" in toks or ("JobState=COMPLETING" in toks and "Reason=TimeLimit" in toks)


def requeue(job: str) -> bool:
    try:
        r = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError) as exc:
        logger.warning("scontrol requeue %s failed: %s", job, exc)
        return False
    if r.returncode != 0:
        logger.warning("scontrol requeue %s failed: %s", job, r.stderr.strip())
    return r.returncode == 0


def stop(trainer, stopper: StopSignals) -> Stopped:
    """Checkpoint on every rank, then (rank 0) log and requeue. Returns the exception for the caller to raise."""
    from . import checkpoint

    latest = checkpoint.latest_checkpoint(trainer.cfg.output_dir)
    if latest is None or latest[0] != trainer.global_step:  # not already saved at this very step
        trainer._save()
    path = checkpoint.latest_checkpoint(trainer.cfg.output_dir)[1]
    trainer.monitor.close()
    stopper.restore()
    job = slurm_job_to_requeue()
    will_requeue = bool(job) and trainer.cfg.requeue_on_stop and trainer.is_main and job_is_requeueable(job)
    signame = stopper.name()
    if trainer.is_main:
        waited = time.time() - stopper.received_at if stopper.received_at else 0.0
        why = ("not under a SLURM job" if not job else "--requeue_on_stop false" if not trainer.cfg.requeue_on_stop
               else "job cancelled, ending or not requeueable")
        logger.info("stopped by %s at step %d (%.1f s after the signal); checkpoint %s; %s", signame,
                    trainer.global_step, waited, path,
                    f"requeueing SLURM job {job}" if will_requeue else f"not requeued ({why})")
        for h in logging.getLogger().handlers:
            h.flush()
    if trainer.is_main:  # for launchers that report their own exit code (torchrun: 1): train.sbatch reads it
        from ..io import write_text

        write_text(os.path.join(trainer.cfg.output_dir, STOPPED_FILE),
                   json.dumps({"step": trainer.global_step, "signal": signame, "checkpoint": path,
                               "requeue": will_requeue, "exit_code": EXIT_STOPPED, "time": time.time()}) + "\n")
    requeued = will_requeue and requeue(job)  # kills this job's processes: nothing may follow that matters
    return Stopped(trainer.global_step, path, requeued, signame)
