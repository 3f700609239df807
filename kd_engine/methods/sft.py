"""Supervised fine-tuning without a teacher (the "shrink and fine-tune" baseline, downstream evaluation).

Sequence classification (text [+ pair] -> label, e.g. SST-2 or MNLI), causal LM (plain text, or prompt + response
with the loss on the response only) and seq2seq. The model is ``--student PATH`` or a student built from
``--teacher`` by copying layers (``--student.layers N``); the teacher itself is not used during training.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..data.supervised import build_supervised_data
from ..errors import ConfigError, KDError
from ..losses.kd import hard_cross_entropy
from ..models.build import load_or_build_student, load_teacher_model, resolve_task
from ._supervised import aligned_logits, evaluation_metrics, model_inputs, seq2seq_inputs
from .base import DataBundle, Method, register


@dataclass
class SFTOptions:
    task: str = "auto"  # auto | causal_lm | seq2seq_lm | sequence_classification
    num_labels: int = 0  # > 0: put a fresh classification head with this many classes on an encoder
    freeze_encoder: bool = False  # encoder-decoder: freeze the encoder (DistilBART SFT recipe)
    freeze_embeds: bool = False  # freeze token and position embeddings

    def validate(self) -> None:
        if self.num_labels < 0:
            raise ConfigError("num_labels must be >= 0")


def freeze_parts(model: torch.nn.Module, encoder: bool, embeds: bool) -> None:
    if encoder:
        enc = model.get_encoder() if hasattr(model, "get_encoder") else None
        if enc is None:
            raise KDError("--freeze_encoder needs an encoder-decoder model")
        for p in enc.parameters():
            p.requires_grad_(False)
    if embeds:
        for name, module in model.named_modules():
            if isinstance(module, torch.nn.Embedding) or "embed_positions" in name:
                for p in module.parameters():
                    p.requires_grad_(False)


@register("sft")
class SupervisedFineTune(Method):
    """Supervised fine-tuning on labels, no teacher (shrink-and-fine-tune, downstream evaluation)."""

    Options = SFTOptions
    lm_loss_key = "lm_loss"
    needs_teacher = False
    requires_same_vocab = False
    supports_packing = True
    supports_messages = True

    def __init__(self, cfg, opts):
        super().__init__(cfg, opts)
        self.task = None

    def _task(self) -> str:
        if self.task is None:
            self.task = "sequence_classification" if self.opts.num_labels > 0 else resolve_task(self.opts.task,
                                                                                                self.cfg)
        return self.task

    def load_teacher(self, ctx):
        return None

    def load_student(self, ctx, teacher):
        extra = {}
        if self.opts.num_labels > 0:
            extra = {"num_labels": self.opts.num_labels}
        if self.cfg.student.name_or_path:
            student = load_or_build_student(self.cfg, None, self._task(), **extra)
        else:  # shrink the given --teacher, then fine-tune it without the teacher
            base = load_teacher_model(self.cfg, self._task(), **extra)  # --num_labels: head on the source
            student = load_or_build_student(self.cfg, base, self._task())
        freeze_parts(student, self.opts.freeze_encoder, self.opts.freeze_embeds)
        self.vocab_size = len(ctx.tokenizer) if self._task() != "sequence_classification" else None
        self.label2id = getattr(student.config, "label2id", None)
        return student

    def build_data(self, ctx) -> DataBundle:
        task = self._task()
        return build_supervised_data(self.cfg, ctx.tokenizer,
                                     "classification" if task == "sequence_classification" else task, self.label2id)

    def _logits(self, ctx, batch):
        model = ctx.student.module
        inputs = seq2seq_inputs(model, batch) if self._task() == "seq2seq_lm" else model_inputs(batch)
        return aligned_logits(self._task(), ctx.student(**inputs).logits, batch["labels"])

    def compute_loss(self, ctx, batch):
        s, labels = self._logits(ctx, batch)
        return {"ce": hard_cross_entropy(s, labels, self.vocab_size)}

    @torch.no_grad()
    def eval_step(self, ctx, batch):
        s, labels = self._logits(ctx, batch)
        return evaluation_metrics(self._task(), s, None, labels, self.vocab_size, 1.0)

    def card_info(self):
        return {"task": self._task()}
