"""Logit knowledge distillation (Hinton et al. 2015): alpha * T^2 KL(teacher || student) + (1 - alpha) * CE.

Works for sequence classification (one row per example), causal LMs (one row per predicted token, shifted) and
seq2seq LMs (one row per target token). Only real rows count: labels != -100 (padding and prompt tokens).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional

import torch

from ..data.supervised import build_supervised_data
from ..errors import ConfigError
from ..losses.divergences import check_divergence, distill_loss
from ..losses.fused_kd import fused_kd_vector, terms_of
from ..losses.fused_sparse_kd import fused_sparse_kd_vector
from ..losses.sparse_kd import sparse_kd_loss
from ..losses.kd import logit_kd_loss
from ..models import lm_head
from ..models.build import load_or_build_student, load_teacher_model, resolve_task
from ._supervised import (aligned_logits, chunked_evaluation_metrics, evaluation_metrics, model_inputs,
                          seq2seq_inputs)
from .base import DataBundle, Method, register


TP_FUSED = ("kd_loss_impl fused needs the teacher's output layer on every rank; a tensor-parallel teacher "
            "(--teacher_tp) returns gathered logits: use auto or naive")


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
    kd_loss_impl: str = "auto"  # auto (fused for LMs) | fused | naive: fused never materialises full-vocab logits
    divergence: str = "forward_kl"  # forward_kl | reverse_kl | jsd (generalized JSD with beta; LM tasks)
    beta: float = 0.5  # jsd mixture weight: 0 = forward KL, 1 = reverse KL (TRL GKD convention)
    teacher_cache: Optional[str] = None  # folder from python -m kd_engine.teacher_cache: train with no teacher loaded
    teacher_top_k: int = 32  # with --teacher_ranks: teacher tokens served per position (the cache builder's --top_k)
    teacher_tail_samples: int = 8  # with --teacher_ranks: tail tokens sampled per position (as the cache builder's)
    teacher_seed: int = 0  # with --teacher_ranks: seed of the tail samples, with each example's content hash

    def validate(self) -> None:
        if not 0.01 <= self.temperature <= 100:  # logits / T overflow fp32 below, every target is uniform above
            raise ConfigError(f"temperature must be in [0.01, 100]; got {self.temperature}")
        if not 0.0 <= self.alpha <= 1.0:
            raise ConfigError(f"alpha must be in [0, 1]; got {self.alpha}")
        if self.kd_loss_impl not in ("auto", "fused", "naive"):
            raise ConfigError(f"kd_loss_impl must be auto, fused or naive; got {self.kd_loss_impl!r}")
        check_divergence(self.divergence, self.beta)
        if self.teacher_top_k < 1 or self.teacher_tail_samples < 0:
            raise ConfigError(f"teacher_top_k must be >= 1 and teacher_tail_samples >= 0; got {self.teacher_top_k} "
                              f"and {self.teacher_tail_samples}")

    def check_against(self, cfg) -> None:
        """Checks that need the engine config, before anything is written: the cache must match this run."""
        if cfg.teacher_tp > 1 and self.teacher_cache:
            raise ConfigError("--teacher_tp splits a teacher that --teacher_cache replaces: drop one of them (the "
                              "cache builder takes --teacher_tp itself)")
        if cfg.teacher_tp > 1 and self.kd_loss_impl == "fused":
            raise ConfigError(TP_FUSED)
        if cfg.teacher_ranks > 0:
            served_run_check(self, cfg)
        if self.teacher_cache:
            from .. import teacher_cache_store as store

            m = store.read_manifest(self.teacher_cache)
            if self.divergence != "forward_kl":
                raise ConfigError("teacher_cache trains with forward_kl only (top-k + tail bucket)")
            if float(m["temperature"]) != float(self.temperature):
                raise ConfigError(f"teacher_cache {self.teacher_cache} holds log-probs at temperature "
                                  f"{m['temperature']}, this run uses {self.temperature}")
            if cfg.packing or cfg.messages_column:
                raise ConfigError("teacher_cache rows are looked up per example of --text_column/--target_column data: "
                                  "it excludes --packing and --messages_column")
            cached_run_check(self.teacher_cache, cfg, self.task)


@register("kd")
class LogitKD(Method):
    """Hinton logit distillation (temperature, T^2, alpha mix with hard labels)."""

    Options = KDOptions
    lm_loss_key = "lm_loss"
    supports_packing = True
    supports_messages = True
    supports_teacher_tp = True  # naive loss path: the split teacher returns its gathered logits
    supports_teacher_service = True  # --teacher_ranks: the served sparse rows feed the cached-loss path

    def __init__(self, cfg, opts):
        super().__init__(cfg, opts)
        self.task = None
        self.cache = None
        if opts.teacher_cache or cfg.teacher_ranks > 0:
            self.needs_teacher = False  # the cache (or the teacher group) replaces the teacher: nothing loaded here

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
        if self._fused():  # fail before training: both output layers must be usable without their logits
            lm_head.output_layer(student, "student")
            if teacher is not None:
                lm_head.output_layer(teacher, "teacher")
        return student

    def build_data(self, ctx) -> DataBundle:
        task = self._task()
        data_task = "classification" if task == "sequence_classification" else task
        return build_supervised_data(self.cfg, ctx.tokenizer, data_task, self.label2id)

    def _inputs(self, model, batch):
        return seq2seq_inputs(model, batch) if self._task() == "seq2seq_lm" else model_inputs(batch)

    def _fused(self) -> bool:
        lm = self._task() in ("causal_lm", "seq2seq_lm")
        if self.opts.kd_loss_impl == "fused" and not lm:
            raise ConfigError("kd_loss_impl fused is for causal and seq2seq LMs; use naive for classification")
        if self.opts.divergence != "forward_kl" and not lm:
            raise ConfigError("divergence other than forward_kl is for causal and seq2seq LMs")
        if self.cfg.teacher_tp > 1 and self.needs_teacher:  # the fused loss needs the teacher's output layer whole
            if self.opts.kd_loss_impl == "fused":
                raise ConfigError(TP_FUSED)
            return False
        return lm and self.opts.kd_loss_impl != "naive"

    def served_outputs(self):
        """--teacher_ranks: the teacher group's answers (engine/teacher_service.py): forward KL takes sparse rows
        in the offline cache's format (the cached-loss path, requested ahead); another divergence takes the hidden
        states entering the teacher's output layer, which this rank applies (engine/served_teacher.py)."""
        if self.cfg.teacher_ranks <= 0:
            return None
        return "rows" if self.opts.divergence == "forward_kl" else "hidden"

    def compute_loss(self, ctx, batch):
        if self.opts.teacher_cache or self.served_outputs() == "rows":
            return self._cached_loss(ctx, batch)
        if self._fused():
            return self._fused_loss(ctx, batch)
        inputs = self._inputs(ctx.student.module, batch)
        s_logits = ctx.student(**inputs).logits
        t_logits = ctx.teacher_forward(**inputs).logits
        labels = batch.get("labels")
        s, lab = aligned_logits(self._task(), s_logits, labels)
        t, _ = aligned_logits(self._task(), t_logits, labels)
        if self._task() == "sequence_classification":
            return logit_kd_loss(s, t, lab, self.opts.temperature, self.opts.alpha, self.vocab_size)
        o = self.opts
        return distill_loss(s, t, lab, o.divergence, o.beta, o.temperature, o.alpha, self.vocab_size)

    def _fused_loss(self, ctx, batch):
        """Loss from both models' final hidden states, computed inside the student's output layer (ZeRO-3: see
        ``models.lm_head``); the teacher's weight is gathered for the block."""
        o, student = self.opts, ctx.student.module
        inputs = self._inputs(student, batch)
        t_hidden = lm_head.hidden_states(ctx.teacher_forward, ctx.teacher_module, "teacher", **inputs)
        labels = batch["labels"]
        causal = self._task() == "causal_lm"
        lab, t_hidden = (labels[:, 1:], t_hidden[:, :-1]) if causal else (labels, t_hidden)
        t_weight = lm_head.output_layer(ctx.teacher_module, "teacher").weight
        head = lm_head.output_layer(student, "student")

        def loss_in_head(h):
            return fused_kd_vector(h[:, :-1] if causal else h, head.weight, t_hidden, t_weight, lab, o.divergence,
                                   o.beta, o.temperature, o.alpha, self.vocab_size)

        with lm_head.gathered(t_weight), lm_head.head_replaced(student, loss_in_head, "student"):
            vector = ctx.student(**inputs).logits
        return terms_of(vector, o.alpha)

    def _cached_loss(self, ctx, batch):
        """Sparse KL over the cached top-k + tail (bucket, or sampled); rows found by the examples' content hashes.
        Fused (default for LMs): computed inside the student's output layer, chunk by chunk, no full logits."""
        from .. import teacher_cache_store as store

        if self.cache is None:  # served rows come in the cache's own format (engine/teacher_service.py)
            served = self.cfg.teacher_ranks > 0
            self.cache = ctx.served_teacher if served else store.TeacherCache(self.opts.teacher_cache)
        o, student, task = self.opts, ctx.student.module, self._task()
        inputs = self._inputs(student, batch)
        lab = batch["labels"][:, 1:] if task == "causal_lm" else batch["labels"]
        cached = self.cache.lookup(store.batch_keys(batch, task), store.row_targets(lab))
        if not self._fused():
            s, lab = aligned_logits(task, ctx.student(**inputs).logits, batch["labels"])
            return sparse_kd_loss(s, lab, *cached[:3], o.temperature, o.alpha, self.vocab_size, *cached[3:])
        head = lm_head.output_layer(student, "student")

        def loss_in_head(h):
            return fused_sparse_kd_vector(h[:, :-1] if task == "causal_lm" else h, head.weight, lab, *cached,
                                          o.temperature, o.alpha, self.vocab_size)

        with lm_head.head_replaced(student, loss_in_head, "student"):
            vector = ctx.student(**inputs).logits
        return terms_of(vector, o.alpha)

    @torch.no_grad()
    def eval_step(self, ctx, batch):
        if self._fused():
            return self._chunked_eval(ctx, batch)
        inputs = self._inputs(ctx.student.module, batch)
        s_logits = ctx.student(**inputs).logits
        t_logits = ctx.teacher_forward(**inputs).logits if ctx.teacher_module is not None else None
        labels = batch["labels"]
        s, lab = aligned_logits(self._task(), s_logits, labels)
        t = aligned_logits(self._task(), t_logits, labels)[0] if t_logits is not None else None
        return evaluation_metrics(self._task(), s, t, lab, self.vocab_size, self.opts.temperature)

    def _chunked_eval(self, ctx, batch):
        """LMs: the same metrics from both models' hidden states, a chunk of rows at a time (no full logits)."""
        student = ctx.student.module
        inputs = self._inputs(student, batch)
        s_h = lm_head.hidden_states(ctx.student, student, "student", **inputs)
        t_h = t_w = None
        if ctx.teacher_module is not None:  # co-located, or served hidden states (not a cache or served rows)
            t_h = lm_head.hidden_states(ctx.teacher_forward, ctx.teacher_module, "teacher", **inputs)
            t_w = lm_head.output_layer(ctx.teacher_module, "teacher").weight
        s_w = lm_head.output_layer(student, "student").weight
        labels = batch["labels"]
        if self._task() == "causal_lm":
            labels, s_h, t_h = labels[:, 1:], s_h[:, :-1], (t_h[:, :-1] if t_h is not None else None)
        with lm_head.gathered(*(w for w in (s_w, t_w) if w is not None)):
            return chunked_evaluation_metrics(self._task(), s_h, s_w, t_h, t_w, labels, self.vocab_size,
                                              self.opts.temperature)

    def card_info(self):
        o = self.opts
        return {"task": self._task(), "temperature": o.temperature, "alpha": o.alpha, "divergence": o.divergence,
                "beta": o.beta, "kd_loss_impl": "fused" if self._fused() else "naive"}


def cached_run_check(path: str, cfg, task_opt: str) -> None:
    """ConfigError unless the cache at ``path`` was built for this tokenizer, corpus, columns, length and teacher."""
    from .. import teacher_cache_store as store
    from ..models.loading import load_tokenizer

    m = store.read_manifest(path)
    store.check_complete(path)
    if not cfg.train_file or not os.path.isfile(cfg.train_file):
        raise ConfigError("teacher_cache needs --train_file (the file the cache was built from)")
    if cfg.teacher and cfg.teacher != m["teacher"]:
        raise ConfigError(f"teacher_cache {path} was built from teacher {m['teacher']}, not {cfg.teacher}")
    tok = load_tokenizer(cfg.tokenizer or cfg.student.name_or_path or m["tokenizer"], cfg.trust_remote_code)
    run = {"format": store.FORMAT, "tokenizer_sha256": store.tokenizer_sha256(tok), "vocab_size": len(tok),
           "corpus_sha256": store.file_sha256(cfg.train_file), "text_column": cfg.text_column,
           "target_column": cfg.target_column, "max_length": cfg.max_length, "temperature": m["temperature"],
           "task": m["task"] if task_opt == "auto" else task_opt}
    diff = store.mismatch(m, run)
    if diff:
        raise ConfigError(f"teacher_cache {path} was made for another run ({'; '.join(diff)}); build a cache for "
                          f"this tokenizer/corpus/length")


def served_run_check(opts: KDOptions, cfg) -> None:
    """ConfigError unless this kd run can take its teacher's rows from a teacher group (--teacher_ranks)."""
    if opts.teacher_cache:
        raise ConfigError("--teacher_ranks serves a teacher that --teacher_cache replaces: drop one of them")
    if cfg.packing:
        raise ConfigError("--teacher_ranks: a packed row holds several examples, and the service takes one per row "
                          "(tail samples are seeded per example; no position ids are sent): it excludes --packing")
    if not cfg.teacher:
        raise ConfigError("--teacher_ranks needs --teacher (the model the teacher ranks load)")
    task = resolve_task(opts.task, cfg)
    if task not in ("causal_lm", "seq2seq_lm"):
        raise ConfigError(f"--teacher_ranks serves causal and seq2seq LMs; the task here is {task}")
