"""Pre-flight checks: what can be checked cheaply is checked before the heavy imports and before any write.

The trainer's own setup loads models and data before its first write (the run marker), so everything checked
later (vocabularies, empty corpora, batch sizes against the world size) is still checked before anything is
written; this module makes the common mistakes fail in a second instead of after the imports.
"""
from __future__ import annotations

import copy
import os

from .engine.checkpoint import check_output_dir


def preflight(parsed) -> None:
    """Raise KDError/ConfigError for bad input that needs neither the models nor the process group. Writes nothing."""
    from .batch_geometry import resolve_batch_geometry
    from .data.files import _looks_like_hub_id
    from .ds_config import DEFAULT_DS_CONFIG, load_ds_config, resolve_ds_config
    from .errors import KDError
    from .models.loading import resolve

    cfg = parsed.train
    # refuses a folder a live run holds (its lock) too; "auto" (--resume auto) is decided by the trainer
    if cfg.resume in (True, False, "true", "false"):
        check_output_dir(cfg.output_dir, cfg.resume in (True, "true"), cfg.overwrite_output_dir)
    method = parsed.method_cls
    cached = getattr(parsed.method_options, "teacher_cache", None)  # kd from a teacher cache loads no teacher
    if getattr(method, "needs_teacher", False) and not cfg.teacher and not cached:
        raise KDError(f"method '{method.name}' needs a teacher: pass --teacher PATH_OR_ID")
    for key in ("teacher", "student.name_or_path", "tokenizer"):
        value = cfg.student.name_or_path if key == "student.name_or_path" else getattr(cfg, key)
        if value:
            resolve(value, require_config=key != "tokenizer")
    for key in ("train_file", "eval_file"):
        path = getattr(cfg, key)
        if path and not os.path.exists(path) and not _looks_like_hub_id(path):
            raise KDError(f"data file '{path}' does not exist")
    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    if cfg.teacher_ranks > 0:
        world = check_teacher_group(cfg, world)  # the student group's size
    steps = cfg.max_steps if cfg.max_steps > 0 else 1
    path = cfg.deepspeed or DEFAULT_DS_CONFIG
    ds, probe = load_ds_config(path), copy.deepcopy(cfg)  # the trainer resolves the real ones later
    resolve_batch_geometry(probe, ds, world, path, getattr(parsed, "explicit", None))
    resolved = resolve_ds_config(ds, probe, world, steps, on_cpu=os.environ.get("DS_ACCELERATOR") == "cpu")
    from .ds_validate import validate_ds_json

    validate_ds_json(resolved, path)


def check_teacher_group(cfg, world: int) -> int:
    """--teacher_ranks against the job's world size and the teacher; returns the number of student ranks."""
    from .errors import ConfigError

    n, tp = cfg.teacher_ranks, cfg.teacher_tp
    if n >= world:
        raise ConfigError(f"--teacher_ranks {n} leaves no student rank in a world of {world} rank(s): start at least "
                          f"{n + 1} ranks (torchrun --nproc_per_node, deepspeed --num_gpus, srun -n)")
    if n % tp:
        raise ConfigError(f"--teacher_tp {tp} does not divide --teacher_ranks {n}: each teacher group of {tp} ranks "
                          "holds one tensor-parallel copy")
    if tp > 1:
        from .models.loading import load_config
        from .models.tensor_parallel import check_tp_request

        check_tp_request(load_config(cfg.teacher), tp, n, cfg.teacher)
    return world - n
