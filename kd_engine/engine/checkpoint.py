"""Checkpoints: DeepSpeed's own save/load, made atomic, verified, rotated, and guarded against clobbering other runs.

Layout under ``output_dir``::

    kd_run.json                 marks the folder as a kd_engine run; lists the entries kd_engine writes ("owns")
    checkpoints/step-00000006/  one complete checkpoint
        student/ ...            DeepSpeed engine checkpoint (model, optimizer, scheduler, client state)
        <engine name>/ ...      any extra engine a method registered (e.g. a generator)
        state.json              step, data position and counters (JSON)
        rank<r>.pt              per-rank RNG states and method state (tensors/numbers/strings only: weights_only load)
        MANIFEST.json           size and sha256 of every file above
        COMPLETE                written last, holds the manifest's sha256: a folder without it is ignored
A checkpoint is written into ``checkpoints/.tmp-step-...`` and renamed into place once every rank finished, so a
crash mid-write never leaves a folder that looks complete. On resume every file is checked against the manifest;
a damaged newest checkpoint is skipped (with a warning) for the previous whole one.
DeepSpeed's own ``*_model_states.pt`` / ``*_optim_states.pt`` are pickles: a checkpoint folder is trusted input.
"""
from __future__ import annotations

import json
import logging
import os
import random
import re
import shutil
import time
from typing import Optional

import numpy as np
import torch

from ..errors import KDError
from ..input_files import InputFileError, load_tensors, read_json, reading
from ..io import is_disk_full, write_text
from . import faults, manifest, reshard

logger = logging.getLogger("kd_engine")

RUN_MARKER = "kd_run.json"
STATE_FILE = "state.json"  # the trainer's own state in a checkpoint: step, data position, counters
# every top-level entry kd_engine writes into an output folder; --overwrite_output_dir deletes these and no others
OWNED = [RUN_MARKER, "checkpoints", "tensorboard", "train_log.jsonl", "final", "stopped.json"]
_STEP_RE = re.compile(r"^step-(\d+)$")
_TEMP_PREFIXES = (".tmp-export-", f".tmp-{RUN_MARKER}-")  # kd_engine.io's temporary names
_verified: dict[tuple[str, float], Optional[str]] = {}
_warned: set[str] = set()


def checkpoint_root(output_dir: str) -> str:
    return os.path.join(output_dir, "checkpoints")


def complete_checkpoints(output_dir: str) -> list[tuple[int, str]]:
    """Checkpoints with a COMPLETE marker, oldest first (not yet verified against their manifests)."""
    root = checkpoint_root(output_dir)
    if not os.path.isdir(root):
        return []
    out = []
    for name in os.listdir(root):
        m = _STEP_RE.match(name)
        if m and os.path.isfile(os.path.join(root, name, manifest.COMPLETE)):
            out.append((int(m.group(1)), os.path.join(root, name)))
    return sorted(out)


def problem(path: str) -> Optional[str]:
    """What is wrong with a checkpoint (None when it is whole); cached per folder and COMPLETE time."""
    try:
        key = (os.path.abspath(path), os.path.getmtime(os.path.join(path, manifest.COMPLETE)))
    except OSError:
        return f"{manifest.COMPLETE} marker is missing"
    if key not in _verified:
        _verified[key] = manifest.verify(path)
    return _verified[key]


def latest_checkpoint(output_dir: str) -> Optional[tuple[int, str]]:
    """The newest checkpoint whose files all match its manifest; damaged newer ones are skipped with a warning."""
    for step, path in reversed(complete_checkpoints(output_dir)):
        why = problem(path)
        if why is None:
            return step, path
        if os.environ.get("RANK", "0") == "0" and path not in _warned:
            _warned.add(path)
            logger.warning("checkpoint %s is damaged (%s): falling back to the previous checkpoint", path, why)
    return None


def _no_usable_checkpoint(output_dir: str) -> KDError:
    ck = complete_checkpoints(output_dir)
    if not ck:
        return KDError(f"--resume: output directory {output_dir} holds no complete checkpoint")
    why = "; ".join(f"{os.path.basename(p)}: {problem(p)}" for _, p in reversed(ck))
    return KDError(f"--resume: no usable checkpoint in {output_dir} ({why})")


def check_output_dir(output_dir: str, resume: bool, overwrite: bool) -> str:
    """Decide what to do with ``output_dir`` before anything is written: 'fresh', 'resume' or 'overwrite'.

    Never destroys another run unless ``overwrite`` is set; a folder that holds unrelated files is refused even
    then, so a typo'd path cannot wipe someone's data. Writes nothing.
    """
    if not os.path.exists(output_dir):
        if resume:
            raise KDError(f"--resume: output directory {output_dir} does not exist, nothing to resume")
        return "fresh"
    if not os.path.isdir(output_dir):
        raise KDError(f"output_dir {output_dir} exists and is not a directory")
    check_folder_usable(output_dir)
    entries = [e for e in os.listdir(output_dir) if not e.startswith(".")]
    if not entries:
        if resume:
            raise KDError(f"--resume: output directory {output_dir} holds no checkpoint")
        return "fresh"
    is_run = os.path.isfile(os.path.join(output_dir, RUN_MARKER))
    if resume:
        if not latest_checkpoint(output_dir):
            raise _no_usable_checkpoint(output_dir)
        return "resume"
    if overwrite:
        if not is_run:
            raise KDError(f"output_dir {output_dir} is not empty and is not a kd_engine run "
                          f"({', '.join(sorted(entries)[:5])}...): refusing to overwrite it; pick another folder")
        return "overwrite"
    what = "another kd_engine run" if is_run else "other files"
    raise KDError(f"output_dir {output_dir} already holds {what}: pass --resume to continue it or "
                  "--overwrite_output_dir to replace it")


def owned_entries(output_dir: str) -> list[str]:
    """Top-level names the run in ``output_dir`` wrote, from its marker (kd_engine's fixed list if unreadable)."""
    try:
        owns = read_json(os.path.join(output_dir, RUN_MARKER), "run marker").get("owns")
    except InputFileError:
        owns = None
    names = owns if isinstance(owns, list) and all(isinstance(n, str) for n in owns) else OWNED
    return [n for n in names if n and "/" not in n and n not in (".", "..")]


def check_folder_usable(output_dir: str) -> None:
    """An existing run folder, in every mode: no live run holds it (its lock), no link out of it among our names."""
    from .runlock import check_free

    check_free(output_dir)  # a live run's folder is never resumed, replaced or shared
    check_no_outside_links(output_dir)


def check_no_outside_links(output_dir: str) -> None:
    """KDError when a name kd_engine writes in the run folder is a symbolic link leading outside it: kd_engine would
    write through it (checkpoints, logs, the export) or replace it; neither may touch what the link points to."""
    root = os.path.realpath(output_dir)
    for name in OWNED:
        path = os.path.join(output_dir, name)
        if os.path.islink(path):
            target = os.path.realpath(path)
            if os.path.commonpath([root, target]) != root:
                raise KDError(f"{path} is a symbolic link to {target}, outside the run folder: kd_engine neither "
                              f"writes through it nor deletes it; remove the link or pick another --output_dir")


def _remove(path: str) -> None:
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path)
    elif os.path.lexists(path):
        os.remove(path)


def remove_stale_temps(output_dir: str) -> None:
    """Delete what a crashed kd_engine write left behind (half exports, half markers, half checkpoints)."""
    if not os.path.isdir(output_dir):
        return
    for name in os.listdir(output_dir):
        if name.startswith(_TEMP_PREFIXES):
            _remove(os.path.join(output_dir, name))
    root = checkpoint_root(output_dir)
    if os.path.isdir(root):
        for name in os.listdir(root):
            if name.startswith((".tmp-step-", ".universal-")):
                _remove(os.path.join(root, name))


def clear_run(output_dir: str) -> None:
    """--overwrite_output_dir: delete the entries the marker says kd_engine wrote (marker last), nothing else."""
    owned = owned_entries(output_dir)
    remove_stale_temps(output_dir)
    for name in sorted(owned, key=lambda n: n == RUN_MARKER):
        _remove(os.path.join(output_dir, name))


def write_run_marker(output_dir: str, info: dict) -> None:
    os.makedirs(output_dir, exist_ok=True)
    write_text(os.path.join(output_dir, RUN_MARKER), json.dumps({**info, "owns": OWNED}, indent=2, default=str))


def prepare_output_dir(output_dir: str, mode: str, method: str, config: dict, rank: int = 0) -> None:
    """Rank 0, once the run is known to be able to start: the first write of a run."""
    if rank != 0:
        return
    if mode == "overwrite":
        clear_run(output_dir)
    remove_stale_temps(output_dir)
    if mode != "resume":
        write_run_marker(output_dir, {"method": method, "teacher": config.get("teacher"), "started": time.time(),
                                      "config": config})



# ---- per-rank state without pickle ------------------------------------------------------------------------
def rng_state() -> dict:
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {"python": random.getstate(), "torch": torch.get_rng_state(),
             "numpy": {"kind": kind, "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)), "pos": int(pos),
                       "has_gauss": int(has_gauss), "gauss": float(gauss)}}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def plain(obj, where: str = "state"):
    """``obj`` as tensors, numbers, strings, None, lists, tuples and str-keyed dicts (what weights_only loads)."""
    if torch.is_tensor(obj):
        return obj.detach().cpu()
    if isinstance(obj, np.ndarray):
        return torch.from_numpy(obj.copy())
    if isinstance(obj, np.generic):
        return obj.item()
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    if isinstance(obj, dict):
        if not all(isinstance(k, (str, int)) for k in obj):
            raise TypeError(f"{where}: checkpoint state dict keys must be str or int")
        return {k: plain(v, f"{where}.{k}") for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        items = [plain(v, f"{where}[{i}]") for i, v in enumerate(obj)]
        return items if isinstance(obj, list) else tuple(items)
    raise TypeError(f"{where}: {type(obj).__name__} cannot go into a checkpoint (tensors, numbers, strings, "
                    "lists and dicts only)")


def save(output_dir: str, step: int, engines: dict, client_state: dict, rank: int, barrier, keep: int,
         rank_state: Optional[dict] = None, geometry: Optional[dict] = None) -> str:
    """Save every engine (collective call) and publish the checkpoint atomically; rotate old ones. ``geometry``
    (world_size, micro, accumulation) goes into COMPLETE for a resume on another world size (reshard.py)."""
    root = checkpoint_root(output_dir)
    name = f"step-{step:08d}"
    tmp = os.path.join(root, f".tmp-{name}")
    final = os.path.join(root, name)
    own = {"rng": rng_state(), "method": plain(rank_state or {}, "method state")}
    try:
        if rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
            os.makedirs(tmp, exist_ok=True)
        barrier()
        for tag, engine in engines.items():
            engine.save_checkpoint(tmp, tag=tag, client_state={}, save_latest=False)
        if rank == 0:  # step, data position, counters: JSON, not inside DeepSpeed's pickles
            write_text(os.path.join(tmp, STATE_FILE), json.dumps(client_state, indent=1, sort_keys=True))
        torch.save(own, os.path.join(tmp, f"rank{rank}.pt"))
        faults.in_save(step, rank)
        barrier()
        if rank == 0:
            digest = manifest.write(tmp, write_text)
            write_text(os.path.join(tmp, manifest.COMPLETE),
                       json.dumps({"step": step, "time": time.time(), "manifest_sha256": digest,
                                   "geometry": geometry}))
    except Exception as exc:  # a failed write (disk full): the half-written folder never looks complete
        if rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        if not is_disk_full(exc, root):
            raise
        from ..io import free_mib

        last = latest_checkpoint(output_dir)
        raise KDError(f"no space left to write checkpoint {name} in {root} ({free_mib(root):.1f} MiB free); the "
                      f"half-written copy was removed; newest complete checkpoint: {last[1] if last else '(none)'}. "
                      f"Free space (or lower --save_total_limit), then --resume") from None
    if rank == 0:
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


def load(path: str, engines: dict, rank: int, world_size: Optional[int] = None, barrier=lambda: None
         ) -> tuple[dict, dict]:
    """Load every engine from a complete checkpoint; returns (the student's client state, this rank's state).
    A checkpoint written with another world size goes through DeepSpeed's universal checkpoint (reshard.py)."""

    geo = reshard.saved_geometry(path)
    resharded = bool(geo and world_size and int(geo["world_size"]) != world_size)
    client_state: dict = {}
    for tag, engine in engines.items():
        if not os.path.isdir(os.path.join(path, tag)):
            raise KDError(f"checkpoint {path} has no '{tag}' engine state (was it written by another method?)")
        if resharded:
            load_path, cs = reshard.load_engine(path, tag, engine, rank, barrier)
        else:
            load_path, cs = engine.load_checkpoint(path, tag=tag, load_optimizer_states=True,
                                                   load_lr_scheduler_states=True)
        if load_path is None:
            raise KDError(f"could not load the '{tag}' engine from {path}")
        if tag == "student":
            client_state = cs or {}  # checkpoints written before state.json kept it in DeepSpeed's client state
    if os.path.isfile(os.path.join(path, STATE_FILE)):
        client_state = read_json(os.path.join(path, STATE_FILE), "checkpoint state")
    rank_file = os.path.join(path, f"rank{rank}.pt")
    if resharded and not os.path.isfile(rank_file):
        logger.warning("rank %d did not exist when %s was written: it starts from rank 0's RNG state and no method "
                       "state", rank, path)
        rank_file = os.path.join(path, "rank0.pt")
    elif not os.path.isfile(rank_file):
        raise KDError(f"checkpoint {path} has no state for rank {rank}: resume with the number of ranks it was "
                      "written with (or convert it with deepspeed.checkpoint.ds_to_universal)")
    own = load_tensors(rank_file, "checkpoint rank state")
    with reading("checkpoint rank state", rank_file):  # an old format without RNG state
        set_rng_state(own["rng"])
    return client_state, {} if resharded and rank_file.endswith("rank0.pt") and rank else own.get("method", {})
