"""Checkpoints: DeepSpeed's own save/load, made atomic, rotated, and guarded against clobbering other runs.

Layout under ``output_dir``::

    kd_run.json                 marks the folder as a kd_engine run (method, teacher, start time)
    checkpoints/step-00000006/  one complete checkpoint
        student/ ...            DeepSpeed engine checkpoint (model, optimizer, scheduler, client state)
        <engine name>/ ...      any extra engine a method registered (e.g. a generator)
        rank<r>.pt              per-rank RNG states and per-rank method state (e.g. rollout buffers)
        COMPLETE                written last: a folder without it is ignored and deleted
A checkpoint is written into ``checkpoints/.tmp-step-...`` and renamed into place once every rank finished, so a
crash mid-write never leaves a folder that looks complete.
"""
from __future__ import annotations

import json
import os
import random
import re
import shutil
import time
from typing import Optional

import numpy as np
import torch

from ..errors import KDError
from ..io import write_text

RUN_MARKER = "kd_run.json"
_STEP_RE = re.compile(r"^step-(\d+)$")


def checkpoint_root(output_dir: str) -> str:
    return os.path.join(output_dir, "checkpoints")


def complete_checkpoints(output_dir: str) -> list[tuple[int, str]]:
    root = checkpoint_root(output_dir)
    if not os.path.isdir(root):
        return []
    out = []
    for name in os.listdir(root):
        m = _STEP_RE.match(name)
        if m and os.path.isfile(os.path.join(root, name, "COMPLETE")):
            out.append((int(m.group(1)), os.path.join(root, name)))
    return sorted(out)


def latest_checkpoint(output_dir: str) -> Optional[tuple[int, str]]:
    ck = complete_checkpoints(output_dir)
    return ck[-1] if ck else None


def check_output_dir(output_dir: str, resume: bool, overwrite: bool) -> str:
    """Decide what to do with ``output_dir`` before anything is written: 'fresh', 'resume' or 'overwrite'.

    Never destroys another run unless ``overwrite`` is set; a folder that holds unrelated files is refused even
    then, so a typo'd path cannot wipe someone's data.
    """
    if not os.path.exists(output_dir):
        if resume:
            raise KDError(f"--resume: output directory {output_dir} does not exist, nothing to resume")
        return "fresh"
    if not os.path.isdir(output_dir):
        raise KDError(f"output_dir {output_dir} exists and is not a directory")
    entries = [e for e in os.listdir(output_dir) if not e.startswith(".")]
    if not entries:
        if resume:
            raise KDError(f"--resume: output directory {output_dir} holds no checkpoint")
        return "fresh"
    is_run = os.path.isfile(os.path.join(output_dir, RUN_MARKER))
    if resume:
        if not latest_checkpoint(output_dir):
            raise KDError(f"--resume: output directory {output_dir} holds no complete checkpoint")
        return "resume"
    if overwrite:
        if not is_run:
            raise KDError(f"output_dir {output_dir} is not empty and is not a kd_engine run "
                          f"({', '.join(sorted(entries)[:5])}...): refusing to overwrite it; pick another folder")
        return "overwrite"
    what = "another kd_engine run" if is_run else "other files"
    raise KDError(f"output_dir {output_dir} already holds {what}: pass --resume to continue it or "
                  "--overwrite_output_dir to replace it")


def clear_run(output_dir: str) -> None:
    for name in os.listdir(output_dir):
        p = os.path.join(output_dir, name)
        shutil.rmtree(p) if os.path.isdir(p) and not os.path.islink(p) else os.remove(p)


def write_run_marker(output_dir: str, info: dict) -> None:
    os.makedirs(output_dir, exist_ok=True)
    write_text(os.path.join(output_dir, RUN_MARKER), json.dumps(info, indent=2, default=str))


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save(output_dir: str, step: int, engines: dict, client_state: dict, rank: int, barrier, keep: int,
         rank_state: Optional[dict] = None) -> str:
    """Save every engine (collective call) and publish the checkpoint atomically; rotate old ones."""
    root = checkpoint_root(output_dir)
    name = f"step-{step:08d}"
    tmp = os.path.join(root, f".tmp-{name}")
    final = os.path.join(root, name)
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp, exist_ok=True)
    barrier()
    for tag, engine in engines.items():
        engine.save_checkpoint(tmp, tag=tag, client_state=client_state if tag == "student" else {},
                               save_latest=False)
    torch.save({"rng": rng_state(), "method": rank_state or {}}, os.path.join(tmp, f"rank{rank}.pt"))
    barrier()
    if rank == 0:
        write_text(os.path.join(tmp, "COMPLETE"), json.dumps({"step": step, "time": time.time()}))
        if os.path.exists(final):
            shutil.rmtree(final)
        os.replace(tmp, final)
        for _, path in complete_checkpoints(output_dir)[:-keep]:
            shutil.rmtree(path, ignore_errors=True)
        for stale in os.listdir(root):  # leftovers of crashed writes
            if stale.startswith(".tmp-") and stale != f".tmp-{name}":
                shutil.rmtree(os.path.join(root, stale), ignore_errors=True)
    barrier()
    return final


def load(path: str, engines: dict, rank: int) -> tuple[dict, dict]:
    """Load every engine from a complete checkpoint; returns (the student's client state, this rank's state)."""
    client_state: dict = {}
    for tag, engine in engines.items():
        if not os.path.isdir(os.path.join(path, tag)):
            raise KDError(f"checkpoint {path} has no '{tag}' engine state (was it written by another method?)")
        load_path, cs = engine.load_checkpoint(path, tag=tag, load_optimizer_states=True,
                                               load_lr_scheduler_states=True)
        if load_path is None:
            raise KDError(f"could not load the '{tag}' engine from {path}")
        if tag == "student":
            client_state = cs or {}
    rank_file = os.path.join(path, f"rank{rank}.pt")
    if not os.path.isfile(rank_file):
        raise KDError(f"checkpoint {path} has no state for rank {rank}: resume with the number of ranks it was "
                      "written with (or convert it with deepspeed.checkpoint.ds_to_universal)")
    own = torch.load(rank_file, weights_only=False)
    set_rng_state(own["rng"])
    return client_state, own.get("method", {})
