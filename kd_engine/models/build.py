"""Teacher/student construction shared by the methods: task detection, loading, building a student."""
from __future__ import annotations

import logging
from typing import Optional

import torch

from ..errors import KDError
from .loading import load_config, load_model

logger = logging.getLogger(__name__)

TASKS = ("causal_lm", "seq2seq_lm", "sequence_classification")


def detect_task(config) -> str:
    """The head a checkpoint was saved with: sequence classification, seq2seq LM or causal LM."""
    archs = getattr(config, "architectures", None) or []
    if any(a.endswith("ForSequenceClassification") for a in archs):
        return "sequence_classification"
    if getattr(config, "is_encoder_decoder", False):
        return "seq2seq_lm"
    return "causal_lm"


def resolve_task(task: str, cfg) -> str:
    if task != "auto":
        if task not in TASKS:
            raise KDError(f"task must be auto or one of {', '.join(TASKS)}; got '{task}'")
        return task
    src = cfg.teacher or cfg.student.name_or_path
    if not src:
        raise KDError("cannot tell the task without a model: pass --teacher or --student")
    return detect_task(load_config(src, cfg.trust_remote_code))


def generative_task(task: str, cfg, method: str) -> str:
    """``resolve_task`` for methods that sample from the models: causal_lm or seq2seq_lm, else a clear error."""
    resolved = resolve_task(task, cfg)
    if resolved not in ("causal_lm", "seq2seq_lm"):
        raise KDError(f"{method} needs a generative model (causal_lm or seq2seq_lm), got {resolved}")
    return resolved


def with_pad_token(tok):
    """The tokenizer with EOS as its pad token when it has none (most causal LMs); an error when it has neither."""
    if tok.pad_token_id is None:
        if tok.eos_token_id is None:
            raise KDError("the tokenizer has neither a pad nor an EOS token")
        tok.pad_token = tok.eos_token
    return tok


def load_teacher_model(cfg, task: str, **model_kwargs) -> torch.nn.Module:
    if not cfg.teacher:
        raise KDError("this method needs a teacher: pass --teacher PATH_OR_HUB_ID")
    if cfg.teacher_tp > 1:
        from .tensor_parallel import load_tp_model

        return load_tp_model(cfg.teacher, task, cfg.teacher_tp, trust_remote_code=cfg.trust_remote_code,
                             **model_kwargs)
    return load_model(cfg.teacher, task, trust_remote_code=cfg.trust_remote_code, **model_kwargs)


def load_or_build_student(cfg, teacher: Optional[torch.nn.Module], task: str, **model_kwargs) -> torch.nn.Module:
    """``--student PATH`` loads a model; otherwise a student is built from the teacher (``--student.layers`` ...)."""
    s = cfg.student
    if s.name_or_path:
        return load_model(s.name_or_path, task, trust_remote_code=cfg.trust_remote_code, **model_kwargs)
    if teacher is None:
        raise KDError("no student: pass --student PATH_OR_HUB_ID, or a --teacher to build one from")
    if not any(v is not None for v in (s.layers, s.decoder_layers, s.hidden, s.heads, s.intermediate)):
        raise KDError("no student: pass --student PATH_OR_HUB_ID, or --student.layers N to build one from the "
                      "teacher")
    from .student import create_student
    from .tensor_parallel import TensorParallelTeacher

    if isinstance(teacher, TensorParallelTeacher):  # random init: only the teacher's config and structure are read
        teacher = teacher.module
    return create_student(teacher, layers=s.layers, decoder_layers=s.decoder_layers, hidden=s.hidden,
                          heads=s.heads, intermediate=s.intermediate,
                          init="teacher_layers" if s.init == "auto" else s.init)
