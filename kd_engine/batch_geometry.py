"""Batch geometry, resolved once before anything depends on it: micro-batch per rank, gradient accumulation steps and
global batch, from the engine config (YAML / command line) and the DeepSpeed JSON.

Rules: an explicit JSON value is adopted unless the same quantity was also set explicitly (``--config`` YAML or the
command line) to a different value, which is an error naming both; ``train_batch_size`` must equal
micro x accumulation x world size, except that an accumulation left to ``"auto"`` (and not set explicitly) is
derived from it. The sampler and the step count are built from the result, and the JSON is filled with it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Optional

from .errors import ConfigError


@dataclass(frozen=True)
class BatchGeometry:
    micro: int  # examples per rank per forward/backward
    accumulation: int  # micro-batches per optimizer step
    world_size: int

    @property
    def global_batch(self) -> int:
        """Examples per optimizer step over all ranks (DeepSpeed's ``train_batch_size``)."""
        return self.micro * self.accumulation * self.world_size


def _json_int(ds: Mapping, key: str, path: str) -> Optional[int]:
    v = ds.get(key)
    if v is None or v == "auto":
        return None
    if isinstance(v, bool) or not isinstance(v, int) or v < 1:
        raise ConfigError(f"{path}: '{key}' must be a positive integer or \"auto\"; got {v!r}")
    return v


def resolve_batch_geometry(cfg, ds: Mapping[str, Any], world_size: int, path: str,
                           explicit: Optional[Mapping[str, str]] = None) -> BatchGeometry:
    """Decide micro / accumulation / global batch and write them into ``cfg`` (``per_device_train_batch_size``,
    ``gradient_accumulation_steps``). ``explicit`` maps the engine keys the user set to where they were set
    (``"the command line"``, ``"config.yaml"``); keys not in it are defaults the JSON may override."""
    explicit = explicit or {}
    micro_j = _json_int(ds, "train_micro_batch_size_per_gpu", path)
    accum_j = _json_int(ds, "gradient_accumulation_steps", path)
    total_j = _json_int(ds, "train_batch_size", path)

    def pick(key: str, json_key: str, json_value: Optional[int]) -> int:
        ours = getattr(cfg, key)
        if json_value is None:
            return ours
        if key in explicit and ours != json_value:
            raise ConfigError(f"batch sizes disagree: {key}={ours} ({explicit[key]}) but {json_key}={json_value} "
                              f"in {path}; set it in one place or to the same value")
        return json_value

    micro = pick("per_device_train_batch_size", "train_micro_batch_size_per_gpu", micro_j)
    accum = pick("gradient_accumulation_steps", "gradient_accumulation_steps", accum_j)
    if total_j is not None and total_j != micro * accum * world_size:
        derivable = accum_j is None and "gradient_accumulation_steps" not in explicit
        if derivable and total_j % (micro * world_size) == 0:
            accum = total_j // (micro * world_size)
        else:
            raise ConfigError(f"inconsistent batch sizes in {path}: train_batch_size={total_j} but micro batch "
                              f"{micro} x accumulation {accum} x world size {world_size} = "
                              f"{micro * accum * world_size}")
    cfg.per_device_train_batch_size = micro
    cfg.gradient_accumulation_steps = accum
    return BatchGeometry(micro, accum, world_size)
