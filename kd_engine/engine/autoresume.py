"""``--resume false|true|auto``: what to do with the output folder, decided before anything is written.

``auto`` (what SLURM jobs use, so a requeued job needs no change to its command line): resume from the newest
complete checkpoint when the folder holds one of *this* run; start fresh when the folder is new or empty, or holds
only this run's own files from a start that never reached a checkpoint; refuse (exit 2) a folder holding another
run (its ``kd_run.json`` names another method, teacher, student, data or batch layout) or files that are not a
kd_engine run. An explicit ``--resume`` refuses another run the same way, so a checkpoint of another method or
model shape is never loaded.
"""
from __future__ import annotations

import os

from ..config import to_dict
from ..errors import KDError
from ..input_files import InputFileError, read_json
from . import checkpoint

# settings that make a checkpoint another run's when they differ (run-length and logging settings may change)
IDENTITY_KEYS = ("method", "teacher", "student", "tokenizer", "train_file", "text_column", "text_pair_column",
                 "label_column", "target_column", "max_length", "max_train_samples", "seed",
                 "per_device_train_batch_size")  # accumulation may be adapted to a new world size on resume


def _marker(output_dir: str) -> dict | None:
    path = os.path.join(output_dir, checkpoint.RUN_MARKER)
    if not os.path.isfile(path):
        return None
    try:
        return read_json(path, "run marker")
    except InputFileError as exc:
        raise KDError(f"{exc}: is this folder a kd_engine run?") from None


def check_same_run(cfg, output_dir: str) -> None:
    """Raise when ``output_dir`` holds a kd_engine run whose identity differs from ``cfg``."""
    marker = _marker(output_dir)
    if marker is None or "config" not in marker:
        return
    old, new = marker["config"], to_dict(cfg)
    diffs = [k for k in IDENTITY_KEYS if k in old and old[k] != new.get(k)]
    if diffs:
        k = diffs[0]
        raise KDError(f"output_dir {output_dir} holds another run ({k} is {old[k]!r} there, {new.get(k)!r} here"
                      f"{'; also differs: ' + ', '.join(diffs[1:]) if diffs[1:] else ''}): refusing to resume or "
                      "replace it; pick another --output_dir")


def run_mode(cfg) -> str:
    """'fresh', 'resume' or 'overwrite' (the last also for an auto restart of our own run with no checkpoint)."""
    out = cfg.output_dir
    if cfg.resume == "auto":
        if os.path.isdir(out):  # check_output_dir does this for the other modes
            checkpoint.check_folder_usable(out)
        if not os.path.isdir(out) or not [e for e in os.listdir(out) if not e.startswith(".")]:
            return checkpoint.check_output_dir(out, False, False)
        if _marker(out) is None:  # files that are not a run: refused, never touched
            return checkpoint.check_output_dir(out, False, False)
        check_same_run(cfg, out)
        return "resume" if checkpoint.latest_checkpoint(out) else "overwrite"
    mode = checkpoint.check_output_dir(out, cfg.resume == "true", cfg.overwrite_output_dir)
    if mode == "resume":
        check_same_run(cfg, out)
    return mode


def restart_count() -> int:
    """SLURM_RESTART_COUNT (unset on a job's first run, then 1, 2, ...)."""
    try:
        return int(os.environ.get("SLURM_RESTART_COUNT", "0") or 0)
    except ValueError:
        return 0
