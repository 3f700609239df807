"""Build a smaller student from a teacher: copy selected teacher layers (DistilBART / DistilBERT style) or
initialise a narrower/shallower model at random (MiniLMv2 style).

Layer maps follow ``LAYERS_TO_COPY``, the table of Hugging Face's ``make_student.py`` (transformers
examples/research_projects/seq2seq-distillation); depths not in the table get evenly spaced layers that keep the
first and the last one.

Supported families (``config.model_type``): BERT-family encoders (bert, roberta, xlm-roberta, distilbert),
BART, T5 / Flan-T5 / mT5 and Llama-style causal LMs (llama, mistral, qwen2, qwen3). Any head class of those
families works; the student is built with the teacher's own class.
"""
from __future__ import annotations

import copy
import logging
import math
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Optional

import torch

from kd_engine.errors import KDError

if TYPE_CHECKING:  # pragma: no cover
    from transformers import PreTrainedModel

logger = logging.getLogger(__name__)

# Hugging Face make_student.py: LAYERS_TO_COPY[n_teacher][n_student] -> teacher layer indices kept (0-based).
LAYERS_TO_COPY: dict[int, dict[int, list[int]]] = {
    12: {
        1: [0],
        2: [0, 6],
        3: [0, 6, 11],
        4: [0, 4, 8, 11],
        6: [0, 2, 4, 7, 9, 11],
        9: [0, 1, 2, 4, 5, 7, 9, 10, 11],
        12: list(range(12)),
    },
    16: {
        4: [0, 5, 10, 15],
        6: [0, 3, 6, 9, 12, 15],
        16: list(range(16)),
    },
    6: {
        3: [0, 2, 5],
        6: list(range(6)),
    },
}

INIT_CHOICES = ("teacher_layers", "random")


def layers_to_copy(n_teacher: int, n_student: int) -> list[int]:
    """Teacher layer indices (0-based) that become student layers 0..n_student-1."""
    if not isinstance(n_student, int) or isinstance(n_student, bool) or n_student < 1:
        raise KDError(f"a student needs at least 1 layer, got {n_student!r}")
    if n_student > n_teacher:
        raise KDError(f"the student cannot have more layers ({n_student}) than the teacher ({n_teacher})")
    if n_student == n_teacher:
        return list(range(n_teacher))
    if n_student in LAYERS_TO_COPY.get(n_teacher, {}):
        return list(LAYERS_TO_COPY[n_teacher][n_student])
    if n_student == 1:
        picked = [0]
    else:
        step = (n_teacher - 1) / (n_student - 1)
        picked = [int(math.floor(i * step + 0.5)) for i in range(n_student)]
    logger.warning(
        "no layer map for %d -> %d layers in LAYERS_TO_COPY; using evenly spaced teacher layers %s",
        n_teacher, n_student, picked,
    )
    return picked


# ---------------------------------------------------------------------------------------------------------------
# Family descriptions: which config keys hold depth / width, and where the layer lists live.


@dataclass(frozen=True)
class Stack:
    name: str  # "encoder" or "decoder"
    depth_key: str  # config key holding this stack's depth
    pattern: str  # regex matching the ModuleList's qualified name in model.named_modules()


@dataclass(frozen=True)
class Family:
    name: str
    stacks: tuple[Stack, ...]
    hidden_keys: tuple[str, ...]
    heads_keys: tuple[str, ...]
    intermediate_keys: tuple[str, ...]


_BERT = Family(
    "bert-family encoder",
    (Stack("encoder", "num_hidden_layers", r"(^|\.)encoder\.layer$"),),
    ("hidden_size",), ("num_attention_heads",), ("intermediate_size",),
)
_DISTILBERT = Family(
    "distilbert",
    (Stack("encoder", "n_layers", r"(^|\.)transformer\.layer$"),),
    ("dim",), ("n_heads",), ("hidden_dim",),
)
_BART = Family(
    "bart",
    (Stack("encoder", "encoder_layers", r"(^|\.)encoder\.layers$"),
     Stack("decoder", "decoder_layers", r"(^|\.)decoder\.layers$")),
    ("d_model",), ("encoder_attention_heads", "decoder_attention_heads"), ("encoder_ffn_dim", "decoder_ffn_dim"),
)
_T5 = Family(
    "t5",
    (Stack("encoder", "num_layers", r"(^|\.)encoder\.block$"),
     Stack("decoder", "num_decoder_layers", r"(^|\.)decoder\.block$")),
    ("d_model",), ("num_heads",), ("d_ff",),
)
_LLAMA = Family(
    "llama-style causal LM",
    (Stack("decoder", "num_hidden_layers", r"^(model\.)?layers$"),),
    ("hidden_size",), ("num_attention_heads",), ("intermediate_size",),
)

FAMILIES: dict[str, Family] = {
    "bert": _BERT, "roberta": _BERT, "xlm-roberta": _BERT,
    "distilbert": _DISTILBERT,
    "bart": _BART,
    "t5": _T5, "mt5": _T5,
    "llama": _LLAMA, "mistral": _LLAMA, "qwen2": _LLAMA, "qwen3": _LLAMA,
}


def family_of(config) -> Family:
    model_type = getattr(config, "model_type", None)
    if model_type not in FAMILIES:
        raise KDError(
            f"unsupported architecture {model_type!r} for student construction; supported model types: "
            f"{', '.join(sorted(FAMILIES))} (BERT, RoBERTa, XLM-R, DistilBERT, BART, T5/Flan-T5, Llama-style)"
        )
    return FAMILIES[model_type]


def find_stacks(model: torch.nn.Module, family: Family) -> dict[str, tuple[Stack, str]]:
    """{stack name: (Stack, qualified module name)} for the stacks the model really has."""
    lists = [n for n, m in model.named_modules() if isinstance(m, torch.nn.ModuleList)]
    found = {}
    for stack in family.stacks:
        hits = [n for n in lists if re.search(stack.pattern, n)]
        if len(hits) > 1:
            raise KDError(f"ambiguous {stack.name} layer lists in {type(model).__name__}: {hits}")
        if hits:
            found[stack.name] = (stack, hits[0])
    if not found:
        raise KDError(f"no layer list found in {type(model).__name__} ({family.name} family)")
    return found


def _first(config_dict: dict, keys: tuple[str, ...]):
    return config_dict[keys[0]]


# ---------------------------------------------------------------------------------------------------------------


def _teacher_name(teacher) -> str:
    return str(getattr(teacher.config, "_name_or_path", "") or getattr(teacher, "name_or_path", "") or "unknown")


def _resolve_depths(teacher, family, stacks, layers, decoder_layers) -> dict[str, tuple[int, Optional[int]]]:
    """{stack name: (teacher depth, requested student depth or None = keep)}."""
    cls = type(teacher).__name__
    if len(family.stacks) == 1:  # encoder-only or decoder-only family: ``layers`` is its depth
        if decoder_layers is not None:
            raise KDError(f"decoder_layers applies to encoder-decoder models; {cls} has one stack: use layers")
        requested = {next(iter(stacks)): layers}
    else:  # encoder-decoder family (T5EncoderModel / BartForCausalLM have only one of the stacks)
        requested = {}
        for name, value, flag in (("encoder", layers, "layers"), ("decoder", decoder_layers, "decoder_layers")):
            if name in stacks:
                requested[name] = value
            elif value is not None:
                raise KDError(f"{flag} given but {cls} has no {name}")
    cfg = teacher.config.to_dict()
    out = {}
    for name, n_student in requested.items():
        stack, module_name = stacks[name]
        n_teacher = len(teacher.get_submodule(module_name))
        if cfg.get(stack.depth_key) not in (None, n_teacher):
            raise KDError(f"config {stack.depth_key}={cfg.get(stack.depth_key)} but the model has {n_teacher} layers")
        if n_student is not None:
            if isinstance(n_student, bool) or not isinstance(n_student, int) or n_student < 1:
                raise KDError(f"a student needs at least 1 {name} layer, got {n_student!r}")
            if n_student > n_teacher:
                raise KDError(
                    f"the student cannot have more {name} layers ({n_student}) than the teacher ({n_teacher})"
                )
        out[name] = (n_teacher, n_student)
    return out


def check_request(config, layers: int | None = None, decoder_layers: int | None = None) -> None:
    """Cheap checks on a teacher *config* (before loading weights): family supported, depths not too large."""
    family = family_of(config)
    cfg = config.to_dict()
    if len(family.stacks) == 1:
        if decoder_layers is not None:
            raise KDError("decoder_layers applies to encoder-decoder models; this teacher has one stack: use layers")
        pairs = [(family.stacks[0], layers)]
    else:
        pairs = list(zip(family.stacks, (layers, decoder_layers)))
    for stack, n in pairs:
        n_teacher = cfg.get(stack.depth_key)
        if n is not None and isinstance(n_teacher, int) and n > n_teacher:
            raise KDError(f"the student cannot have more {stack.name} layers ({n}) than the teacher ({n_teacher})")


def _width_overrides(cfg: dict, family: Family, hidden, heads, intermediate) -> dict:
    """Config keys to change for a new width; validates divisibility."""
    for label, value in (("hidden", hidden), ("heads", heads), ("intermediate", intermediate)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise KDError(f"{label} must be a positive integer, got {value!r}")
    t_hidden = _first(cfg, family.hidden_keys)
    t_heads = _first(cfg, family.heads_keys)
    new_hidden = hidden if hidden is not None else t_hidden
    new_heads = heads if heads is not None else t_heads
    if new_hidden % new_heads:
        raise KDError(f"heads ({new_heads}) must divide hidden ({new_hidden})")
    if intermediate is None and hidden is not None:
        intermediate = 4 * hidden  # MiniLMv2 pitfall: never keep the teacher's FFN width for a narrower model
    changes: dict = {}
    for key in family.hidden_keys:
        changes[key] = new_hidden
    for key in family.heads_keys:
        changes[key] = new_heads
    if intermediate is not None:
        for key in family.intermediate_keys:
            changes[key] = intermediate
    if (new_hidden, new_heads) == (t_hidden, t_heads):
        return changes  # per-head sizes and KV heads stay the teacher's (e.g. Qwen3's explicit head_dim)
    if family is _T5:
        changes["d_kv"] = new_hidden // new_heads
    if family is _LLAMA:
        if "head_dim" in cfg:
            changes["head_dim"] = new_hidden // new_heads
        t_kv = cfg.get("num_key_value_heads") or t_heads
        group = max(1, t_heads // t_kv)
        if new_heads % group == 0:
            kv = new_heads // group
        else:
            kv = new_heads
            logger.warning("heads=%d not divisible by the teacher's GQA group %d; using %d KV heads (MHA)",
                           new_heads, group, kv)
        changes["num_key_value_heads"] = kv
    return changes


def create_student(
    teacher: "PreTrainedModel",
    *,
    layers: int | None = None,
    decoder_layers: int | None = None,
    hidden: int | None = None,
    heads: int | None = None,
    intermediate: int | None = None,
    init: str = "teacher_layers",
) -> "PreTrainedModel":
    """A student of the teacher's class with the requested sizes.

    ``layers`` is the encoder depth of encoder / encoder-decoder models and the depth of a causal LM;
    ``decoder_layers`` the decoder depth of an encoder-decoder model. None keeps the teacher's depth.
    ``init="teacher_layers"`` copies every non-layer weight and the selected layers (``layers_to_copy``);
    ``init="random"`` builds a fresh model (width may change; ``intermediate`` defaults to 4 x ``hidden``).
    The copied layer indices are stored in ``student.config.kd_lineage``.
    """
    if init not in INIT_CHOICES:
        raise KDError(f"init must be one of {INIT_CHOICES}, got {init!r}")
    family = family_of(teacher.config)
    stacks = find_stacks(teacher, family)
    depths = _resolve_depths(teacher, family, stacks, layers, decoder_layers)
    cfg = teacher.config.to_dict()

    width = {"hidden": hidden, "heads": heads, "intermediate": intermediate}
    current = {
        "hidden": _first(cfg, family.hidden_keys),
        "heads": _first(cfg, family.heads_keys),
        "intermediate": _first(cfg, family.intermediate_keys),
    }
    changed = {k: v for k, v in width.items() if v is not None and v != current[k]}
    if init == "teacher_layers" and changed:
        raise KDError(
            f"changing the width ({', '.join(f'{k}={v}' for k, v in changed.items())}; teacher has "
            f"{', '.join(f'{k}={current[k]}' for k in changed)}) cannot copy teacher layers: use init='random'"
        )

    selected: dict[str, list[int]] = {}
    for name, (n_teacher, n_student) in depths.items():
        stack = stacks[name][0]
        n = n_teacher if n_student is None else n_student
        cfg[stack.depth_key] = n
        selected[name] = layers_to_copy(n_teacher, n) if init == "teacher_layers" else []
        layer_types = cfg.get("layer_types")
        if isinstance(layer_types, list) and len(layer_types) == n_teacher and family is _LLAMA:
            picked = selected[name] or list(range(n))
            cfg["layer_types"] = [layer_types[i] for i in picked]
    if init == "random":
        cfg.update(_width_overrides(cfg, family, hidden, heads, intermediate))
    cfg.pop("quantization_config", None)  # the student is a plain (dequantized) model
    cfg.pop("kd_lineage", None)
    cfg.pop("_name_or_path", None)

    config = type(teacher.config).from_dict(cfg)
    lineage = {
        "teacher": _teacher_name(teacher),
        "teacher_class": type(teacher).__name__,
        "init": init,
        "teacher_layers": {name: d[0] for name, d in depths.items()},
        "student_layers": {name: (d[1] if d[1] is not None else d[0]) for name, d in depths.items()},
    }
    for name, picked in selected.items():
        lineage[f"{name}_layers_copied"] = picked
    config.kd_lineage = lineage

    student = type(teacher)(config)
    student.to(dtype=teacher.dtype)

    if getattr(teacher, "generation_config", None) is not None and hasattr(student, "generation_config"):
        student.generation_config = copy.deepcopy(teacher.generation_config)  # beams, forced BOS, eos ids ...
    if init == "teacher_layers":
        _copy_weights(teacher, student, stacks, selected)
    student.to(device=teacher.device)
    return student


def _copy_weights(teacher, student, stacks, selected) -> None:
    teacher_sd = teacher.state_dict()
    result = student.load_state_dict(teacher_sd, strict=False)
    if result.missing_keys:
        raise KDError(f"student weights missing from the teacher's state dict: {result.missing_keys[:10]}")
    dropped = []  # (matcher, student depth): teacher layers at or past the depth are the dropped ones
    for name, picked in selected.items():
        module_name = stacks[name][1]
        n_student = len(picked)
        dropped.append((re.compile(rf"^{re.escape(module_name)}\.(\d+)\.").match, n_student))
        # overwrite student layer k with teacher layer picked[k]
        sub_sd = {}
        for k, t_idx in enumerate(picked):
            prefix = f"{module_name}.{t_idx}."
            for key, value in teacher_sd.items():
                if key.startswith(prefix):
                    sub_sd[f"{k}.{key[len(prefix):]}"] = value
        student.get_submodule(module_name).load_state_dict(sub_sd, strict=True)
        assert len(student.get_submodule(module_name)) == n_student
    for key in result.unexpected_keys:
        hits = [(match(key), n) for match, n in dropped]
        if not any(m is not None and int(m.group(1)) >= n for m, n in hits):
            raise KDError(f"teacher weight {key!r} has no place in the student (unsupported variant?)")
