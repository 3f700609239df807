"""Resume on a different number of ranks (2 ranks -> 1, 2 nodes -> 1 after a partial allocation).

The checkpoint's COMPLETE marker records its batch geometry (micro-batch, accumulation, world size). On a resume
with another world size:
- the global batch is kept by changing the gradient accumulation (``adapt_accumulation``, before the engines are
  built); a global batch that the new world cannot split evenly is an error;
- ZeRO-0 engine states load directly; ZeRO 1-3 states are converted by DeepSpeed's own
  ``deepspeed.checkpoint.ds_to_universal`` into a scratch folder and loaded with ``load_universal_checkpoint``;
- the data position is carried over as the number of examples consumed in the epoch (``sampler_state``);
- ranks that did not exist get rank 0's RNG state and no method state (a warning says so).
The loss continues within noise but not bit for bit: the order in which examples are grouped can differ.
"""
from __future__ import annotations

import logging
import os
import re
import shutil
import subprocess
import sys
from typing import Optional

from ..errors import KDError
from ..input_files import InputFileError, load_tensors, read_json
from . import manifest

logger = logging.getLogger("kd_engine")


def saved_geometry(path: str) -> Optional[dict]:
    try:
        return read_json(os.path.join(path, manifest.COMPLETE), "checkpoint marker").get("geometry")
    except InputFileError:
        return None


def adapt_accumulation(cfg, world_size: int, latest) -> Optional[dict]:
    """On ``--resume`` with another world size: set micro-batch and accumulation so that the global batch stays the
    checkpoint's. ``latest``: ``checkpoint.latest_checkpoint(cfg.output_dir)`` or None (the caller reads it: this
    module is below ``checkpoint``, which calls it to load). Returns the checkpoint's geometry when it changed
    anything."""
    resuming = cfg.resume in (True, "true", "auto")  # bool, or the str of --resume false|true|auto
    latest = latest if resuming else None
    geo = saved_geometry(latest[1]) if latest else None
    if not geo or int(geo["world_size"]) == world_size:
        return None
    micro, global_batch = int(geo["micro"]), int(geo["micro"]) * int(geo["accumulation"]) * int(geo["world_size"])
    if global_batch % (micro * world_size):
        raise KDError(f"--resume: the checkpoint's global batch of {global_batch} ({geo['world_size']} ranks x micro "
                      f"{micro} x accumulation {geo['accumulation']}) cannot be split over {world_size} ranks")
    cfg.per_device_train_batch_size = micro
    cfg.gradient_accumulation_steps = global_batch // (micro * world_size)
    if os.environ.get("RANK", "0") == "0":
        logger.warning("resuming a %s-rank checkpoint on %d rank(s): gradient accumulation %s -> %d keeps the global "
                       "batch of %d", geo["world_size"], world_size, geo["accumulation"],
                       cfg.gradient_accumulation_steps, global_batch)
    return geo


def sampler_state(state: dict, world_size: int) -> dict:
    """The data position for ``world_size`` ranks: the same number of examples consumed in the epoch."""
    old = int(state.get("world_size", world_size))
    if old == world_size:
        return state
    consumed = int(state["position"]) * int(state["batch_size"]) * old
    per_batch = int(state["batch_size"]) * world_size
    if consumed % per_batch:
        raise KDError(f"--resume: {consumed} examples consumed in the epoch do not fill whole batches of "
                      f"{per_batch} on {world_size} ranks")
    return {**state, "world_size": world_size, "position": consumed // per_batch}


def load_engine(path: str, tag: str, engine, rank: int, barrier) -> tuple:
    """Load ``engine`` from a checkpoint written with another world size."""
    if engine.zero_optimization_stage() == 0:
        return engine.load_checkpoint(path, tag=tag, load_optimizer_states=True, load_lr_scheduler_states=True)
    scratch = os.path.join(os.path.dirname(path), f".universal-{os.path.basename(path)}")
    if rank == 0:
        shutil.rmtree(scratch, ignore_errors=True)
        os.makedirs(scratch)
        cmd = [sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder", os.path.join(path, tag),
               "--output_folder", os.path.join(scratch, tag), "--num_extract_workers", "1", "--num_merge_workers", "1"]
        if engine.zero_optimization_stage() in (1, 2):
            cmd.append("--inject_missing_state")
        r = subprocess.run(cmd, capture_output=True, text=True)
        if r.returncode != 0:
            raise KDError(f"could not convert {path}/{tag} to a universal checkpoint for a new world size: "
                          f"{(r.stderr.strip().splitlines() or ['?'])[-1][:300]}")
    barrier()
    engine._config.load_universal_checkpoint = True
    try:
        out = engine.load_checkpoint(scratch, tag=tag, load_optimizer_states=True, load_lr_scheduler_states=True)
    finally:
        engine._config.load_universal_checkpoint = False
        barrier()
        if rank == 0:
            shutil.rmtree(scratch, ignore_errors=True)
    return out


def method_states(path: str) -> list[dict]:
    """Every saved rank's method state of a checkpoint (rank order), for a resume on another world size."""
    names = sorted((n for n in os.listdir(path) if re.fullmatch(r"rank\d+\.pt", n)), key=lambda n: int(n[4:-3]))
    out = []
    for n in names:
        out.append(load_tensors(os.path.join(path, n), "checkpoint rank state").get("method", {}))
    return out


def check_method_state(method, path: str, world_size: int) -> None:
    """Before a resume of ``path`` on ``world_size`` ranks: KDError when it was written by another number of ranks
    and the method's per-rank state cannot move (``Method.reshard_refusal``)."""
    geo = saved_geometry(path)
    if not geo or int(geo["world_size"]) == world_size:
        return
    why = method.reshard_refusal(method_states(path))
    if why:
        raise KDError(f"--resume on {world_size} rank(s): {path} was written by {geo['world_size']} ranks and "
                      f"{why}; resume it on {geo['world_size']} ranks, or from a checkpoint where that state is empty")
