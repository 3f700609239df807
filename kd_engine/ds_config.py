"""DeepSpeed JSON handling: load, fill "auto" values from our config, check batch sizes, derive the teacher's."""
from __future__ import annotations

import copy
import logging
import os
from typing import Any

from .batch_geometry import resolve_batch_geometry
from .errors import ConfigError
from .io import load_mapping

logger = logging.getLogger(__name__)

DEFAULT_DS_CONFIG = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "ds_configs",
                                 "zero0.json")


def load_ds_config(path: str) -> dict[str, Any]:
    return load_mapping(path, "DeepSpeed config")


def _is_auto(v: Any) -> bool:
    return v is None or v == "auto"


def zero_stage(ds: dict) -> int:
    return int(ds.get("zero_optimization", {}).get("stage", 0) or 0)


def training_dtype(ds: dict) -> str:
    if ds.get("bf16", {}).get("enabled") in (True, "true"):
        return "bf16"
    if ds.get("fp16", {}).get("enabled") in (True, "true"):
        return "fp16"
    return "fp32"


def resolve_ds_config(ds: dict, cfg, world_size: int, total_steps: int, on_cpu: bool) -> dict:
    """A complete DeepSpeed config: "auto" filled from ``cfg``; batch sizes from ``resolve_batch_geometry`` (the
    trainer resolves them first, with the user's explicit keys, so this call finds them consistent).
    """
    ds = copy.deepcopy(ds)
    path = cfg.deepspeed or DEFAULT_DS_CONFIG
    geo = resolve_batch_geometry(cfg, ds, world_size, path)
    ds["train_micro_batch_size_per_gpu"] = geo.micro
    ds["gradient_accumulation_steps"] = geo.accumulation
    ds["train_batch_size"] = geo.global_batch

    if _is_auto(ds.get("gradient_clipping")):
        ds["gradient_clipping"] = cfg.max_grad_norm
    if on_cpu and ds.get("fp16", {}).get("enabled") in (True, "true", "auto"):
        raise ConfigError(f"{path} enables fp16, which DeepSpeed does not support on CPU: use bf16 or fp32")
    for key in ("bf16", "fp16"):
        if ds.get(key, {}).get("enabled") == "auto":
            ds[key]["enabled"] = False

    opt = ds.get("optimizer")
    if opt is None:
        opt = ds["optimizer"] = {"type": "AdamW", "params": {}}
    params = opt.setdefault("params", {})
    defaults = {"lr": cfg.learning_rate, "betas": [cfg.adam_beta1, cfg.adam_beta2], "eps": cfg.adam_epsilon,
                "weight_decay": cfg.weight_decay}
    for k, v in defaults.items():
        if _is_auto(params.get(k)):
            params[k] = v
    choose_adam_implementation(opt, ds, on_cpu)

    sched = ds.get("scheduler")
    if sched is not None:  # the JSON's own scheduler; without one the trainer builds ours (client_lr_scheduler)
        warmup = min(cfg.warmup_steps, max(total_steps - 1, 0))
        sp = sched.setdefault("params", {})
        for k, v in (("total_num_steps", total_steps), ("warmup_num_steps", warmup), ("warmup_max_lr", params["lr"])):
            if k in sp and _is_auto(sp[k]):
                sp[k] = v
    ds.setdefault("steps_per_print", 10 ** 9)
    ds.setdefault("wall_clock_breakdown", False)
    if cfg.report_to == "tensorboard":
        ds["tensorboard"] = {"enabled": True, "output_path": os.path.join(cfg.output_dir, "tensorboard"),
                             "job_name": "train"}
    _reject_leftover_auto(ds, path)
    return ds


def choose_adam_implementation(opt: dict, ds: dict, on_cpu: bool) -> None:
    """The fastest correct Adam/AdamW per device, as DeepSpeed's own optimizer config (DeepSpeed builds, wraps for
    ZeRO 1-3 and checkpoints it). GPU: left to DeepSpeed, whose default is its FusedAdam. CPU without optimizer
    offload: torch's AdamW (``torch_adam``; DeepSpeed's FusedAdam would compile a CPU op first) with its fused CPU
    kernel (DeepSpeed passes the remaining params, ``fused`` included, to ``torch.optim.AdamW``); torch's default
    on CPU is the single-tensor loop, 5.3x slower on a 64M-parameter student at ZeRO-0 (README, step time). A JSON
    that names ``torch_adam``, ``fused`` or ``foreach`` itself is kept as written. With optimizer offload DeepSpeed
    picks its DeepSpeedCPUAdam."""
    if opt.get("type", "").lower() not in ("adam", "adamw"):
        return
    params = opt.setdefault("params", {})
    offload = ds.get("zero_optimization", {}).get("offload_optimizer", {}).get("device") in ("cpu", "nvme")
    if not on_cpu or offload:
        return
    params.setdefault("torch_adam", True)
    if params["torch_adam"] and "fused" not in params and "foreach" not in params:
        params["fused"] = True


def skip_single_rank_allreduce(engine, world_size: int):
    """One rank at ZeRO-0: nothing to reduce, but DeepSpeed would still flatten every gradient, all-reduce it over
    the one rank and copy it back after each backward (README, step time): turn that off. ZeRO 1-3 keep it (their
    gradient partitioning runs inside it). Returns the engine."""
    if world_size == 1 and engine.zero_optimization_stage() == 0:
        engine.enable_backward_allreduce = False
    return engine


def client_lr_scheduler(ds: dict, cfg, total_steps: int):
    """When the JSON names no scheduler: a callable DeepSpeed calls with its optimizer (linear/constant/cosine with
    warmup, as in transformers); DeepSpeed checkpoints and restores it like its own."""
    if ds.get("scheduler") is not None:
        return None
    from transformers import get_scheduler

    name = {"constant": "constant_with_warmup"}.get(cfg.lr_scheduler_type, cfg.lr_scheduler_type)
    return lambda optimizer: get_scheduler(name, optimizer, num_warmup_steps=cfg.warmup_steps,
                                           num_training_steps=total_steps)


def _reject_leftover_auto(node: Any, path: str, where: str = "") -> None:
    if isinstance(node, dict):
        for k, v in node.items():
            _reject_leftover_auto(v, path, f"{where}.{k}" if where else k)
    elif node == "auto":
        raise ConfigError(f"{path}: '{where}' is \"auto\" but kd_engine has no value to fill it with")


def teacher_ds_config(student_ds: dict, teacher_dtype: str) -> dict | None:
    """Config for a ZeRO-3 partitioned teacher (student at stage 3), else None (replicated teacher)."""
    if zero_stage(student_ds) != 3:
        return None
    zs = student_ds.get("zero_optimization", {})
    cfg = {
        "train_micro_batch_size_per_gpu": student_ds["train_micro_batch_size_per_gpu"],
        "gradient_accumulation_steps": 1,
        "train_batch_size": student_ds["train_micro_batch_size_per_gpu"] * (
            student_ds["train_batch_size"] // (student_ds["train_micro_batch_size_per_gpu"]
                                               * student_ds["gradient_accumulation_steps"])),
        "zero_optimization": {"stage": 3},
        "steps_per_print": 10 ** 9,
    }
    for key in ("stage3_param_persistence_threshold", "stage3_prefetch_bucket_size", "stage3_max_live_parameters"):
        if key in zs:
            cfg["zero_optimization"][key] = zs[key]
    if zs.get("offload_param", {}).get("device") in ("cpu", "nvme"):
        cfg["zero_optimization"]["offload_param"] = dict(zs["offload_param"])
    if teacher_dtype == "bf16":
        cfg["bf16"] = {"enabled": True}
    elif teacher_dtype == "fp16":
        cfg["fp16"] = {"enabled": True}
    return cfg
