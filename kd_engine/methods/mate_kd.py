"""MATE-KD (Rashid et al., ACL 2021): masked adversarial text distillation for sequence classifiers.

Three models: the student (the engine's), a masked-LM generator (its own DeepSpeed engine, optimizer and LR
schedule, checkpointed with the student) and the frozen teacher. Every global step is ONE optimizer step of one
model, in cycles of ``generator_steps`` generator steps then ``student_steps`` student steps (10 : 100):

- generator step: mask ``mask_prob`` of the real, non-special tokens, sample replacements with Gumbel-softmax
  straight-through, maximise D(student(x~), teacher(x~)) through the frozen student and teacher;
- student step: same masking and sampling (detached), minimise
  ``w_ce * CE(y, student(x)) + w_adv * D(student(x~), teacher(x~)) + w_kd * D(student(x), teacher(x))``.

Each LR schedule counts only the steps its model takes (the reference's student schedule counts all batches and
never decays fully; we do not copy that). Masks and Gumbel noise come from a generator seeded by (seed, global
step, rank, micro-batch), so a resumed run draws exactly what the uninterrupted one drew. D is KL by default; the
reference code's soft cross-entropy (it adds the teacher's entropy, which the generator then also maximises) is
``--divergence ce``; regression teachers (one output) use MSE. Equations and pitfalls: methods.md §4.
"""
from __future__ import annotations

import copy
import inspect
import logging
import os
from dataclasses import dataclass, field
from typing import Optional

import torch

from ..data.supervised import build_supervised_data
from ..errors import ConfigError, KDError
from ..losses.mate_kd import (DIVERGENCES, changed_fraction, divergence, gumbel_softmax_st, mask_positions,
                              perturbed_embeddings, position_ids_for, substitute, supervised_loss)
from ..models.build import load_or_build_student, load_teacher_model
from .base import DataBundle, Method, register
from ._supervised import evaluation_metrics

logger = logging.getLogger(__name__)


@dataclass
class GeneratorOptions:
    name_or_path: Optional[str] = None  # an AutoModelForMaskedLM sharing the teacher's vocabulary (--generator X)
    layers: Optional[int] = None  # or: built from the teacher's first N layers + a tied masked-LM head


@dataclass
class MateKDOptions:
    generator: GeneratorOptions = field(default_factory=GeneratorOptions)
    generator_lr: float = 5e-7  # the generator's AdamW learning rate (linear decay over its own steps)
    generator_max_grad_norm: float = 5.0  # generator gradient clipping norm
    generator_warmup_steps: int = 0  # masked-LM warm-up steps of the generator before distillation
    generator_warmup_lr: float = 1e-4  # learning rate of the generator's MLM warm-up
    generator_corpus: Optional[str] = None  # raw text (file, dir, glob) for the warm-up, via the corpus pipeline
    mask_prob: float = 0.3  # probability that a real, non-special token is masked (all masked -> mask token)
    gumbel_tau: float = 1.0  # Gumbel-softmax temperature of the generator's samples
    temperature: float = 1.0  # of D (KL / soft CE), times T^2
    divergence: str = "auto"  # auto (kl; mse for a one-output regression teacher) | kl | ce | mse
    generator_steps: int = 10  # per cycle, first
    student_steps: int = 100  # per cycle, after the generator steps
    w_ce: float = 1.0 / 3.0  # weight of the hard-label CE term
    w_adv: float = 1.0 / 3.0  # weight of the divergence on adversarial text
    w_kd: float = 1.0 / 3.0  # weight of the divergence on the original text

    def validate(self) -> None:
        if not 0.0 < self.mask_prob < 1.0:
            raise ConfigError(f"mask_prob must be in (0, 1); got {self.mask_prob}")
        if self.student_steps < 1:
            raise ConfigError(f"student_steps must be >= 1 (a schedule without student steps trains nothing); "
                              f"got {self.student_steps}")
        if self.generator_steps < 0:
            raise ConfigError(f"generator_steps must be >= 0; got {self.generator_steps}")
        for key in ("gumbel_tau", "temperature", "generator_max_grad_norm"):
            if getattr(self, key) <= 0:
                raise ConfigError(f"{key} must be > 0; got {getattr(self, key)}")
        for key in ("generator_lr", "generator_warmup_lr", "w_ce", "w_adv", "w_kd"):
            if getattr(self, key) < 0:
                raise ConfigError(f"{key} must be >= 0; got {getattr(self, key)}")
        if self.w_ce + self.w_adv + self.w_kd == 0:
            raise ConfigError("w_ce, w_adv and w_kd are all 0: the student would learn nothing")
        if self.divergence not in ("auto",) + DIVERGENCES:
            raise ConfigError(f"divergence must be auto, {', '.join(DIVERGENCES)}; got '{self.divergence}'")
        if self.generator.layers is not None and self.generator.layers < 1:
            raise ConfigError(f"generator.layers must be >= 1; got {self.generator.layers}")
        if self.generator_warmup_steps < 0:
            raise ConfigError(f"generator_warmup_steps must be >= 0; got {self.generator_warmup_steps}")
        if self.generator_warmup_steps > 0 and not self.generator_corpus:
            raise ConfigError("generator_warmup_steps > 0 needs --generator_corpus FILE|DIR|GLOB (raw text)")


def schedule_counts(total_steps: int, n_gen: int, n_student: int) -> tuple[int, int]:
    """(generator steps, student steps) among the first ``total_steps`` global steps."""
    cycle = n_gen + n_student
    full, rem = divmod(total_steps, cycle)
    return full * n_gen + min(rem, n_gen), full * n_student + max(rem - n_gen, 0)


def _accepts(model: torch.nn.Module, arg: str) -> bool:
    return arg in inspect.signature(model.forward).parameters


def _embedding_matrix(module: torch.nn.Module) -> torch.Tensor:
    """The word-embedding matrix as a constant (gathered from its ZeRO-3 partitions when partitioned)."""
    w = module.get_input_embeddings().weight
    if hasattr(w, "ds_id"):
        import deepspeed

        with deepspeed.zero.GatheredParameters([w]):
            return w.detach().clone()
    return w.detach()


@register("mate_kd")
class MateKD(Method):
    """MATE-KD: a masked-LM generator writes adversarial text that the student must match the teacher on."""

    Options = MateKDOptions

    def __init__(self, cfg, opts):
        super().__init__(cfg, opts)
        self.generator_module = None
        self.preflight()

    # ---- checks before anything is written ---------------------------------------------------------------
    def preflight(self) -> None:
        from ..models.generator import check_generator_source, embedding_rows
        from ..models.loading import load_config, load_tokenizer, tokenizer_fingerprint

        o, cfg = self.opts, self.cfg
        if (o.generator.name_or_path is None) == (o.generator.layers is None):
            raise ConfigError("pass exactly one of --generator PATH_OR_ID (a masked LM) or --generator.layers N "
                              "(built from the teacher's first N layers)")
        if not cfg.teacher:
            raise KDError("mate_kd needs a teacher: pass --teacher PATH_OR_ID (a sequence classifier)")
        if o.w_ce > 0 and not cfg.label_column:
            raise KDError(f"w_ce is {o.w_ce:g} but the task has no labels: pass --label_column, or --w_ce 0")
        if cfg.max_steps > 0 and schedule_counts(cfg.max_steps, o.generator_steps, o.student_steps)[1] == 0:
            raise KDError(f"max_steps {cfg.max_steps} holds no student step (each cycle starts with "
                          f"{o.generator_steps} generator steps)")
        tok = load_tokenizer(cfg.tokenizer or cfg.student.name_or_path or cfg.teacher, cfg.trust_remote_code)
        if tok.mask_token_id is None:
            raise KDError(f"the tokenizer of {cfg.tokenizer or cfg.student.name_or_path or cfg.teacher} has no mask "
                          "token: MATE-KD replaces the masked tokens with it")
        n = len(tok)
        sources = [("teacher", cfg.teacher, load_config(cfg.teacher, cfg.trust_remote_code))]
        if cfg.student.name_or_path:
            sources.append(("student", cfg.student.name_or_path, load_config(cfg.student.name_or_path,
                                                                             cfg.trust_remote_code)))
        if o.generator.name_or_path:
            sources.append(("generator", o.generator.name_or_path,
                            check_generator_source(o.generator.name_or_path, cfg.trust_remote_code)))
        for which, src, config in sources:
            rows = embedding_rows(config)
            if rows is not None and rows < n:
                raise KDError(f"vocabularies differ: the {which} ({src}) has {rows} embedding rows but the "
                              f"tokenizer has {n} tokens")
            try:
                own = load_tokenizer(src, cfg.trust_remote_code)
            except (KDError, OSError, ValueError):
                own = None  # a folder without a tokenizer: compare embedding rows with the teacher's
                if rows is not None and rows != embedding_rows(sources[0][2]):
                    raise KDError(f"vocabularies differ: the {which} ({src}) has {rows} embedding rows, the "
                                  f"teacher {embedding_rows(sources[0][2])}") from None
            if own is not None and tokenizer_fingerprint(own) != tokenizer_fingerprint(tok):
                raise KDError(f"vocabularies differ: the {which}'s tokenizer ({src}, {len(own)} tokens) is not the "
                              f"run's ({n} tokens); MATE-KD needs one vocabulary for teacher, student and generator")
        if o.generator_warmup_steps > 0:
            from ..data.corpus import resolve_files

            resolve_files(o.generator_corpus)  # KDError when nothing matches

    # ---- building ---------------------------------------------------------------------------------------
    def load_teacher(self, ctx):
        teacher = load_teacher_model(self.cfg, "sequence_classification")
        if teacher.get_input_embeddings() is None:
            raise KDError("the teacher exposes no input embeddings: MATE-KD feeds it perturbed embeddings")
        return teacher

    def load_student(self, ctx, teacher):
        extra = {}
        if self.cfg.student.name_or_path:  # a bare encoder / MLM checkpoint gets a fresh head with the teacher's labels
            from ..models.build import detect_task
            from ..models.loading import load_config

            if detect_task(load_config(self.cfg.student.name_or_path, self.cfg.trust_remote_code)) \
                    != "sequence_classification":
                extra = {"num_labels": teacher.config.num_labels, "id2label": dict(teacher.config.id2label),
                         "label2id": dict(teacher.config.label2id)}
        student = load_or_build_student(self.cfg, teacher, "sequence_classification", **extra)
        if student.config.num_labels != teacher.config.num_labels:
            raise KDError(f"teacher has {teacher.config.num_labels} outputs, student {student.config.num_labels}")
        self.regression = teacher.config.num_labels == 1
        self.kind = self.opts.divergence if self.opts.divergence != "auto" else ("mse" if self.regression else "kl")
        self.label2id = getattr(teacher.config, "label2id", None)
        self.generator_module = self._build_generator(ctx, teacher)
        return student

    def _build_generator(self, ctx, teacher):
        from ..models.generator import build_from_teacher, load_generator, warmup_mlm
        from ..models.loading import cache_root

        o = self.opts
        if o.generator.name_or_path:
            gen = load_generator(o.generator.name_or_path, self.cfg.trust_remote_code)
            self.generator_source = o.generator.name_or_path
        else:
            gen = build_from_teacher(teacher, o.generator.layers)
            self.generator_source = f"teacher's first {o.generator.layers} layers + tied masked-LM head"
        if gen.get_input_embeddings().weight.shape[0] < len(ctx.tokenizer):
            raise KDError(f"the generator has {gen.get_input_embeddings().weight.shape[0]} embedding rows, the "
                          f"tokenizer {len(ctx.tokenizer)} tokens")
        resuming = os.path.isdir(os.path.join(self.cfg.output_dir, "checkpoints")) and self.cfg.resume
        if o.generator_warmup_steps > 0 and not resuming:  # a resumed run loads the generator's weights
            warmup_mlm(gen.to(ctx.device), ctx.tokenizer, o.generator_corpus, o.generator_warmup_steps,
                       lr=o.generator_warmup_lr, batch_size=self.cfg.per_device_train_batch_size,
                       block_size=self.cfg.max_length, mask_prob=0.15, seed=self.cfg.seed,
                       cache_dir=os.path.join(cache_root(), "corpus"), rank=ctx.rank, world_size=ctx.world_size,
                       progress=ctx.is_main)
            self.generator_source += f", masked-LM warm-up {o.generator_warmup_steps} steps on {o.generator_corpus}"
        return gen

    def build_data(self, ctx) -> DataBundle:
        if self.regression:  # one output (STS-B style): float scores, MSE
            from ..data.regression import build_regression_data

            return build_regression_data(self.cfg, ctx.tokenizer)
        return build_supervised_data(self.cfg, ctx.tokenizer, "classification", self.label2id)

    def setup(self, ctx) -> None:
        o = self.opts
        n_gen, n_student = schedule_counts(ctx.total_steps, o.generator_steps, o.student_steps)
        if n_student == 0:
            raise KDError(f"{ctx.total_steps} steps hold no student step (each cycle starts with "
                          f"{o.generator_steps} generator steps)")
        self.n_gen, self.n_student = n_gen, n_student
        self._reschedule_student(ctx, n_student)
        opt = copy.deepcopy(ctx.student.config["optimizer"])
        opt.setdefault("params", {})["lr"] = o.generator_lr
        from transformers import get_scheduler

        self.gen = ctx.add_engine(
            "generator", self.generator_module,
            ds_overrides={"optimizer": opt, "gradient_clipping": o.generator_max_grad_norm},
            lr_scheduler=lambda optimizer: get_scheduler("linear", optimizer, num_warmup_steps=0,
                                                         num_training_steps=max(n_gen, 1)))
        self.special = torch.tensor(sorted(set(ctx.tokenizer.all_special_ids)), dtype=torch.long,
                                    device=ctx.device)
        self.mask_id = ctx.tokenizer.mask_token_id
        self.vocab = len(ctx.tokenizer)
        if ctx.is_main:
            logger.info("mate_kd: generator = %s; %d generator + %d student steps (cycles of %d:%d); D = %s",
                        self.generator_source, n_gen, n_student, o.generator_steps, o.student_steps, self.kind)

    def _reschedule_student(self, ctx, n_student: int) -> None:
        """The student's LR schedule over the student steps only (the engine built it over all global steps)."""
        from ..ds_config import client_lr_scheduler

        eng = ctx.student
        sched = ctx.student.config.get("scheduler")
        if sched is None:
            eng.lr_scheduler = client_lr_scheduler(ctx.student.config, ctx.cfg, n_student)(eng.basic_optimizer)
            return
        from deepspeed.runtime import lr_schedules

        params = dict(sched.get("params", {}))
        if "total_num_steps" in params:
            params["total_num_steps"] = n_student
            params["warmup_num_steps"] = min(params.get("warmup_num_steps", 0), max(n_student - 1, 0))
            eng.lr_scheduler = getattr(lr_schedules, sched["type"])(eng.basic_optimizer, **params)

    # ---- one step -----------------------------------------------------------------------------------------
    def is_generator_step(self, step: int) -> bool:
        o = self.opts
        return step % (o.generator_steps + o.student_steps) < o.generator_steps

    def _rng(self, ctx, micro: int) -> torch.Generator:
        seed = (self.cfg.seed * 1_000_003 + ctx.global_step * 7919 + ctx.rank * 131 + micro) % (2 ** 62)
        return torch.Generator(device=ctx.device).manual_seed(seed)

    def _sample(self, batch: dict, rng: torch.Generator, with_grad: bool):
        """Mask, run the generator, Gumbel-sample the masked positions. Returns (mask, y [K, V], x~ ids)."""
        ids, am = batch["input_ids"], batch.get("attention_mask")
        m = mask_positions(ids, am, self.special, self.opts.mask_prob, rng)
        inputs = {"input_ids": ids.masked_fill(m, self.mask_id), "attention_mask": am}
        if "token_type_ids" in batch and _accepts(self.gen.module, "token_type_ids"):
            inputs["token_type_ids"] = batch["token_type_ids"]
        with torch.set_grad_enabled(with_grad):
            y = gumbel_softmax_st(self._generator_logits(inputs, m), self.opts.gumbel_tau, self.vocab, rng)
        return m, y, substitute(ids, m, y.argmax(-1))

    def _generator_logits(self, inputs: dict, m: torch.Tensor) -> torch.Tensor:
        from ..models.generator import masked_lm_logits

        return masked_lm_logits(self.gen.module, m, **inputs)

    @staticmethod
    def _extra(model, batch: dict) -> dict:
        out = {"attention_mask": batch.get("attention_mask")}
        if "token_type_ids" in batch and _accepts(model, "token_type_ids"):
            out["token_type_ids"] = batch["token_type_ids"]
        return out

    def _perturbed_logits(self, model, call, batch, m, y, x_sub):
        """Logits of ``model`` (run through ``call``) on the perturbed text, differentiable w.r.t. ``y``."""
        base = model.get_input_embeddings()(x_sub)
        emb = perturbed_embeddings(base, m, y, _embedding_matrix(model))
        inputs = dict(self._extra(model, batch), inputs_embeds=emb)
        if _accepts(model, "position_ids"):
            pad = getattr(model.get_input_embeddings(), "padding_idx", None)
            inputs["position_ids"] = position_ids_for(model.config.model_type, x_sub, pad)
        return call(**inputs).logits

    def generator_step(self, ctx) -> dict[str, float]:
        """Maximise D(student(x~), teacher(x~)) over the generator, through the frozen student and teacher.

        The teacher runs as its module (``teacher_hooks(grad=True)``), not through its engine: a ZeRO-3 teacher
        engine (no optimizer) hooks its outputs and refuses a backward it does not run itself, while the module
        keeps ZeRO-3's gather hooks. Its parameters are frozen: only activations carry gradient, to the sample."""
        micro = iter(range(ctx.cfg.gradient_accumulation_steps))

        def compute():
            batch = ctx.next_batch()
            m, y, x_sub = self._sample(batch, self._rng(ctx, next(micro)), with_grad=True)
            s = self._perturbed_logits(student, student, batch, m, y, x_sub)
            with ctx.teacher_hooks(grad=True) as teacher:
                t = self._perturbed_logits(teacher, teacher, batch, m, y, x_sub)
            d = divergence(s, t, self.kind, self.opts.temperature)
            return {"neg_D": -d}, {"generator_D": d.detach(), "changed_fraction": changed_fraction(
                batch["input_ids"], x_sub, m)}

        with ctx.frozen(ctx.student) as student:
            out = ctx.accumulate(compute, engine=self.gen)
        out.pop("neg_D", None)
        out.pop("loss", None)
        return out

    def student_step(self, ctx) -> dict[str, float]:
        o = self.opts
        micro = iter(range(ctx.cfg.gradient_accumulation_steps))

        def compute():
            batch = ctx.next_batch()
            m, _, x_sub = self._sample(batch, self._rng(ctx, next(micro)), with_grad=False)
            extra = self._extra(ctx.student.module, batch)
            both = {"input_ids": torch.cat([batch["input_ids"], x_sub])}
            both.update({k: torch.cat([v, v]) for k, v in extra.items() if v is not None})
            s_orig, s_adv = ctx.student(**both).logits.chunk(2)
            t_orig, t_adv = ctx.teacher_forward(**both).logits.chunk(2)
            terms = {}
            if o.w_ce > 0:
                terms["ce"] = o.w_ce * supervised_loss(s_orig, batch["labels"])
            if o.w_adv > 0:
                terms["adv"] = o.w_adv * divergence(s_adv, t_adv.detach(), self.kind, o.temperature)
            if o.w_kd > 0:
                terms["kd"] = o.w_kd * divergence(s_orig, t_orig.detach(), self.kind, o.temperature)
            return terms, {"changed_fraction": changed_fraction(batch["input_ids"], x_sub, m)}

        return ctx.accumulate(compute)

    def train_step(self, ctx) -> dict[str, float]:
        gen_step = self.is_generator_step(ctx.global_step)
        out = self.generator_step(ctx) if gen_step else self.student_step(ctx)
        # per step, at the 0-based index of the step: its type, both learning rates, its own terms
        ctx.log_scalars({"step_type_generator": float(gen_step), "generator_lr": self._lr(self.gen),
                         "student_lr": self._lr(ctx.student),
                         **{f"{'generator' if gen_step else 'student'}_{k}": v for k, v in out.items()}}, prefix="mate")
        return out

    @staticmethod
    def _lr(engine) -> float:
        lr = engine.get_lr()
        return float(lr[0]) if lr else 0.0

    # ---- evaluation ---------------------------------------------------------------------------------------
    @torch.no_grad()
    def eval_step(self, ctx, batch):
        inputs = dict(self._extra(ctx.student.module, batch), input_ids=batch["input_ids"])
        s = ctx.student(**inputs).logits
        t = ctx.teacher_forward(**inputs).logits
        if self.regression:
            out = {"teacher_mse": (float(divergence(s, t, "mse")) * s.shape[0], float(s.shape[0]))}
            if "labels" in batch:
                out["mse"] = (float(supervised_loss(s, batch["labels"])) * s.shape[0], float(s.shape[0]))
            return out
        return evaluation_metrics("sequence_classification", s, t, batch["labels"], None, self.opts.temperature)

    def card_info(self):
        o = self.opts
        return {"task": "sequence_classification", "generator": getattr(self, "generator_source", ""),
                "schedule": f"{o.generator_steps} generator : {o.student_steps} student steps",
                "divergence": getattr(self, "kind", o.divergence), "mask_prob": o.mask_prob,
                "weights (ce, adv, kd)": f"{o.w_ce:.3g}, {o.w_adv:.3g}, {o.w_kd:.3g}"}
