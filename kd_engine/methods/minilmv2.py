"""MiniLMv2 (Wang et al. 2021): distil self-attention relations (Q-Q, K-K, V-V) on a raw-text corpus.

Teacher layer L (default: the last layer for teachers of up to 12 layers; for deeper ones the paper's upper-middle
choice, 7/8 of the depth: layer 21 of BERT-large's 24), student last layer; Q/K/V of each re-split into
``relation_heads`` relation heads; KL(teacher relation || student relation) per row, averaged over real tokens.
The loss is the only training signal (no MLM). Teacher and student are encoders loaded with ``AutoModel``;
the student is built from the teacher, randomly initialised by default as in the paper and the reference code
(bloomberg/minilmv2.bb; ``--student.init teacher_layers`` copies teacher layers instead, possible only at the
teacher's width), or loaded (``--student PATH``). The corpus (``--train_file``: text / jsonl / WikiExtractor files,
directories or globs) is tokenized once into a memory-mapped cache and served as ``--blocks``: ``packed``
``max_length`` blocks of the token stream (default), ``documents`` (every document in ``max_length`` blocks, none
crossing a document boundary) or ``truncated`` (one document per example cut at ``max_length``: what the paper's
reference code does).
"""
from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from typing import Optional

import torch

from .. import paths
from ..data.collate import PadCollator
from ..data.corpus import FORMATS, DocumentBlocks, DocumentChunks, PackedBlocks, build_or_load
from ..data.split import split_rows
from ..errors import ConfigError, KDError
from ..losses.minilm import minilm_v2_loss
from ..models.build import load_or_build_student, load_teacher_model
from ..models.qkv import get_adapter
from .base import DataBundle, Method, register

logger = logging.getLogger(__name__)


BLOCKS = ("packed", "documents", "truncated")


def default_teacher_layer(num_layers: int) -> int:
    """1-based teacher layer: the last for teachers of up to 12 layers (the reference recipe for base models);
    for deeper ones the paper's upper-middle layer, 7/8 of the depth (21 of 24 for BERT-large)."""
    return num_layers if num_layers <= 12 else round(num_layers * 7 / 8)


@dataclass
class MiniLMv2Options:
    relation_heads: int = 48  # A_r: must divide the Q/K/V width of teacher and student (48 base, 64 large)
    teacher_layer: Optional[int] = None  # 1-based as in the paper; None: last layer (<= 12), else 7/8 of the depth
    qq_weight: float = 1.0  # weight of the Q-Q relation loss
    kk_weight: float = 1.0  # weight of the K-K relation loss
    vv_weight: float = 1.0  # weight of the V-V relation loss
    relation_chunk_size: str = "auto"  # (batch x relation head) pairs per chunk: an integer, "auto" or "none"
    corpus_format: str = "auto"  # auto | lines | paragraphs | jsonl | wiki
    corpus_cache_dir: Optional[str] = None  # default $KD_ENGINE_CACHE/corpus (shared by runs and ranks)
    # packed: max_length blocks of the token stream (no text wasted on long documents such as Wikipedia articles);
    # documents: every document in max_length blocks, none crossing a document boundary (padded per batch);
    # truncated: one document per example cut at max_length, padded per batch (the reference code's way)
    blocks: str = "packed"  # packed | documents | truncated: how the corpus becomes examples
    pack_blocks: Optional[bool] = None  # old name: true = --blocks packed, false = --blocks truncated
    tokenize_workers: Optional[int] = None  # tokenizer processes for the first build (default: cores, up to 8)

    def validate(self) -> None:
        if self.relation_heads < 1:
            raise ConfigError(f"relation_heads must be >= 1; got {self.relation_heads}")
        if self.teacher_layer is not None and self.teacher_layer < 1:
            raise ConfigError(f"teacher_layer is 1-based (1 = first layer); got {self.teacher_layer}")
        weights = (self.qq_weight, self.kk_weight, self.vv_weight)
        if any(w < 0 for w in weights) or not any(w > 0 for w in weights):
            raise ConfigError(f"qq_weight, kk_weight, vv_weight must be >= 0 and not all 0; got {weights}")
        self.chunk_size()
        if self.pack_blocks is not None:
            old = "packed" if self.pack_blocks else "truncated"
            if self.blocks not in ("packed", old):
                raise ConfigError(f"--pack_blocks {str(self.pack_blocks).lower()} contradicts --blocks {self.blocks}")
            self.blocks = old
        if self.blocks not in BLOCKS:
            raise ConfigError(f"blocks must be one of {', '.join(BLOCKS)}; got '{self.blocks}'")
        if self.corpus_format not in FORMATS:
            raise ConfigError(f"corpus_format must be one of {', '.join(FORMATS)}; got '{self.corpus_format}'")

    def chunk_size(self):
        v = str(self.relation_chunk_size).strip().lower()
        if v in ("auto", "none"):
            return None if v == "none" else "auto"
        if not v.isdigit() or int(v) < 1:
            raise ConfigError(f"relation_chunk_size must be a positive integer, 'auto' or 'none'; "
                              f"got '{self.relation_chunk_size}'")
        return int(v)


@register("minilmv2")
class MiniLMv2(Method):
    """Self-attention relation distillation into a smaller encoder."""

    Options = MiniLMv2Options
    default_student_init = "random"

    def load_teacher(self, ctx):
        return load_teacher_model(self.cfg, "encoder")

    def load_student(self, ctx, teacher):
        cfg, s = self.cfg, self.cfg.student
        t_width = getattr(teacher.config, "hidden_size", None) or getattr(teacher.config, "dim", None)
        if not s.name_or_path and s.init == "teacher_layers" and s.hidden is not None and s.hidden != t_width:
            # MiniLMv2 students are randomly initialised (the reference code); teacher layers cannot be copied
            # into a different width anyway
            logger.info("student width %d differs from the teacher's %s: random initialisation", s.hidden, t_width)
            cfg = dataclasses.replace(cfg, student=dataclasses.replace(s, init="random"))
        student = load_or_build_student(cfg, teacher, "encoder")
        # fail before any data work: architecture, layer and relation heads must fit both models
        t_ad, s_ad = get_adapter(teacher), get_adapter(student)
        self._teacher_index(t_ad)
        for who, ad in (("teacher", t_ad), ("student", s_ad)):
            if ad.hidden_size % self.opts.relation_heads:
                raise KDError(f"relation_heads={self.opts.relation_heads} does not divide the {who}'s Q/K/V width "
                              f"{ad.hidden_size} (teacher {t_ad.hidden_size}, student {s_ad.hidden_size}); "
                              "pick a common divisor, e.g. 48 for 768/384")
        return student

    def _teacher_index(self, adapter) -> int:
        L = self.opts.teacher_layer
        if L is None:
            return default_teacher_layer(adapter.num_layers) - 1
        if not 1 <= L <= adapter.num_layers:
            raise KDError(f"teacher_layer {L} is out of range: the teacher has {adapter.num_layers} layers "
                          f"(1..{adapter.num_layers})")
        return L - 1

    # ---- data ---------------------------------------------------------------------------------------------
    def _blocks(self, ctx, files):
        o = self.opts
        cache_dir = o.corpus_cache_dir or paths.cache_dir("corpus")
        # every rank calls this at once: rank 0 builds the cache, the others wait for its COMPLETE marker
        cache = build_or_load(files, ctx.tokenizer, cache_dir, format=o.corpus_format, text_field=self.cfg.text_column,
                              max_length=self.cfg.max_length if o.blocks == "truncated" else None,
                              num_workers=o.tokenize_workers, rank=ctx.rank, world_size=ctx.world_size,
                              progress=ctx.is_main)
        if o.blocks == "packed":
            return PackedBlocks(cache, self.cfg.max_length), None
        ds = (DocumentChunks if o.blocks == "documents" else DocumentBlocks)(cache, self.cfg.max_length)
        return ds, ds.lengths

    def build_data(self, ctx) -> DataBundle:
        cfg = self.cfg
        if not cfg.train_file:
            raise KDError("minilmv2 needs a corpus: pass --train_file FILE|DIR|GLOB (text, jsonl or WikiExtractor)")
        corpus, lengths = self._blocks(ctx, cfg.train_file)
        eval_corpus = self._blocks(ctx, cfg.eval_file)[0] if cfg.eval_file else None
        rows = split_rows(cfg, len(corpus), len(eval_corpus) if eval_corpus is not None else None)
        evaluation = None
        if rows.eval is not None:
            evaluation = torch.utils.data.Subset(corpus if rows.held_out else eval_corpus, rows.eval)
        train = corpus if len(rows.train) == len(corpus) else torch.utils.data.Subset(corpus, rows.train)
        lengths = [lengths[i] for i in rows.train] if lengths is not None and train is not corpus else lengths
        pad = ctx.tokenizer.pad_token_id
        if pad is None:
            raise KDError("the tokenizer has no pad token")
        return DataBundle(train=train, eval=evaluation, collate_fn=PadCollator(pad), train_lengths=lengths,
                          info={"train_examples": len(train)})

    # ---- training -----------------------------------------------------------------------------------------
    def setup(self, ctx) -> None:
        self.t_adapter = get_adapter(ctx.teacher_module)
        self.s_adapter = get_adapter(ctx.student.module)
        self.t_layer = self._teacher_index(self.t_adapter)
        self.weights = (self.opts.qq_weight, self.opts.kk_weight, self.opts.vv_weight)
        self.chunk = self.opts.chunk_size()

    def compute_loss(self, ctx, batch):
        ids, mask = batch["input_ids"], batch.get("attention_mask")
        extra = {k: batch[k] for k in ("token_type_ids",) if k in batch}
        with ctx.teacher_hooks() as teacher:  # the teacher module directly: its forward stops after layer L's V
            t_qkv = self.t_adapter.qkv(teacher, ids, mask, self.t_layer, **extra)
        s_qkv = self.s_adapter.qkv(ctx.student, ids, mask, -1, **extra)  # the student engine's own forward
        _, terms = minilm_v2_loss(t_qkv, s_qkv, mask, self.opts.relation_heads, self.weights, self.chunk)
        w = dict(zip(("qq", "kk", "vv"), self.weights))
        return {f"rel_{k}": w[k] * v for k, v in terms.items()}

    def card_info(self):
        return {"relation_heads": self.opts.relation_heads,
                "teacher_layer": self.t_layer + 1 if hasattr(self, "t_layer") else self.opts.teacher_layer,
                "relation_weights": {"qq": self.opts.qq_weight, "kk": self.opts.kk_weight, "vv": self.opts.vv_weight}}
