"""Logit knowledge distillation (Hinton et al. 2015): alpha * T^2 KL(teacher || student) + (1 - alpha) * CE.

Works for sequence classification (one row per example), causal LMs (one row per predicted token, shifted) and
seq2seq LMs (one row per target token). Only real rows count: labels != -100 (padding and prompt tokens).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..data.supervised import build_supervised_data
from ..errors import ConfigError
from ..losses.kd import hard_cross_entropy, kl_div_rows, logit_kd_loss, shift_for_causal_lm
from ..models.build import load_or_build_student, load_teacher_model, resolve_task
from .base import DataBundle, Method, register


@dataclass
class KDOptions:
    # one --help line per option, naming the recipe each default comes from (no annotation: not a field)
    HELP = {
        "temperature": "softmax temperature of the KD term; default 2.0 is the classification/encoder recipe (HF "
                       "distillation train.py for DistilBERT, Hinton KD); LM recipes use 1.0 (MiniLLM's word-level "
                       "KD baseline)",
        "alpha": "weight of the KD term, 1 - alpha goes to hard-label CE; default 0.5 is HF distillation "
                 "train.py's alpha_ce 0.5 (classification/encoder recipe); MiniLLM's KD baseline also mixes "
                 "0.5 LM + 0.5 KD; 1.0 = pure distillation, as TRL's GKDTrainer",
        "task": "auto (from the teacher's architecture) | causal_lm | seq2seq_lm | sequence_classification",
    }
    temperature: float = 2.0
    alpha: float = 0.5  # weight of the soft (KD) term; 1 - alpha goes to the hard-label cross-entropy
    task: str = "auto"  # auto | causal_lm | seq2seq_lm | sequence_classification

    def validate(self) -> None:
        if self.temperature <= 0:
            raise ConfigError(f"temperature must be > 0; got {self.temperature}")
        if not 0.0 <= self.alpha <= 1.0:
            raise ConfigError(f"alpha must be in [0, 1]; got {self.alpha}")


def aligned_logits(task: str, logits: torch.Tensor, labels: torch.Tensor):
    """Logit rows and the labels they predict (causal LMs predict the next token)."""
    if task == "causal_lm":
        return shift_for_causal_lm(logits, labels)
    return logits, labels


def model_inputs(batch: dict) -> dict:
    return {k: v for k, v in batch.items() if k in ("input_ids", "attention_mask", "token_type_ids",
                                                     "decoder_input_ids", "decoder_attention_mask")}


def seq2seq_inputs(model, batch: dict) -> dict:
    """Decoder inputs from the labels, start token once (``prepare_decoder_input_ids_from_labels``)."""
    inputs = model_inputs(batch)
    if "labels" in batch and "decoder_input_ids" not in inputs:
        inputs["decoder_input_ids"] = model.prepare_decoder_input_ids_from_labels(labels=batch["labels"])
        inputs["decoder_attention_mask"] = (batch["labels"] != -100).long()
    return inputs


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


def evaluation_metrics(task, s, t, labels, vocab_size, temperature) -> dict:
    """Student loss, accuracy and agreement with the teacher, as (sum, count) pairs over real rows."""
    mask = labels != -100
    n = float(mask.sum())
    if n == 0:
        return {}
    s_v = s[..., :vocab_size] if vocab_size else s
    pred = s_v.argmax(-1)
    loss_key = "lm_loss" if task != "sequence_classification" else "ce_loss"
    out = {loss_key: (float(hard_cross_entropy(s, labels, vocab_size)) * n, n),
           "accuracy": (float(((pred == labels) & mask).sum()), n)}
    if t is not None:
        t_v = t[..., :vocab_size] if vocab_size else t
        out["teacher_agreement"] = (float(((pred == t_v.argmax(-1)) & mask).sum()), n)
        out["kd_kl"] = (float(kl_div_rows(s, t, temperature, mask, vocab_size)) * n, n)
        out["teacher_accuracy"] = (float(((t_v.argmax(-1) == labels) & mask).sum()), n)
        out["teacher_" + loss_key] = (float(hard_cross_entropy(t, labels, vocab_size)) * n, n)
    return out
