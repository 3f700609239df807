"""The DeepSpeed JSON checked before anything is written, with DeepSpeed's own rules where it has them.

- ``zero_optimization``, ``bf16`` and ``fp16`` go through DeepSpeed's own pydantic models (``DeepSpeedZeroConfig``,
  ``DeepSpeedBF16Config``, ``DeepSpeedFP16Config``): a value DeepSpeed rejects (``"stage": 7``) or a key it does not
  know inside them is one error naming the file, the key and DeepSpeed's reason, instead of a traceback from
  ``deepspeed.initialize`` after the run folder was written.
- Top-level keys: DeepSpeed ignores unknown ones silently. A key that is clearly a typo of a known one (close by
  ``difflib``, e.g. ``"zero_optimisation"``) is an error naming the known key; any other unknown key is a warning.
"""
from __future__ import annotations

import difflib
import logging

from .errors import ConfigError

logger = logging.getLogger(__name__)

# top-level sections of DeepSpeed's config (deepspeed.runtime.config / docs "DeepSpeed Configuration JSON"), besides
# the scalar keys in deepspeed.runtime.constants
SECTIONS = ("zero_optimization", "optimizer", "scheduler", "fp16", "bf16", "amp", "torch_autocast", "tensorboard",
            "wandb", "csv_monitor", "comet", "monitor", "activation_checkpointing", "flops_profiler", "comms_logger",
            "aio", "checkpoint", "elasticity", "autotuning", "compression_training", "data_efficiency",
            "curriculum_learning", "sparse_attention", "pipeline", "hybrid_engine", "nebula", "weight_quantization",
            "quantize_training", "sequence_parallel_size", "tensor_parallel", "zero_allow_untested_optimizer",
            "zero_force_ds_cpu_optimizer", "communication_data_type", "seq_parallel_communication_data_type",
            "gradient_clipping", "graph_harvesting", "compile", "timers", "dataloader_drop_last", "eigenvalue",
            "progressive_layer_drop", "data_types", "use_node_local_storage", "expert_parallel", "moe",
            "load_universal_checkpoint", "train_batch_size", "train_micro_batch_size_per_gpu",
            "gradient_accumulation_steps", "steps_per_print", "wall_clock_breakdown", "memory_breakdown",
            "prescale_gradients", "gradient_predivide_factor", "sparse_gradients", "disable_allgather", "dump_state",
            "zenflow", "domino", "ds_pipe_replicated", "offload_states")


def known_keys() -> set[str]:
    keys = set(SECTIONS)
    try:
        import deepspeed.runtime.constants as consts

        keys |= {v for k, v in vars(consts).items() if k.isupper() and isinstance(v, str) and v.islower()
                 and " " not in v and len(v) > 3}
    except ImportError:  # pragma: no cover
        pass
    return keys


def _pydantic_reason(exc) -> str:
    errors = getattr(exc, "errors", None)
    if callable(errors):
        parts = []
        for e in errors()[:3]:
            loc = ".".join(str(x) for x in e.get("loc", ()))
            msg = e.get("msg", "")
            if e.get("type") == "extra_forbidden":
                msg = "unknown key"
            parts.append(f"{loc}: {msg} (got {e.get('input')!r})" if "input" in e and e.get("type") != "missing"
                         else f"{loc}: {msg}")
        return "; ".join(parts)
    return str(exc).splitlines()[0]


def _check_section(ds: dict, key: str, model, path: str) -> None:
    section = ds.get(key)
    if section is None:
        return
    if not isinstance(section, dict):
        raise ConfigError(f"DeepSpeed config {path}: '{key}' must be a mapping, got {type(section).__name__}")
    try:  # "auto" values that kd_engine does not fill are left to DeepSpeed's own defaults check
        model(**{k: v for k, v in section.items() if v != "auto"})
    except Exception as exc:  # pydantic.ValidationError (DeepSpeed's models forbid unknown keys)
        names = sorted(getattr(model, "model_fields", {}) or {})
        reason = _pydantic_reason(exc)
        hint = ""
        for e in (exc.errors() if callable(getattr(exc, "errors", None)) else []):
            if e.get("type") == "extra_forbidden" and e.get("loc"):
                close = difflib.get_close_matches(str(e["loc"][0]), names, n=1, cutoff=0.75)
                hint = f"; did you mean '{close[0]}'?" if close else ""
                break
        raise ConfigError(f"DeepSpeed config {path}: {key}.{reason}{hint}") from None


def validate_ds_json(ds: dict, path: str) -> None:
    """ConfigError for what DeepSpeed would reject (or silently ignore as a typo); warnings for other unknown keys."""
    from deepspeed.runtime.precision_config import DeepSpeedBF16Config, DeepSpeedFP16Config
    from deepspeed.runtime.zero.config import DeepSpeedZeroConfig

    known = known_keys()
    for key in ds:
        if key in known:
            continue
        close = difflib.get_close_matches(key, sorted(known), n=1, cutoff=0.85)
        if close:
            raise ConfigError(f"DeepSpeed config {path}: unknown key '{key}'; did you mean '{close[0]}'? "
                              f"(DeepSpeed would ignore it)")
        logger.warning("DeepSpeed config %s: key '%s' is not one DeepSpeed reads (ignored)", path, key)
    for key, model in (("zero_optimization", DeepSpeedZeroConfig), ("bf16", DeepSpeedBF16Config),
                       ("fp16", DeepSpeedFP16Config)):
        _check_section(ds, key, model, path)
