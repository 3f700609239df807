"""MiniLLM (Gu et al., ICLR 2024): reverse-KL distillation of a generative student by policy gradient.

Every round the student samples responses to ``num_rollouts`` prompts per rank with teacher-mixed sampling
(``kd_engine.models.sampling.mixed_sample``: KV-cached lockstep decoding, mixture in probability space with
``teacher_mixed_alpha``), the rewards ``r_t = log p - log q`` go into a buffer, and the buffer is reused for
``ppo_epochs`` passes of minibatches (``per_device_train_batch_size``). Each optimizer step sums, per
micro-batch, the PPO-clipped policy loss ``pg`` (importance weight inside the ratio), the single-step exact
per-token reverse KL ``reg`` and, with ``--pt_file``, the pretraining loss ``pt`` (LM mixed with forward KD,
``kd_ratio``) on a separate corpus batch. Equations and which parts follow the paper vs the reference code:
``kd_engine/losses/minillm.py``.

Data: ``--train_file`` rows with the prompt in ``--text_column``; prompts longer than ``max_prompt_length``
tokens are truncated from the LEFT (the instruction's end is kept) and counted. ``--pt_file`` is plain text: LM
loss for causal students; for encoder-decoder students ``--pt_objective``: ``span_corruption`` (T5's own
pretraining objective, ``kd_engine/data/span_corruption.py``; the default when the tokenizer has ``<extra_id_*>``
sentinels, as T5/Flan-T5 tokenizers do) or ``prefix_lm`` (first half -> encoder, second half -> decoder target).
Logged per step: pg, reg, pt (and lm / kd parts), reward (length-normalised return of the
rollouts), response_len, rev_kl (k3 estimate on a pure-student sample of the first chunk of each round),
ratio, clipfrac.

Dropout is off in the student for the whole RL step (as the reference runs the policy in eval mode), so the first
minibatch of a fresh buffer recomputes exactly the rollout's log-probs (PPO ratio == w).

Resume: checkpoints carry, per rank, the rollout buffer, the position in the PPO round, the round counter and the
pretraining-batch position: a resumed run continues mid-round exactly.
"""
from __future__ import annotations

import logging
import math
from typing import Optional

import torch

from ..data.collate import PadCollator, to_device
from ..data.rollout_buffer import RolloutBuffer
from ..data.span_corruption import sentinel_ids, span_corrupt
from ..data.split import split_rows
from ..errors import ConfigError, KDError
from ..losses import minillm as L
from ..models.build import load_or_build_student, load_teacher_model
from ..models.modes import eval_mode
from ..models.response_logits import response_logits
from ..models.sampling import mixed_sample
from ._generative import GenerativeMixin
from ._minillm_options import MiniLLMOptions, first_word
from .base import DataBundle, Method, register

logger = logging.getLogger(__name__)


@register("minillm")
class MiniLLM(GenerativeMixin, Method):
    """Reverse-KL policy-gradient distillation with teacher-mixed sampling (MiniLLM)."""

    Options = MiniLLMOptions
    supports_messages = True
    supports_teacher_service = True  # --teacher_ranks: rollouts decode on the teacher group, hidden states score

    def __init__(self, cfg, opts):
        super().__init__(cfg, opts)
        if cfg.teacher_ranks > 0:
            self.needs_teacher = False  # the teacher group holds it (engine/served_teacher.py stands in for it)
        self.task = None
        self.round = 0
        self.mb_pos = 0
        self.mb_per_round = 0
        self.round_stats: dict[str, float] = {}
        self.pt = None
        self.pt_state = None

    served_kind = "hidden"  # --teacher_ranks: rollout sessions and hidden states

    # ---- building -----------------------------------------------------------------------------------------
    def load_teacher(self, ctx):
        return load_teacher_model(self.cfg, self._task())

    def load_student(self, ctx, teacher):
        student = load_or_build_student(self.cfg, teacher, self._task())
        if teacher is not None and bool(getattr(teacher.config, "is_encoder_decoder", False)) != bool(
                getattr(student.config, "is_encoder_decoder", False)):
            raise KDError("teacher and student must both be encoder-decoder or both causal LMs")
        self.vocab_size = len(ctx.tokenizer)
        return student

    def _prompt_dataset(self, ds, path: str, ctx, with_targets: bool = False):
        from ..data.files import require_columns

        tok, limit = ctx.tokenizer, self.opts.max_prompt_length
        if self.cfg.messages_column:  # conversations: prompt up to the last assistant turn's generation prompt
            from ..data.prompt_response import chat_prompt_rows

            chat, info = chat_prompt_rows(ds, path, tok, self.cfg.messages_column, limit, self.opts.max_new_tokens,
                                          need_response=with_targets)
            rows = [{"input_ids": r["prompt_ids"], "attention_mask": [1] * len(r["prompt_ids"]),
                     **({"target_labels": r["response_ids"]} if "response_ids" in r else {})} for r in chat]
            return rows, info["cut_prompts"]
        tgt_col = self.cfg.target_column if with_targets and self.cfg.target_column in ds.column_names else None
        require_columns(ds, [self.cfg.text_column], path)
        keep = [i for i, t in enumerate(ds[self.cfg.text_column]) if t is not None and str(t).strip()]
        if not keep:
            raise KDError(f"{path}: no non-empty prompts in column '{self.cfg.text_column}'")
        texts = [ds[self.cfg.text_column][i] for i in keep]
        ids = tok(texts, add_special_tokens=True, truncation=False)["input_ids"]
        truncated = sum(len(x) > limit for x in ids)
        rows = [{"input_ids": x[-limit:], "attention_mask": [1] * min(len(x), limit)} for x in ids]
        if tgt_col is not None:  # reference answers (e.g. the label word) for answer accuracy / teacher agreement
            targets = [str(ds[tgt_col][i] or "") for i in keep]
            tids = tok(targets, add_special_tokens=False)["input_ids"]
            for r, t in zip(rows, tids):
                r["target_labels"] = list(t[: self.opts.max_new_tokens]) or [-100]
        return rows, truncated

    def build_data(self, ctx) -> DataBundle:
        if not self.cfg.train_file:
            raise KDError("minillm needs prompts: pass --train_file (one prompt per row in --text_column)")
        from ..data.files import load_table

        cfg = self.cfg
        train_ds = load_table(cfg.train_file, split="train")
        eval_ds = load_table(cfg.eval_file, split="validation") if cfg.eval_file else None
        rows = split_rows(cfg, len(train_ds), len(eval_ds) if eval_ds is not None else None)
        ev, ev_trunc = None, 0
        if rows.eval is not None:
            src, src_path = (train_ds, cfg.train_file) if rows.held_out else (eval_ds, cfg.eval_file)
            ev, ev_trunc = self._prompt_dataset(src.select(rows.eval), src_path, ctx, True)
        train, n_trunc = self._prompt_dataset(train_ds.select(rows.train), cfg.train_file, ctx)
        if n_trunc or ev_trunc:
            logger.warning(
                "minillm: %d training and %d eval prompts longer than max_prompt_length=%d were truncated from the "
                "left", n_trunc, ev_trunc, self.opts.max_prompt_length)
        side = "right" if self._task() == "seq2seq_lm" else "left"
        if self.opts.pt_file:
            self._build_pt(ctx)
        return DataBundle(train=train, eval=ev, collate_fn=PadCollator(ctx.tokenizer.pad_token_id, padding_side=side),
                          train_lengths=[len(r["input_ids"]) for r in train],
                          info={"prompts": len(train), "truncated_prompts": n_trunc})

    def _build_pt(self, ctx) -> None:
        from ..data.files import load_table
        from ..data.tokenize import tokenize_dataset

        raw = load_table(self.opts.pt_file)
        self.pt = tokenize_dataset(raw, ctx.tokenizer, text_column=self.opts.pt_text_column,
                                   max_length=self.opts.pt_max_length, task="causal_lm", name=self.opts.pt_file)
        self.pt_collate = PadCollator(ctx.tokenizer.pad_token_id, padding_side="right")
        self.pt_objective = self._pt_objective(ctx.tokenizer)
        if ctx.is_main:
            logger.info("minillm: pretraining term on %d texts of %s, objective %s", len(self.pt), self.opts.pt_file,
                        self.pt_objective)

    def _pt_objective(self, tokenizer) -> str:
        want = self.opts.pt_objective
        if self._task() == "causal_lm":
            if want not in ("auto", "lm"):
                raise ConfigError(f"pt_objective {want} is for encoder-decoder students; a causal LM uses the LM loss")
            return "lm"
        if want == "lm":
            raise ConfigError("pt_objective lm is for causal LMs; use span_corruption or prefix_lm")
        if want == "prefix_lm":
            return want
        try:
            self.sentinels = sentinel_ids(tokenizer)
        except KDError:
            if want == "span_corruption":
                raise
            return "prefix_lm"
        need = math.ceil(self.opts.pt_max_length * self.opts.pt_noise_density / self.opts.pt_mean_span_length)
        if len(self.sentinels) < need:
            logger.warning("minillm: %d sentinel tokens for up to %d corrupted spans per text (pt_max_length %d): "
                           "spans past the last sentinel stay uncorrupted", len(self.sentinels), need,
                           self.opts.pt_max_length)
        return "span_corruption"

    def setup(self, ctx) -> None:
        from ..data.sampler import ResumableBatchSampler, infinite_batches

        self.buffer = RolloutBuffer(ctx.tokenizer.pad_token_id,
                                    "right" if self._task() == "seq2seq_lm" else "left")
        if self.pt is not None:
            self.pt_sampler = ResumableBatchSampler(len(self.pt), self.cfg.per_device_train_batch_size,
                                                    rank=ctx.rank, world_size=ctx.world_size, seed=self.cfg.seed,
                                                    drop_last=len(self.pt) >= self.cfg.per_device_train_batch_size
                                                    * ctx.world_size)
            if self.pt_state is not None:
                self.pt_sampler.load_state_dict(self.pt_state)
            self.pt_iter = infinite_batches(self.pt_sampler)

    # ---- rollouts -----------------------------------------------------------------------------------------
    def _sample(self, ctx, batch, alpha: float, generator) -> object:
        o = self.opts
        return mixed_sample(
            ctx.student.module, ctx.teacher_module, batch["input_ids"], batch["attention_mask"],
            max_new_tokens=o.max_new_tokens, eos_token_id=ctx.tokenizer.eos_token_id,
            pad_token_id=ctx.tokenizer.pad_token_id, alpha=alpha, temperature=o.gen_temperature, top_k=o.gen_top_k,
            top_p=o.gen_top_p, generator=generator, vocab_size=self.vocab_size, synced_ranks=ctx.world_size > 1)

    def _collect(self, ctx) -> None:
        o = self.opts
        self.buffer.clear()
        self.round += 1
        gen = torch.Generator(device=ctx.device).manual_seed(self.cfg.seed * 7919 + ctx.rank * 104729 + self.round)
        rewards_sum, lens, n_seq, rev_kl = 0.0, 0.0, 0, None
        while len(self.buffer) < o.num_rollouts:
            batch = ctx.next_batch()
            r = self._sample(ctx, batch, o.teacher_mixed_alpha, gen)
            rew = L.compute_rewards(r.teacher_logprobs, r.student_logprobs, r.response_mask, o.reward_scaling,
                                    o.cliprange_reward)
            self.buffer.add(r, rew)
            m = r.response_mask.float()
            disc = L.long_term_advantages(rew, m, gamma=o.gamma, length_norm=False, whiten=False)[:, 0]
            rewards_sum += float((disc / m.sum(-1).clamp_min(1.0) if o.length_norm else disc).sum())
            lens += float(m.sum())
            n_seq += m.shape[0]
            if rev_kl is None:  # reference: a separate pure-student sample for the reverse-KL estimate
                s = r if o.teacher_mixed_alpha == 0 else self._sample(ctx, batch, 0.0, gen)
                rev_kl = float(L.k3_reverse_kl(s.student_logprobs, s.teacher_logprobs, s.response_mask,
                                               length_norm=o.length_norm))
        bs = self.cfg.per_device_train_batch_size
        self.per_epoch = math.ceil(len(self.buffer) / bs)
        self.mb_per_round = o.ppo_epochs * self.per_epoch
        self.mb_pos = 0
        self.round_stats = {"reward": rewards_sum / max(n_seq, 1), "response_len": lens / max(n_seq, 1),
                            "rev_kl": rev_kl or 0.0}

    def _next_minibatch(self, ctx) -> dict:
        if self.mb_pos >= self.mb_per_round or len(self.buffer) == 0:
            self._collect(ctx)
        epoch, slot = divmod(self.mb_pos, self.per_epoch)
        order = self.buffer.epoch_order(epoch, self.cfg.seed + self.round)
        bs = self.cfg.per_device_train_batch_size
        self.mb_pos += 1
        return self.buffer.collate(order[slot * bs:(slot + 1) * bs], ctx.device)

    # ---- losses -------------------------------------------------------------------------------------------
    def _teacher_call(self, ctx):
        return lambda **kw: ctx.teacher_forward(**kw)

    def _ppo_terms(self, ctx, mb):
        o = self.opts
        args = (mb["prompt_ids"], mb["prompt_mask"], mb["response_ids"], mb["response_mask"])
        inf = mb.get("inf_mask")
        m = mb["response_mask"]
        s_logits = response_logits(ctx.student, *args, module=ctx.student.module).float() / o.gen_temperature
        lq = L.token_logprobs(s_logits, mb["response_ids"], m, self.vocab_size, inf)
        adv = L.long_term_advantages(mb["rewards"], m, gamma=o.gamma, length_norm=o.length_norm,
                                     whiten=o.whiten_advantages)
        pg, stats = L.ppo_policy_loss(lq, mb["student_logprobs"], adv, mb["weights"], m, o.cliprange)
        terms = {"pg": pg}
        if o.single_step_reg:
            with torch.no_grad():
                t_logits = response_logits(self._teacher_call(ctx), *args, module=ctx.teacher_module).float()
            terms["reg"] = L.single_step_reverse_kl(s_logits, t_logits / o.gen_temperature, m, self.vocab_size, inf)
        return terms, stats

    def _pt_batch(self, ctx) -> tuple[dict, torch.Tensor]:
        """Model inputs and aligned labels of the next pretraining batch.

        Causal LM: the text, next-token labels. Encoder-decoder: span corruption (inputs with sentinels -> the
        corrupted spans; the corruption is drawn from a generator seeded by (seed, rank, round, minibatch), so a
        resumed run draws the same) or prefix LM (first half to the encoder, second half as the decoder's target).
        Decoder inputs = start token + target[:-1].
        """
        rows = [self.pt[i] for i in next(self.pt_iter)]
        if self._task() == "causal_lm":
            batch = to_device(self.pt_collate(rows), ctx.device)
            return {k: batch[k] for k in ("input_ids", "attention_mask")}, batch["labels"]
        split = []
        if self.pt_objective == "span_corruption":
            g = torch.Generator().manual_seed(hash((self.cfg.seed, ctx.rank, self.round, self.mb_pos)) % 2**62)
            for r in rows:
                inp, tgt = span_corrupt(r["input_ids"], self.sentinels, ctx.tokenizer.eos_token_id,
                                        self.opts.pt_noise_density, self.opts.pt_mean_span_length, g)
                split.append({"input_ids": inp, "attention_mask": [1] * len(inp), "labels": tgt})
        else:
            for r in rows:
                ids = list(r["input_ids"])
                h = max(1, len(ids) // 2)
                split.append({"input_ids": ids[:h], "attention_mask": [1] * h, "labels": ids[h:] or ids[-1:]})
        batch = to_device(self.pt_collate(split), ctx.device)
        model = ctx.student.module
        inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"],
                  "decoder_input_ids": model.prepare_decoder_input_ids_from_labels(labels=batch["labels"]),
                  "decoder_attention_mask": (batch["labels"] != -100).long()}
        return inputs, batch["labels"]

    def _pt_terms(self, ctx):
        from ..losses.kd import shift_for_causal_lm

        inputs, labels = self._pt_batch(ctx)
        causal = self._task() == "causal_lm"
        s = ctx.student(**inputs).logits
        s, lab = shift_for_causal_lm(s, labels) if causal else (s, labels)
        t = None
        if self.opts.kd_ratio > 0:
            t = ctx.teacher_forward(**inputs).logits
            t = shift_for_causal_lm(t, labels)[0] if causal else t
        out = L.pretrain_loss(s, lab, t, self.opts.kd_ratio, self.vocab_size)
        return {"pt": self.opts.lm_coef * out["pt"]}, {"pt_lm": out["lm"], "pt_kd": out["kd"]}

    def train_step(self, ctx) -> dict[str, float]:
        # dropout off for the whole RL step (reference: the policy runs in eval mode), so that the first minibatch
        # of a fresh buffer recomputes exactly the rollout's log q (ratio == w)
        with eval_mode(ctx.student.module):
            totals = ctx.accumulate(lambda: self._micro_step(ctx))
        totals.update(self.round_stats)
        return totals

    def _micro_step(self, ctx):
        """Loss terms and statistics of one PPO minibatch (plus a pretraining batch with --pt_file)."""
        mb = self._next_minibatch(ctx)
        terms, stats = self._ppo_terms(ctx, mb)
        if self.pt is not None:
            pt_terms, pt_stats = self._pt_terms(ctx)
            terms.update(pt_terms)
            stats.update(pt_stats)
        return terms, stats

    def compute_loss(self, ctx, batch):  # not used: train_step is overridden
        raise NotImplementedError("minillm trains through train_step (rollouts + PPO epochs)")

    @torch.no_grad()
    def eval_step(self, ctx, batch):
        """Held-out prompts. Pure-student samples: k3 reverse-KL estimate and response length. With a
        ``--target_column`` in the eval file: greedy answers (``answer_max_tokens`` tokens) of student and teacher,
        decoded; the first word (lower-cased letters) is compared with the target's first word:
        ``answer_accuracy`` (student vs target), ``teacher_answer_accuracy`` and ``teacher_agreement``
        (student's first word == teacher's)."""
        gen = torch.Generator(device=ctx.device).manual_seed(self.cfg.seed + ctx.rank)
        r = self._sample(ctx, batch, 0.0, gen)
        n = float(r.response_mask.shape[0])
        rev = L.k3_reverse_kl(r.student_logprobs, r.teacher_logprobs, r.response_mask, length_norm=True)
        out = {"rev_kl": (float(rev) * n, n), "response_len": (float(r.response_mask.sum()), n)}
        if "target_labels" in batch:
            tok = ctx.tokenizer
            targets = [first_word(tok.decode([int(i) for i in row if i >= 0], skip_special_tokens=True))
                       for row in batch["target_labels"]]
            s_ans = self._greedy_words(ctx, batch, ctx.student.module)
            t_ans = self._greedy_words(ctx, batch, ctx.teacher_module)
            has = [bool(t) for t in targets]
            m = float(sum(has))
            out["answer_accuracy"] = (float(sum(h and a == t for h, a, t in zip(has, s_ans, targets))), m)
            out["teacher_answer_accuracy"] = (float(sum(h and a == t for h, a, t in zip(has, t_ans, targets))), m)
            out["teacher_agreement"] = (float(sum(h and a == t for h, a, t in zip(has, s_ans, t_ans))), m)
        return out

    def _greedy_words(self, ctx, batch, model) -> list[str]:
        """First word of each greedy answer of one model (same number of steps on every rank)."""
        r = mixed_sample(model, None, batch["input_ids"], batch["attention_mask"],
                         max_new_tokens=self.opts.answer_max_tokens, eos_token_id=ctx.tokenizer.eos_token_id,
                         pad_token_id=ctx.tokenizer.pad_token_id, alpha=0.0, do_sample=False,
                         vocab_size=self.vocab_size, synced_ranks=ctx.world_size > 1)
        ids = r.response_ids.masked_fill(r.response_mask == 0, -1)
        return [first_word(ctx.tokenizer.decode([int(i) for i in row if i >= 0], skip_special_tokens=True))
                for row in ids]

    # ---- state --------------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        # this rank's rollout buffer and position in the PPO round: a resume continues mid-round exactly
        state = {"round": self.round, "mb_pos": self.mb_pos, "mb_per_round": self.mb_per_round,
                 "per_epoch": getattr(self, "per_epoch", 0), "round_stats": dict(self.round_stats),
                 "buffer": list(self.buffer.samples) if getattr(self, "buffer", None) is not None else []}
        if self.pt is not None:
            state["pt_sampler"] = self.pt_sampler.state_dict()
        return state

    def reshard_refusal(self, states: list[dict]) -> Optional[str]:
        busy = [r for r, s in enumerate(states) if s.get("buffer") or int(s.get("mb_pos", 0))]
        if busy:
            n = sum(len(s.get("buffer") or []) for s in states)
            return (f"its ranks were mid-way through a PPO round (per-rank rollout buffers, {n} samples in all, "
                    f"position {states[busy[0]].get('mb_pos', 0)} of {states[busy[0]].get('mb_per_round', 0)} "
                    f"minibatches): they cannot be split over another number of ranks")
        return None

    def load_state_dict(self, state: dict) -> None:
        self.round = int(state.get("round", 0))
        self.pt_state = state.get("pt_sampler")
        if self.pt_state is not None and getattr(self, "pt_sampler", None) is not None:
            self.pt_sampler.load_state_dict(self.pt_state)
        self.mb_pos, self.mb_per_round = int(state.get("mb_pos", 0)), int(state.get("mb_per_round", 0))
        self.per_epoch = int(state.get("per_epoch", 0))
        self.round_stats = dict(state.get("round_stats", {}))
        if getattr(self, "buffer", None) is not None:
            self.buffer.samples = list(state.get("buffer", []))

    def card_info(self):
        o = self.opts
        return {"task": self._task(), "teacher_mixed_alpha": o.teacher_mixed_alpha, "ppo_epochs": o.ppo_epochs,
                "num_rollouts": o.num_rollouts, "kd_ratio": o.kd_ratio if o.pt_file else None,
                "pt_objective": getattr(self, "pt_objective", None)}
