"""Logit knowledge distillation (Hinton et al. 2015): alpha * T^2 KL(teacher || student) + (1 - alpha) * CE.

Works for sequence classification (one row per example), causal LMs (one row per predicted token, shifted) and
seq2seq LMs (one row per target token). Only real rows count: labels != -100 (padding and prompt tokens).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..data.supervised import build_supervised_data
from ..errors import ConfigError
from ..losses.kd import logit_kd_loss
from ..models.build import load_or_build_student, load_teacher_model, resolve_task
from ._supervised import aligned_logits, evaluation_metrics, model_inputs, seq2seq_inputs
from .base import DataBundle, Method, register


@dataclass
class KDOptions:
    temperature: float = 2.0
    alpha: float = 0.5  # weight of the soft (KD) term; 1 - alpha goes to the hard-label cross-entropy
    task: str = "auto"  # auto | causal_lm | seq2seq_lm | sequence_classification

    def validate(self) -> None:
        if self.temperature <= 0:
            raise ConfigError(f"temperature must be > 0; got {self.temperature}")
        if not 0.0 <= self.alpha <= 1.0:
            raise ConfigError(f"alpha must be in [0, 1]; got {self.alpha}")


@register("kd")
class LogitKD(Method):
    """Hinton logit distillation (temperature, T^2, alpha mix with hard labels)."""

    Options = KDOptions
    lm_loss_key = "lm_loss"

    def __init__(self, cfg, opts):
        super().__init__(cfg, opts)
        self.task = None

    def _task(self) -> str:
        if self.task is None:
            self.task = resolve_task(self.opts.task, self.cfg)
        return self.task

    def load_teacher(self, ctx):
        return load_teacher_model(self.cfg, self._task())

    def load_student(self, ctx, teacher):
        student = load_or_build_student(self.cfg, teacher, self._task())
        if self._task() == "sequence_classification" and teacher is not None:
            if student.config.num_labels != teacher.config.num_labels:
                raise ConfigError(f"teacher has {teacher.config.num_labels} classes, student "
                                  f"{student.config.num_labels}")
        self.vocab_size = len(ctx.tokenizer) if self._task() != "sequence_classification" else None
        self.label2id = getattr((teacher or student).config, "label2id", None)
        return student

    def build_data(self, ctx) -> DataBundle:
        task = self._task()
        data_task = "classification" if task == "sequence_classification" else task
        return build_supervised_data(self.cfg, ctx.tokenizer, data_task, self.label2id)

    def _inputs(self, model, batch):
        return seq2seq_inputs(model, batch) if self._task() == "seq2seq_lm" else model_inputs(batch)

    def compute_loss(self, ctx, batch):
        inputs = self._inputs(ctx.student.module, batch)
        s_logits = ctx.student(**inputs).logits
        t_logits = ctx.teacher_forward(**inputs).logits
        labels = batch.get("labels")
        s, lab = aligned_logits(self._task(), s_logits, labels)
        t, _ = aligned_logits(self._task(), t_logits, labels)
        return logit_kd_loss(s, t, lab, self.opts.temperature, self.opts.alpha, self.vocab_size)

    @torch.no_grad()
    def eval_step(self, ctx, batch):
        inputs = self._inputs(ctx.student.module, batch)
        s_logits = ctx.student(**inputs).logits
        t_logits = ctx.teacher_forward(**inputs).logits
        labels = batch["labels"]
        s, lab = aligned_logits(self._task(), s_logits, labels)
        t, _ = aligned_logits(self._task(), t_logits, labels)
        return evaluation_metrics(self._task(), s, t, lab, self.vocab_size, self.opts.temperature)

    def card_info(self):
        return {"task": self._task(), "temperature": self.opts.temperature, "alpha": self.opts.alpha}
