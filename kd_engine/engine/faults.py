"""Fault injection for the crash/resume tests and benchmarks (environment variables, off unless set).

KD_ENGINE_CRASH_AT_STEP=N       the process signals itself when step N begins
KD_ENGINE_CRASH_IN_SAVE=N       ... or while the checkpoint of step N is being written (engines saved, no COMPLETE)
KD_ENGINE_CRASH_IN_EXPORT=1     ... or while the final export is being written (before its rename)
KD_ENGINE_CRASH_RANK=R          only rank R does (default: every rank)
KD_ENGINE_CRASH_SIGNAL=KILL     KILL (default) or STOP (a hung rank, for the --dist_timeout test)
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


def at_step(step: int, rank: int) -> None:
    _fire("KD_ENGINE_CRASH_AT_STEP", step, rank)


def in_save(step: int, rank: int) -> None:
    _fire("KD_ENGINE_CRASH_IN_SAVE", step, rank)


def in_export(rank: int) -> None:
    _fire("KD_ENGINE_CRASH_IN_EXPORT", 1, rank)
