"""The frozen teacher as its own inference engine.

- Student at ZeRO-3: ``deepspeed.initialize`` with a ZeRO-3 inference config and no optimizer, so the teacher's
  parameters are partitioned across ranks too (a teacher larger than one device fits).
- Otherwise: a replica through ``deepspeed.init_inference`` in its own dtype (no kernel injection).
The teacher is never part of the student's optimizer or checkpoint; it stays in ``eval()`` with no gradients, even
if someone calls ``train()`` on it.
"""
from __future__ import annotations

import torch

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def freeze(model: torch.nn.Module) -> torch.nn.Module:
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    model.train = lambda mode=True: model  # stays in eval mode whatever the caller does (dropout off)
    return model


def placement(cfg, student_stage: int) -> str:
    """How the teacher is placed, for the start-up log line."""
    if cfg.teacher_tp > 1:
        return f" (tensor parallel over groups of {cfg.teacher_tp} ranks)"
    return " (ZeRO-3 partitioned)" if student_stage == 3 else " (replica)"


def build_teacher_engine(teacher: torch.nn.Module, teacher_ds: dict | None, dtype: str, device):
    """Returns (callable engine, underlying nn.Module)."""
    import deepspeed

    from ..models.tensor_parallel import TensorParallelTeacher

    freeze(teacher)
    if isinstance(teacher, TensorParallelTeacher):  # already split over its group: no DeepSpeed engine around it
        teacher.module.to(DTYPES[dtype])
        freeze(teacher.module)
        return teacher, teacher
    if teacher_ds is not None:
        engine, *_ = deepspeed.initialize(model=teacher, config=teacher_ds)
        freeze(engine.module)
        engine.eval()
        return engine, engine.module
    teacher = teacher.to(DTYPES[dtype])
    engine = deepspeed.init_inference(teacher, dtype=DTYPES[dtype], replace_with_kernel_inject=False)
    module = engine.module
    module.to(device)
    freeze(module)
    return engine, module
