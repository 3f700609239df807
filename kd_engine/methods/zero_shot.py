"""Zero-shot classifier distillation (the Hugging Face transformers example
examples/research_projects/zero-shot-distillation): a zero-shot teacher labels unlabeled text once, a small K-way
classifier learns its soft labels.

    python launch/train.py --method zero_shot --data_file unlabeled.txt --class_names_file classes.txt \\
        --teacher <NLI model | bi-encoder> --hypothesis_template "This text is about {}." \\
        --student.layers 2 --output_dir out/

1. Labeling (at the end of ``load_student``, which every rank runs at the same time): the teacher
   (``NLITeacher`` for a model with an entailment label, ``EmbeddingTeacher`` for a plain encoder;
   ``--teacher_type`` forces one) labels the corpus with ``label_corpus``: sharded over the ranks,
   cached under ``--label_cache_dir`` (one sub-folder per labeling key; default: the kd_engine cache), resumed
   after an interruption, reused by later runs with other students. The teacher is then freed: training needs
   only the labels (``needs_teacher = False``: the engine builds no teacher engine).
2. Student: ``--student PATH`` (a new K-way head is put on it), or a student built from the teacher's encoder
   (``--student.layers N``, teacher layers copied), with ``id2label`` / ``label2id`` = the class names, so the
   exported folder works as ``pipeline("text-classification", model=out/final, top_k=None)``.
3. Loss: soft cross-entropy on the teacher's distribution (``--zs_loss soft_ce``, the reference) or
   ``kl`` (same gradient, reads 0 at a perfect match). Multi-label: binary cross-entropy on each P(entail)
   (the reference applies the softmax cross-entropy to unnormalised targets there); the student is exported
   with ``problem_type = multi_label_classification`` (sigmoid scores in the pipeline).
4. Evaluation: agreement with the teacher (argmax; multi-label: per (text, class) decision at 0.5, plus the share
   of texts whose K decisions all agree), and top-1 accuracy when ``--eval_file`` has a ``--label_column``
   (labels = class names, indices, or names listed in ``--eval_label_names_file`` in class order, e.g. AG News'
   classes.txt). Without an eval file: ``--eval_split`` of the corpus (with gold labels when the corpus has the
   ``--label_column``; ``--split_seed`` keeps one dev split across seeds), else the first 1000 training texts
   (the reference's "agreement on the training set").

Better teachers, all optional (``benchmarks/zero_shot_quality.py`` measures each on an AG News dev split):

- prompts: ``--hypothesis_templates_file`` (several templates) and ``--class_descriptions_file`` (several
  descriptions per class); the teacher scores every (template, description) and averages per class (NLI: the
  logits; embedding teacher: the class centroid of the prompt embeddings).
- ``--prior_calibration uniform`` / ``--class_prior``: per-class weights fitted on the unlabeled training texts
  so that their mean soft label is the prior (``kd_engine.teachers.calibration``); the same weights relabel the
  evaluation rows.
- ``--extra_text_files``: more unlabeled training text.
- self-training: ``--teacher out/final`` (a student this method exported) labels the corpus again
  (``ClassifierTeacher``); ``--student out/final`` continues from it.
"""
from __future__ import annotations

import gc
import logging
import os
import time
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F

from ..errors import ConfigError, KDError
from ..paths import cache_dir
from ..losses.kd import soft_cross_entropy_rows
from ..teachers.calibration import apply_weights, prior_weights, target_prior
from ..teachers.classifier import ClassifierTeacher, classifier_columns
from ..teachers.labeling import all_gather_objects, default_cache_dir, label_corpus, labeling_key
from ..teachers.zero_shot import (DEFAULT_TEMPLATE, EMBEDDING_TEMPERATURE, EmbeddingTeacher, NLITeacher,
                                  check_template, load_class_names, resolve_nli_ids)
from ..teachers.zero_shot_inputs import load_descriptions, load_templates
from ._zero_shot_data import zero_shot_rows
from .base import DataBundle, Method, register

logger = logging.getLogger(__name__)


@dataclass
class ZeroShotOptions:
    data_file: Optional[str] = None  # unlabeled texts: .txt one per line, or a table read with --text_column
    class_names_file: Optional[str] = None  # one class name per line
    hypothesis_template: str = DEFAULT_TEMPLATE  # NLI hypothesis with {} for the class name
    multi_label: bool = False  # each class scored on its own (sigmoid)
    temperature: Optional[float] = None  # teacher sharpening; default 1.0 (NLI), 0.05 (embedding teacher)
    teacher_type: str = "auto"  # auto | nli | embedding | classifier (a distilled student: self-training)
    teacher_batch_size: int = 32  # (text, class) pairs per NLI forward; texts per embedding forward
    teacher_compile: bool = False  # torch.compile the teacher for labeling (frozen weights): ~15 s once, then faster
    label_cache_dir: Optional[str] = None  # root of the label caches (one sub-folder per labeling key);
    # default <kd_engine cache>/zero_shot
    zs_loss: str = "soft_ce"  # soft_ce | kl
    eval_label_names_file: Optional[str] = None  # eval labels in class order (e.g. AG News classes.txt)
    data_columns: Optional[str] = None  # column names of header-less csv/tsv data and eval files ("text,label")
    hypothesis_templates_file: Optional[str] = None  # several templates (one per line) instead of the one
    class_descriptions_file: Optional[str] = None  # lines "class name<TAB>description": more prompts per class
    prior_calibration: str = "none"  # none | uniform: re-weight classes so the corpus' mean label is the prior
    class_prior: Optional[list[float]] = None  # calibrate to this class prior (class order) instead of uniform
    extra_text_files: Optional[list[str]] = None  # more unlabeled training text (.txt lines or --text_column)
    student_base: Optional[str] = None  # encoder the --student.layers student is built from (default: the teacher)

    def validate(self) -> None:
        check_template(self.hypothesis_template)
        if self.teacher_type not in ("auto", "nli", "embedding", "classifier"):
            raise ConfigError(f"teacher_type must be auto, nli, embedding or classifier; got {self.teacher_type!r}")
        if self.prior_calibration not in ("none", "uniform"):
            raise ConfigError(f"prior_calibration must be none or uniform; got {self.prior_calibration!r}")
        if self.zs_loss not in ("soft_ce", "kl"):
            raise ConfigError(f"zs_loss must be soft_ce or kl; got {self.zs_loss!r}")
        if self.temperature is not None and not self.temperature > 0:
            raise ConfigError(f"temperature must be > 0; got {self.temperature}")
        if self.teacher_batch_size < 1:
            raise ConfigError(f"teacher_batch_size must be >= 1; got {self.teacher_batch_size}")
        # input files, before any heavy import (templates and class names parsed: a typo fails in a second)
        for what, path in (("class names file", self.class_names_file), ("data file", self.data_file),
                           ("eval label names file", self.eval_label_names_file),
                           *(("extra text file", f) for f in self.extra_text_files or ())):
            if path and not os.path.exists(path):
                raise KDError(f"{what} not found: {path}")
        if self.hypothesis_templates_file:
            load_templates(self.hypothesis_templates_file)
        if self.class_descriptions_file:
            if not self.class_names_file:
                raise KDError("--class_descriptions_file needs --class_names_file")
            load_descriptions(self.class_descriptions_file, load_class_names(self.class_names_file))
        if self.class_prior is not None and self.class_names_file:
            target_prior(len(load_class_names(self.class_names_file)), self.class_prior)


def soft_label_loss(logits: torch.Tensor, targets: torch.Tensor, kind: str, multi_label: bool) -> torch.Tensor:
    """Student loss against teacher probabilities (fp32). Single-label: soft CE or KL(p || q); multi-label: BCE."""
    logits, targets = logits.float(), targets.float()
    if multi_label:
        return F.binary_cross_entropy_with_logits(logits, targets)
    ce = soft_cross_entropy_rows(logits, targets)
    if kind == "kl":
        ent = -torch.where(targets > 0, targets * targets.clamp_min(1e-30).log(), torch.zeros_like(targets))
        return ce - ent.sum(-1).mean()
    return ce


class _Rows(torch.utils.data.Dataset):
    def __init__(self, columns: dict):
        self.columns = columns
        self.n = len(next(iter(columns.values())))

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict:
        return {k: v[i] for k, v in self.columns.items()}


@register("zero_shot")
class ZeroShot(Method):
    """Zero-shot teacher labels -> K-way student classifier."""

    Options = ZeroShotOptions
    needs_teacher = False  # the teacher labels the corpus in build_data and is freed before training
    requires_same_vocab = False

    def __init__(self, cfg, opts):
        super().__init__(cfg, opts)
        self.class_names: list[str] = []
        self._teacher = None  # (kind, model, tokenizer) while labeling
        self._prepared: Optional[dict] = None  # texts and their labels, from _prepare_labels
        self.info: dict = {}

    # ---- teacher ------------------------------------------------------------------------------------------
    def _classes(self) -> list[str]:
        if not self.class_names:
            if not self.opts.class_names_file:
                raise KDError("zero_shot needs --class_names_file (one class name per line)")
            self.class_names = load_class_names(self.opts.class_names_file)
        return self.class_names

    def _teacher_kind(self, config) -> str:
        if self.opts.teacher_type != "auto":
            return self.opts.teacher_type
        archs = getattr(config, "architectures", None) or []
        if any(a.endswith("ForSequenceClassification") for a in archs) and \
                classifier_columns(config, self._classes()) is not None:
            return "classifier"  # a K-way classifier over these classes (a distilled student): self-training
        try:
            resolve_nli_ids(config)
            return "nli"
        except KDError:
            if any(a.endswith("ForSequenceClassification") for a in archs):
                raise
            return "embedding"

    def _load_teacher(self, ctx):
        if self._teacher is None:
            from ..models.loading import load_config, load_model, load_tokenizer

            if not self.cfg.teacher:
                raise KDError("zero_shot needs --teacher (an NLI model or a sentence encoder; path or hub id)")
            if self.opts.teacher_compile:
                from ..models.compiled import check_compile_toolchain

                check_compile_toolchain(torch.device(ctx.device))  # before the model is read
            config = load_config(self.cfg.teacher, trust_remote_code=self.cfg.trust_remote_code)
            kind = self._teacher_kind(config)
            task = "encoder" if kind == "embedding" else "sequence_classification"
            dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(self.cfg.teacher_dtype, torch.float32)
            model = load_model(self.cfg.teacher, task, dtype=dtype, trust_remote_code=self.cfg.trust_remote_code)
            model.to(ctx.device).eval().requires_grad_(False)
            if self.opts.teacher_compile:
                from ..models.compiled import CompiledInference

                model = CompiledInference(model)
            tok = load_tokenizer(self.cfg.teacher, trust_remote_code=self.cfg.trust_remote_code)
            self._teacher = (kind, model, tok)
        return self._teacher

    def _zero_shot_teacher(self, ctx):
        kind, model, tok = self._load_teacher(ctx)
        o = self.opts
        if kind == "classifier":
            if o.multi_label:
                raise KDError("--multi_label needs an NLI teacher (a classifier teacher gives one distribution)")
            return ClassifierTeacher(model, tok, self._classes(), temperature=o.temperature or 1.0,
                                     name=self.cfg.teacher)
        templates, descriptions = self._prompts()
        if kind == "nli":
            return NLITeacher(model, tok, templates, self._classes(), multi_label=o.multi_label,
                              temperature=o.temperature or 1.0, name=self.cfg.teacher, descriptions=descriptions)
        if o.multi_label:
            raise KDError("--multi_label needs an NLI teacher (the embedding teacher gives one distribution)")
        return EmbeddingTeacher(model, tok, templates, self._classes(), temperature=o.temperature or
                                EMBEDDING_TEMPERATURE, name=self.cfg.teacher, descriptions=descriptions)

    def _prompts(self) -> tuple[list[str], Optional[dict]]:
        o = self.opts
        templates = load_templates(o.hypothesis_templates_file) if o.hypothesis_templates_file \
            else [o.hypothesis_template]
        desc = load_descriptions(o.class_descriptions_file, self._classes()) if o.class_descriptions_file else None
        return templates, desc

    def _label(self, ctx, teacher, texts: list[str], what: str) -> torch.Tensor:
        root = self.opts.label_cache_dir
        if root is None:
            root = cache_dir("zero_shot")
        cache = default_cache_dir(root, labeling_key(teacher, texts))  # one folder per key; key checked inside
        t0, calls0 = time.perf_counter(), teacher.calls
        labels = label_corpus(teacher, texts, batch_size=self.opts.teacher_batch_size, cache_dir=cache,
                              rank=ctx.rank, world_size=ctx.world_size,
                              gather=all_gather_objects if ctx.world_size > 1 else None)
        secs = time.perf_counter() - t0
        self.info[f"{what}_label_cache"] = cache
        self.info[f"{what}_labeling_seconds"] = round(secs, 2)
        self.info[f"{what}_teacher_calls"] = teacher.calls - calls0  # 0: every label came from the cache
        if ctx.is_main:
            logger.info("zero-shot labels for %d %s texts in %.1f s (teacher calls: %d; cache %s)", len(texts),
                        what, secs, teacher.calls - calls0, cache)
        return labels

    # ---- student ------------------------------------------------------------------------------------------
    def load_student(self, ctx, teacher):
        student = self._build_student(ctx)
        # Labeling is collective (sharded over the ranks, then gathered): every rank runs load_student at the same
        # point of the setup, so the labels are made here and build_data only tokenizes them.
        self._prepared = self._prepare_labels(ctx)
        return student

    def _build_student(self, ctx):
        from transformers import AutoModelForSequenceClassification

        names = self._classes()
        head = dict(num_labels=len(names), id2label=dict(enumerate(names)),
                    label2id={n: i for i, n in enumerate(names)},
                    problem_type="multi_label_classification" if self.opts.multi_label
                    else "single_label_classification")
        s = self.cfg.student
        if s.name_or_path:
            from ..models.loading import load_model

            return load_model(s.name_or_path, "sequence_classification", ignore_mismatched_sizes=True,
                              trust_remote_code=self.cfg.trust_remote_code, **head)
        if s.layers is None:
            raise KDError("no student: pass --student PATH_OR_HUB_ID or --student.layers N (built from the teacher)")
        from ..models.student import create_student

        if self.opts.student_base:  # e.g. a fresh student for a self-training round, not the round-1 student
            from ..models.loading import load_model

            source = load_model(self.opts.student_base, "encoder", trust_remote_code=self.cfg.trust_remote_code)
        else:
            source = self._load_teacher(ctx)[1].base_model
        base = create_student(source, layers=s.layers, hidden=s.hidden, heads=s.heads,
                              intermediate=s.intermediate, init=s.init)
        config = base.config
        for k, v in head.items():
            setattr(config, k, v)
        student = AutoModelForSequenceClassification.from_config(config)
        result = student.base_model.load_state_dict(base.state_dict(), strict=False)
        if result.unexpected_keys or any(not k.startswith("pooler") for k in result.missing_keys):
            raise KDError(f"cannot put the teacher's encoder under a classification head: missing "
                          f"{result.missing_keys[:5]}, unexpected {result.unexpected_keys[:5]}")
        return student.float()

    def load_tokenizer(self, ctx):
        from ..models.loading import load_tokenizer

        c = self.cfg
        src = c.tokenizer or c.student.name_or_path or self.opts.student_base or c.teacher
        return load_tokenizer(src, trust_remote_code=c.trust_remote_code)

    # ---- data ---------------------------------------------------------------------------------------------
    def _rows(self, ctx, texts: list[str], soft: torch.Tensor, labels: Optional[list[int]] = None) -> _Rows:
        enc = ctx.tokenizer(texts, truncation=True, max_length=self.cfg.max_length)
        cols = {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"],
                "soft_labels": soft.tolist()}
        if "token_type_ids" in enc:
            cols["token_type_ids"] = enc["token_type_ids"]
        if labels is not None:
            cols["labels"] = labels
        return _Rows(cols)

    def _prepare_labels(self, ctx) -> dict:
        """Read the texts and label them (collective over the ranks: every rank must call it at the same time)."""
        d = zero_shot_rows(self.cfg, self.opts, self._classes())
        texts, eval_texts = d["texts"], d["eval_texts"]
        teacher = self._zero_shot_teacher(ctx)
        soft = self._label(ctx, teacher, texts, "train")
        eval_soft = self._label(ctx, teacher, eval_texts, "eval") if eval_texts is not None else None
        self.info.update(train_texts=len(texts), blank_lines_skipped=d["blank"], teacher_type=teacher.kind,
                         teacher_temperature=teacher.temperature, hypotheses_per_class=len(
                             getattr(teacher, "hypotheses", self.class_names)) // len(self.class_names))
        if self.opts.extra_text_files:
            self.info.update(extra_texts=d["extra_texts"], extra_dropped_as_eval=d["extra_dropped_as_eval"])
        if eval_soft is not None and d["eval_labels"] is not None:  # before calibration (eval: after)
            y = torch.tensor(d["eval_labels"])
            self.info["teacher_accuracy_uncalibrated"] = round(float((eval_soft.argmax(-1) == y).float().mean()), 4)
        if self.opts.prior_calibration == "uniform" or self.opts.class_prior:
            soft, eval_soft = self._calibrate(soft, eval_soft)
        self._teacher = None  # free the teacher: training needs only its labels
        del teacher
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        return {"texts": texts, "soft": soft, "eval_texts": eval_texts, "eval_soft": eval_soft,
                "eval_labels": d["eval_labels"]}

    def _calibrate(self, soft: torch.Tensor, eval_soft: Optional[torch.Tensor]):
        """Re-weight the classes so the training labels' mean is the target prior (weights fitted on training
        texts only; the same weights relabel the evaluation rows)."""
        if self.opts.multi_label:
            raise KDError("prior calibration needs single-label soft labels (not --multi_label)")
        prior = target_prior(len(self.class_names), self.opts.class_prior)
        w = prior_weights(soft, prior)
        self.info.update(teacher_label_prior=[round(float(v), 4) for v in soft.mean(0)],
                         prior_weights=[round(float(v), 4) for v in w])
        return apply_weights(soft, w), (apply_weights(eval_soft, w) if eval_soft is not None else None)

    def build_data(self, ctx) -> DataBundle:
        """Tokenize the labeled texts with the student's tokenizer (labels come from ``load_student``)."""
        from ..data.collate import PadCollator

        if self._prepared is None:
            self._prepared = self._prepare_labels(ctx)
        p = self._prepared
        train = self._rows(ctx, p["texts"], p["soft"])
        if p["eval_texts"] is not None:
            ev = self._rows(ctx, p["eval_texts"], p["eval_soft"], p["eval_labels"])
        else:  # the reference's metric: agreement on (part of) the training set
            k = min(len(p["texts"]), self.cfg.max_eval_samples or 1000)
            ev = self._rows(ctx, p["texts"][:k], p["soft"][:k])
        self.info["eval_texts"] = len(ev)
        lengths = [len(x) for x in train.columns["input_ids"]]
        collate = PadCollator(ctx.tokenizer.pad_token_id, padding_side="right")
        return DataBundle(train=train, eval=ev, collate_fn=collate, train_lengths=lengths, info=dict(self.info))

    # ---- training -----------------------------------------------------------------------------------------
    @staticmethod
    def _inputs(batch: dict) -> dict:
        return {k: v for k, v in batch.items() if k in ("input_ids", "attention_mask", "token_type_ids")}

    def compute_loss(self, ctx, batch):
        logits = ctx.student(**self._inputs(batch)).logits
        return {self.opts.zs_loss if not self.opts.multi_label else "bce":
                soft_label_loss(logits, batch["soft_labels"], self.opts.zs_loss, self.opts.multi_label)}

    @torch.no_grad()
    def eval_step(self, ctx, batch):
        logits = ctx.student(**self._inputs(batch)).logits.float()
        t = batch["soft_labels"].float()
        n = float(logits.shape[0])
        loss = soft_label_loss(logits, t, self.opts.zs_loss, self.opts.multi_label)
        out = {"distill_loss": (float(loss) * n, n)}
        if self.opts.multi_label:  # one yes/no decision per (text, class): P > 0.5 for both
            agree = (logits > 0) == (t > 0.5)
            out["teacher_agreement"] = (float(agree.sum()), float(agree.numel()))
            out["teacher_exact_match"] = (float(agree.all(-1).sum()), n)
        pred, t_pred = logits.argmax(-1), t.argmax(-1)
        out.setdefault("teacher_agreement", (float((pred == t_pred).sum()), n))
        if "labels" in batch:  # one gold class per text: top-1 accuracy (multi-label too)
            y = batch["labels"]
            out["accuracy"] = (float((pred == y).sum()), n)
            out["teacher_accuracy"] = (float((t_pred == y).sum()), n)
        return out

    def card_info(self):
        return {"class_names": ", ".join(self.class_names), "hypothesis_template": self.opts.hypothesis_template,
                "multi_label": self.opts.multi_label, "loss": self.opts.zs_loss, **self.info}
