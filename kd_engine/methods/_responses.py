"""Shared base of the sequence-level methods (``seqkd``, ``gkd``): prompt/response data, teacher responses.

Not a method itself (modules starting with ``_`` are not registered). ``ResponseMethod`` extends ``kd``'s
``LogitKD`` (teacher and student loading, the fused / naive logit losses, the evaluation metrics) with:

- data: ``--train_file`` rows with the prompt in ``--text_column`` and, where a method trains on dataset
  targets, the response in ``--target_column`` (``data.prompt_response``); ``--eval_file`` rows need both (the
  evaluation scores the student and teacher on the reference responses, as ``kd`` does);
- teacher responses (SeqKD targets): generated once in ``setup`` with the KV-cached sampler
  (``models.sampling.mixed_sample``, teacher alone), greedy or sampled (``--seqkd_do_sample``), sharded over
  ranks and cached by ``teachers.seqkd_cache`` under a key of teacher, prompts and decoding settings.
"""
from __future__ import annotations

import hashlib
import logging
import os
from dataclasses import dataclass
from typing import Optional

import torch

from ..data.bundle import DataBundle
from ..data.prompt_response import PromptResponseCollator, load_prompt_rows, prompts_sha256, unpad
from ..errors import ConfigError, KDError
from ..models.build import load_teacher_model
from ._generative import GenerativeMixin
from .kd import LogitKD

logger = logging.getLogger(__name__)


def check_generation(prefix: str, temperature: float, top_k: int, top_p: float) -> None:
    """Sampling settings that can produce a token, else ConfigError."""
    if temperature <= 0:
        raise ConfigError(f"{prefix}temperature must be > 0; got {temperature}")
    if top_k < 0:
        raise ConfigError(f"{prefix}top_k must be >= 0 (0 = no top-k limit); got {top_k}")
    if not 0.0 < top_p <= 1.0:
        raise ConfigError(f"{prefix}top_p must be in (0, 1]; got {top_p}: top_p {top_p} with top_k {top_k} "
                          f"(0 = no limit) keeps no token to sample")


@dataclass
class ResponseOptions:
    task: str = "auto"  # auto | causal_lm | seq2seq_lm
    max_prompt_length: int = 256  # prompt tokens kept (cut from the left)
    max_new_tokens: int = 128  # response tokens: generation limit, and where dataset targets are cut
    seqkd_do_sample: bool = False  # teacher responses: sampled (true) or greedy (false)
    seqkd_temperature: float = 1.0  # teacher responses: sampling temperature
    seqkd_top_k: int = 0  # teacher responses: top-k (0 = off)
    seqkd_top_p: float = 1.0  # teacher responses: nucleus top-p
    seqkd_cache: Optional[str] = None  # teacher-response cache folder (default: $KD_ENGINE_CACHE/seqkd/<key>)
    seqkd_batch_size: int = 16  # prompts per teacher generation batch
    seqkd_chunk_size: int = 1024  # prompts per cache chunk (resume granularity)

    # read by kd's LogitKD code paths (not options of these methods; gkd makes some of them options)
    teacher_cache = None
    temperature = 1.0
    alpha = 1.0
    divergence = "forward_kl"
    beta = 0.0
    kd_loss_impl = "naive"

    def needs_teacher_responses(self) -> bool:
        return False

    def needs_dataset_targets(self) -> bool:
        return not self.needs_teacher_responses()

    def check_against(self, cfg) -> None:
        """Checks that need the engine config, before anything is written."""
        if self.needs_dataset_targets() and not (cfg.target_column or cfg.messages_column):
            raise ConfigError("this run trains on the dataset's responses: pass --target_column or --messages_column")
        if cfg.eval_file and not (cfg.target_column or cfg.messages_column):
            raise ConfigError("--eval_file needs --target_column (reference responses to score)")
        if self.needs_teacher_responses():
            self.check_seqkd_cache(cfg)

    def validate(self) -> None:
        if self.task not in ("auto", "causal_lm", "seq2seq_lm"):
            raise ConfigError(f"task must be auto, causal_lm or seq2seq_lm; got {self.task!r}")
        for k in ("max_prompt_length", "max_new_tokens", "seqkd_batch_size", "seqkd_chunk_size"):
            if getattr(self, k) < 1:
                raise ConfigError(f"{k} must be >= 1; got {getattr(self, k)}")
        check_generation("seqkd_", self.seqkd_temperature, self.seqkd_top_k, self.seqkd_top_p)

    def decoding(self, seed: int) -> dict:
        """The teacher-response decoding settings (part of the cache key; the seed only matters when sampled)."""
        d = {"do_sample": self.seqkd_do_sample, "max_new_tokens": self.max_new_tokens,
             "max_prompt_length": self.max_prompt_length}
        if self.seqkd_do_sample:
            d.update(temperature=self.seqkd_temperature, top_k=self.seqkd_top_k, top_p=self.seqkd_top_p, seed=seed)
        return d

    def check_seqkd_cache(self, cfg) -> None:
        """Config-time refusal of a --seqkd_cache folder made for another teacher, prompt file or decoding (the
        weights, tokenizer and prompt tokens are checked again once loaded)."""
        from ..teachers import seqkd_cache

        if not self.seqkd_cache:
            return
        old = seqkd_cache.read_key(self.seqkd_cache)
        if old is None:
            return
        now = seqkd_cache.normalise(config_key(cfg, self))
        diff = seqkd_cache.key_mismatch(old, now, sorted(now))
        if diff:
            raise ConfigError(f"seqkd cache {self.seqkd_cache} holds teacher responses for another run "
                              f"({'; '.join(diff)}); use another --seqkd_cache folder")


def config_key(cfg, opts: ResponseOptions) -> dict:
    """The part of the teacher-response cache key known before any model is loaded."""
    from ..teacher_cache_store import file_sha256

    src = cfg.train_file or ""
    return {"teacher": cfg.teacher, "decoding": opts.decoding(cfg.seed), "text_column": cfg.text_column,
            "train_file_sha256": file_sha256(src) if os.path.isfile(src) else src,
            "max_train_samples": cfg.max_train_samples,
            **({"messages_column": cfg.messages_column} if cfg.messages_column else {})}


class ResponseMethod(GenerativeMixin, LogitKD):
    """LogitKD on prompt/response rows; teacher responses on demand (``uses_teacher_responses``)."""

    Options = ResponseOptions
    supports_packing = False  # gkd samples a response per row; seqkd packs each micro-batch (below)
    supports_messages = True

    def uses_teacher_responses(self) -> bool:
        return self.opts.needs_teacher_responses()

    def trains_on_dataset_targets(self) -> bool:
        return self.opts.needs_dataset_targets()

    def load_teacher(self, ctx):
        teacher = load_teacher_model(self.cfg, self._task())
        if self.uses_teacher_responses():  # fingerprint now: under ZeRO-3 the engine's copy is partitioned
            from ..teachers.zero_shot import weights_fingerprint

            self.teacher_weights = weights_fingerprint(teacher)
        return teacher

    def load_student(self, ctx, teacher):
        student = super().load_student(ctx, teacher)
        if teacher is not None and bool(getattr(teacher.config, "is_encoder_decoder", False)) != bool(
                getattr(student.config, "is_encoder_decoder", False)):
            raise KDError("teacher and student must both be encoder-decoder or both causal LMs")
        self.vocab_size = len(ctx.tokenizer)
        return student

    def build_data(self, ctx) -> DataBundle:
        cfg, o = self.cfg, self.opts
        if not cfg.train_file:
            raise KDError(f"{self.name} needs prompts: pass --train_file (prompt in --text_column)")
        targets = (cfg.target_column or cfg.messages_column) if self.trains_on_dataset_targets() else None
        if self.trains_on_dataset_targets() and not targets:
            raise KDError(f"{self.name} trains on dataset responses here: pass --target_column or --messages_column")
        args = dict(max_prompt_length=o.max_prompt_length, max_new_tokens=o.max_new_tokens,
                    messages_column=cfg.messages_column)
        train, info = load_prompt_rows(cfg.train_file, ctx.tokenizer, cfg.text_column, targets, split="train",
                                       max_rows=cfg.max_train_samples, need_response=bool(targets), **args)
        ev = None
        if cfg.eval_file:
            if not (cfg.target_column or cfg.messages_column):
                raise KDError("--eval_file needs --target_column (reference responses to score)")
            ev, ev_info = load_prompt_rows(cfg.eval_file, ctx.tokenizer, cfg.text_column, cfg.target_column,
                                           split="validation", max_rows=cfg.max_eval_samples, need_response=True,
                                           **args)
            info.update({f"eval_{k}": v for k, v in ev_info.items()})
        if any(info.values()):
            logger.warning("%s: prompts longer than max_prompt_length / targets longer than max_new_tokens were "
                           "cut: %s", self.name, info)
        pack = None
        if cfg.packing:
            if self._task() != "causal_lm":
                raise KDError(f"--packing is for causal LMs; this run's task is {self._task()}")
            pack = o.max_prompt_length + o.max_new_tokens  # the longest one example can be
        self.collate = PromptResponseCollator(ctx.tokenizer.pad_token_id, self._task() == "causal_lm",
                                              pack_capacity=pack)
        self._train_rows = train
        lengths = [len(r["prompt_ids"]) + len(r.get("response_ids", ())) for r in train]
        return DataBundle(train=train, eval=ev, collate_fn=self.collate, train_lengths=lengths,
                          info={"prompts": len(train), **info})

    def setup(self, ctx) -> None:
        self.seqkd_info = None
        if self.uses_teacher_responses():
            self._fill_teacher_responses(ctx)

    # ---- generation ---------------------------------------------------------------------------------------
    def sample(self, ctx, model, batch, *, do_sample: bool, temperature: float, top_k: int, top_p: float,
               generator: Optional[torch.Generator]) -> list[list[int]]:
        """Responses of ``model`` alone to the batch's prompts (KV-cached sampler), as token lists."""
        from ..models.sampling import mixed_sample

        tok = ctx.tokenizer
        r = mixed_sample(model, None, batch["prompt_ids"], batch["prompt_mask"],
                         max_new_tokens=self.opts.max_new_tokens,
                         eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, alpha=0.0,
                         temperature=temperature, top_k=top_k, top_p=top_p, do_sample=do_sample, generator=generator,
                         vocab_size=self.vocab_size, synced_ranks=ctx.world_size > 1)
        return unpad(r.response_ids, r.response_mask)

    def _fill_teacher_responses(self, ctx) -> None:
        from ..data.collate import to_device
        from ..paths import cache_dir
        from ..teacher_cache_store import tokenizer_sha256
        from ..teachers import seqkd_cache

        o, cfg = self.opts, self.cfg
        rows = self._train_rows
        key = {**config_key(cfg, o), "weights": self.teacher_weights, "tokenizer_sha256": tokenizer_sha256(
            ctx.tokenizer), "prompts_sha256": prompts_sha256(rows), "n_prompts": len(rows),
               "eos_token_id": ctx.tokenizer.eos_token_id}
        folder = o.seqkd_cache or seqkd_cache.default_cache_dir(cache_dir("seqkd"), seqkd_cache.normalise(key))

        def generate(prompts):
            batch = to_device(self.collate([{"prompt_ids": p} for p in prompts]), ctx.device)
            gen = None
            if o.seqkd_do_sample:  # seeded by the batch's content: a resumed build draws what a straight one would
                h = hashlib.sha256(repr((cfg.seed, prompts)).encode()).digest()
                gen = torch.Generator(device=ctx.device).manual_seed(int.from_bytes(h[:8], "little") >> 1)
            with ctx.teacher_hooks() as teacher:
                return self.sample(ctx, teacher, batch, do_sample=o.seqkd_do_sample, temperature=o.seqkd_temperature,
                                   top_k=o.seqkd_top_k, top_p=o.seqkd_top_p, generator=gen)

        responses, info = seqkd_cache.teacher_responses(
            generate, [r["prompt_ids"] for r in rows], key, folder, batch_size=o.seqkd_batch_size,
            chunk_size=o.seqkd_chunk_size, rank=ctx.rank, world_size=ctx.world_size)
        for r, resp in zip(rows, responses):
            r["response_ids"] = list(resp)
        self.seqkd_info = {"cache": folder, **info}
        if ctx.is_main:
            logger.info("%s: %d teacher responses (%s) in %s", self.name, len(rows),
                        "cache hit" if info["hit"] else f"{info['generated_chunks']} chunks generated", folder)

    def card_info(self):
        o = self.opts
        out = {"task": self._task(), "max_new_tokens": o.max_new_tokens}
        if self.uses_teacher_responses():
            out["teacher responses"] = o.decoding(self.cfg.seed)
        return out
