"""Attention implementation and activation checkpointing of the models, chosen by the engine options.

``--attn_implementation sdpa|eager|flash_attention_2`` is applied to teacher and student alike
(``set_attn_implementation``, transformers' own switch); flash-attention needs its package and a CUDA device, both
checked before anything heavy starts. ``--gradient_checkpointing`` turns on transformers' own non-reentrant
checkpointing of the student's layers (``gradient_checkpointing_enable``): the layers' activations are recomputed in
backward instead of stored. Generation (minillm, gkd) runs the student in eval mode, where transformers keeps the
KV cache on; checkpointing only acts in training-mode forwards.
"""
from __future__ import annotations

import importlib.util

from ..errors import ConfigError, KDError

ATTN_IMPLEMENTATIONS = ("sdpa", "eager", "flash_attention_2")


def check_attn_implementation(name: str) -> None:
    """ConfigError for an unknown implementation, or flash-attention without its package (no model needed)."""
    if name not in ATTN_IMPLEMENTATIONS:
        raise ConfigError(f"attn_implementation must be one of {', '.join(ATTN_IMPLEMENTATIONS)}; got {name!r}")
    if name == "flash_attention_2" and importlib.util.find_spec("flash_attn") is None:
        raise ConfigError("attn_implementation flash_attention_2 needs the flash-attn package (pip install "
                          "flash-attn --no-build-isolation, on a CUDA machine); use sdpa otherwise")


def apply_attn_implementation(model, name, which: str) -> None:
    """Switch ``model`` (teacher or student) to attention ``name``; KDError when the architecture lacks it."""
    if name is None or model is None:
        return
    if getattr(model.config, "_attn_implementation", None) == name:
        return
    try:
        model.set_attn_implementation(name)
    except (ValueError, ImportError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise KDError(f"the {which} ({type(model).__name__}) cannot use attn_implementation {name}: {first}") \
            from None


def enable_gradient_checkpointing(model):
    """transformers' non-reentrant activation checkpointing on the student; KDError for a model without it.
    Returns the config's ``use_cache`` as it was, for the export to restore (training forwards run without the
    cache, so that transformers does not warn on every first step; the sampler asks for the cache itself)."""
    if not getattr(model, "supports_gradient_checkpointing", False):
        raise KDError(f"--gradient_checkpointing: the student ({type(model).__name__}) does not support "
                      f"activation checkpointing in transformers")
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    use_cache = getattr(model.config, "use_cache", None)
    if use_cache:
        model.config.use_cache = False
    return use_cache


def apply_model_options(cfg, teacher, student):
    """``--attn_implementation`` on both models, ``--gradient_checkpointing`` on the student; returns the student
    config's ``use_cache`` for the export to restore (None when checkpointing is off)."""
    for model, which in ((teacher, "teacher"), (student, "student")):
        apply_attn_implementation(model, cfg.attn_implementation, which)
    return enable_gradient_checkpointing(student) if cfg.gradient_checkpointing else None
