"""Sequence-level KD (Kim & Rush, 2016): the teacher answers the training prompts once, the student is then
trained with the supervised loss on those answers.

The teacher's responses are generated in ``setup`` with the KV-cached sampler, greedy by default or sampled
(``--seqkd_do_sample true`` with ``--seqkd_temperature / --seqkd_top_k / --seqkd_top_p``; MiniLLM's SeqKD baseline
samples with top_k 0, top_p 1, temperature 1), sharded over data-parallel ranks and cached on disk
(``kd_engine/teachers/seqkd_cache.py``: keyed by teacher weights, tokenizer, prompt tokens and decoding settings;
another key is refused, a killed build resumes at its last finished chunk; other students reuse the cache).
Training is cross-entropy on the teacher's responses (response tokens only; prompt tokens are not predicted).
Causal LMs (prompt + response in one sequence) and encoder-decoder models (prompt -> encoder, response -> decoder).
Evaluation (``--eval_file`` with ``--target_column``) scores student and teacher on the reference responses.
"""
from __future__ import annotations

from dataclasses import dataclass

from ..losses.kd import hard_cross_entropy
from ._responses import ResponseMethod, ResponseOptions
from .base import register
from .kd import aligned_logits


@dataclass
class SeqKDOptions(ResponseOptions):
    def needs_teacher_responses(self) -> bool:
        return True

    def needs_dataset_targets(self) -> bool:
        return False


@register("seqkd")
class SeqKD(ResponseMethod):
    """Sequence-level KD: supervised training on the teacher's cached responses."""

    Options = SeqKDOptions
    supports_packing = True  # each micro-batch's prompt + teacher response examples packed at collate time

    def _fused(self) -> bool:
        return False  # no teacher term in the loss

    def compute_loss(self, ctx, batch):
        s, lab = aligned_logits(self._task(), ctx.student(**self._inputs(ctx.student.module, batch)).logits,
                                batch["labels"])
        return {"ce": hard_cross_entropy(s, lab, self.vocab_size)}
