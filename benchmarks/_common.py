"""Helpers shared by the benchmarks (imported as ``_common``: a benchmark runs as ``python benchmarks/X.py``).

- ``status_kib`` / ``reset_peak``: a process's resident set size and peak (``/proc/self/status``), and the
  reset of that peak to the current size, for peak-memory measurements in a fresh child process.
- ``PeakGrowth``: a context manager measuring the peak RSS growth and wall time of what runs inside it.
- ``HERE`` / ``ROOT`` / ``RESULTS``: benchmarks/, the repository root, benchmarks/results/.
- ``pyplot`` / ``save_figure``: matplotlib's pyplot on the Agg backend, or None (with a note) where the ``[plots]``
  extra is missing; a figure written the benchmarks' one way (tight layout, 100 dpi).
- ``single_rank_env`` / ``timed_fit`` / ``train_losses``: a child process running the real engine as one rank
  (launcher variables, CPU accelerator where there is no GPU), its steps timed (device-synchronised on CUDA), and
  the logged training losses of its run folder.
"""
from __future__ import annotations

import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
RESULTS = os.path.join(HERE, "results")


def status_kib(field: str) -> int:
    """A ``/proc/self/status`` field in KiB, e.g. ``VmRSS`` (resident now) or ``VmHWM`` (peak)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def reset_peak() -> bool:
    """Reset ``VmHWM`` to the current RSS (Linux >= 4.0); False where the kernel does not allow it."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


class PeakGrowth:
    """``with PeakGrowth() as m: work()`` -> ``m.base_kib`` (RSS before), ``m.peak_kib`` (peak RSS during),
    ``m.growth_kib`` (what the work needed), ``m.seconds`` (wall time), ``m.exact`` (the peak counter was reset
    at the start; otherwise the process-wide peak ``ru_maxrss`` is used, or with ``strict`` an OSError raised).

    Meant for a fresh child process that does nothing else, so that its peak is the work's."""

    def __init__(self, strict: bool = False):
        self.strict = strict

    def __enter__(self) -> "PeakGrowth":
        self.base_kib = status_kib("VmRSS")
        self.exact = reset_peak()
        if self.strict and not self.exact:
            raise OSError("cannot reset the peak RSS counter (/proc/self/clear_refs)")
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        self.seconds = time.perf_counter() - self.t0
        self.peak_kib = status_kib("VmHWM")
        if not self.exact:  # fall back to the process-wide peak
            import resource

            self.peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        self.growth_kib = self.peak_kib - self.base_kib


def pyplot():
    """``matplotlib.pyplot`` on the Agg backend, or None after a note on stderr when matplotlib is missing."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("note: matplotlib not installed (pip install .[plots]); no plot written", file=sys.stderr)
        return None
    return plt


def save_figure(fig, path: str) -> bool:
    """Write ``fig`` to ``path`` (tight layout, 100 dpi); True, for ``return save_figure(fig, path)``."""
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    return True


def single_rank_env(port: int, **extra) -> dict:
    """This process's environment for a one-rank child of the engine on loopback port ``port``."""
    env = dict(os.environ, RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
               GLOO_SOCKET_IFNAME="lo", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    env.update(extra)
    return env


def timed_fit(argv: list, before_step=None):
    """Build the engine from ``argv`` as the CLI does (quiet logging, accelerator chosen), run ``fit`` with every
    ``method.train_step`` timed; ``before_step(trainer)`` runs before each step's clock starts. Returns (trainer,
    seconds per step)."""
    sys.path.insert(0, ROOT)
    import torch

    from kd_engine.cli import _setup_logging
    from kd_engine.config import build_config
    from kd_engine.dist import setup_environment
    from kd_engine.engine.trainer import Trainer

    parsed = build_config(argv)
    _setup_logging(False)
    setup_environment()
    tr = Trainer(parsed)
    inner, times = tr.method.train_step, []
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)

    def timed(ctx):
        if before_step is not None:
            before_step(tr)
        sync()
        t0 = time.perf_counter()
        out = inner(ctx)
        sync()
        times.append(time.perf_counter() - t0)
        return out

    tr.method.train_step = timed
    tr.fit()
    return tr, times


def train_losses(output_dir: str) -> list:
    import json

    with open(os.path.join(output_dir, "train_log.jsonl"), encoding="utf-8") as fh:
        return [r["loss"] for r in map(json.loads, fh) if r["split"] == "train" and "loss" in r]
