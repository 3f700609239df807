"""Fault injection for the crash/resume tests and benchmarks (environment variables, off unless set).

KD_ENGINE_CRASH_AT_STEP=N       the process signals itself when step N begins
KD_ENGINE_CRASH_IN_SAVE=N       ... or while the checkpoint of step N is being written (engines saved, no COMPLETE)
KD_ENGINE_CRASH_IN_EXPORT=1     ... or while the final export is being written (before its rename)
KD_ENGINE_SLEEP_IN_SAVE=S      every checkpoint write takes S seconds longer (a slow file system)
KD_ENGINE_CRASH_IN_TEACHER=N    a teacher rank of --teacher_ranks ... before answering its N-th micro-batch
KD_ENGINE_CRASH_RANK=R          only rank R does (default: every rank; a teacher rank: its global rank)
KD_ENGINE_CRASH_SIGNAL=KILL     KILL (default) or STOP (a hung rank, for the --dist_timeout test)
KD_ENGINE_NONFINITE=loss@3,...  non-finite loss / gradients / weights at given steps (the non-finite guard's tests)
"""
from __future__ import annotations

import os
import signal


def _fire(var: str, step: int, rank: int) -> None:
    at = int(os.environ.get(var, "0") or 0)
    if not at or at != step:
        return
    only = os.environ.get("KD_ENGINE_CRASH_RANK")
    if only not in (None, "") and int(only) != rank:
        return
    sig = getattr(signal, "SIG" + os.environ.get("KD_ENGINE_CRASH_SIGNAL", "KILL").upper())
    os.kill(os.getpid(), sig)


def at_step(step: int, rank: int, module=None) -> None:
    """Start of step ``step`` (1-based): crash here, or make a weight infinite (``weights@step``)."""
    _fire("KD_ENGINE_CRASH_AT_STEP", step, rank)
    if module is not None:
        poison_weights(module, step)


def in_teacher(answer: int, rank: int) -> None:
    _fire("KD_ENGINE_CRASH_IN_TEACHER", answer, rank)


def in_save(step: int, rank: int) -> None:
    _fire("KD_ENGINE_CRASH_IN_SAVE", step, rank)
    slow = float(os.environ.get("KD_ENGINE_SLEEP_IN_SAVE", "0") or 0)
    if slow > 0:  # a slow file system: the checkpoint write takes this many seconds longer
        import time

        time.sleep(slow)


def in_export(rank: int) -> None:
    _fire("KD_ENGINE_CRASH_IN_EXPORT", 1, rank)


# KD_ENGINE_NONFINITE="loss@3,grad@5-6,weights@8": a NaN loss, NaN gradients, or an inf weight at those steps
def nonfinite(kind: str, step: int) -> bool:
    for part in os.environ.get("KD_ENGINE_NONFINITE", "").split(","):
        name, _, rng = part.strip().partition("@")
        if name == kind and rng:
            lo, _, hi = rng.partition("-")
            if int(lo) <= step <= int(hi or lo):
                return True
    return False


def poison_loss(loss, step: int):
    return loss * float("nan") if nonfinite("loss", step) else loss


def install_poison(module, current_step) -> None:
    """NaN gradients (a hook on the first trainable weight) at the 'grad' steps; ``current_step()`` is 1-based."""
    import torch

    if "KD_ENGINE_NONFINITE" not in os.environ:
        return
    p = next(p for p in module.parameters() if p.requires_grad)
    p.register_hook(lambda g: torch.full_like(g, float("nan")) if nonfinite("grad", current_step()) else g)


def poison_weights(module, step: int) -> None:
    import torch

    if nonfinite("weights", step):
        with torch.no_grad():
            next(iter(module.parameters())).fill_(float("inf"))
