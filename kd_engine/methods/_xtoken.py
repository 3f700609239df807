"""What the cross-tokenizer methods (uld, xtoken_kd) share: two tokenizers, paired data, one loss pass.

The teacher reads the text as its own tokenizer encodes it, the student as its own (``data.xtoken``); the loss
compares next-token distributions at row pairs and the span probabilities both models give the same text
(``losses.xtoken``). ``kd_loss_impl auto`` (fused): both models' final hidden states and output-layer weights go
in, chunks of rows come out as logits one at a time (no full ``[tokens x V]`` logits of either model); ``naive``:
the models' logits, chunked the same way. Evaluation reports ``bits_per_byte`` (student NLL over the bytes its
tokens cover; comparable across tokenizers), ``teacher_bits_per_byte``, ``next_word_agreement`` (share of word
starts where both top-1 tokens spell the same word) and the student's own per-token ``lm_loss``.
"""
from __future__ import annotations

import math
from typing import Optional

import torch

from ..data.vocab_map import vocab_map, word_ids
from ..data.xtoken import build_paired_data
from ..errors import ConfigError, KDError
from ..losses.xtoken import binary_kl, pair_terms, token_log_probs
from ..models import lm_head
from ..models.build import load_or_build_student, load_teacher_model
from .base import DataBundle, Method

HELP = {
    "teacher_tokenizer": "the teacher's tokenizer (default: the one in --teacher's folder); must be a fast tokenizer",
    "kd_loss_impl": "auto/fused: losses from hidden states, a chunk of rows at a time (no full logits); naive: "
                    "from the models' logits (models whose output layer is not a plain linear map)",
}


def _mean(x: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return x.sum() / x.numel() if x.numel() else like.sum() * 0.0


class CrossTokenizerMethod(Method):
    requires_same_vocab = False
    lm_loss_key = "lm_loss"
    data_options = ("eval_file", "eval_split", "max_train_samples", "max_eval_samples")
    pair_mode = "span"  # "span" (starts of aligned spans) or "position" (ULD's i-th token pairs)
    uses_spans = False  # the method has a span term (chain-rule span probabilities are computed)

    def __init__(self, cfg, opts):
        super().__init__(cfg, opts)
        self.t_tok = None
        self.vmap = None

    # ---- building -------------------------------------------------------------------------------------
    def load_tokenizer(self, ctx):
        from ..data.token_alignment import check_fast
        from ..models.loading import load_tokenizer

        src = self.cfg.tokenizer or self.cfg.student.name_or_path or self.cfg.teacher
        s_tok = load_tokenizer(src, trust_remote_code=self.cfg.trust_remote_code)
        t_src = self.opts.teacher_tokenizer or self.cfg.teacher
        self.t_tok = load_tokenizer(t_src, trust_remote_code=self.cfg.trust_remote_code) if t_src else s_tok
        check_fast(s_tok, "student")
        check_fast(self.t_tok, "teacher")
        for tok in (s_tok, self.t_tok):
            if tok.pad_token_id is None:
                tok.pad_token = tok.eos_token
        return s_tok

    def load_teacher(self, ctx):
        return load_teacher_model(self.cfg, "causal_lm")

    def load_student(self, ctx, teacher):
        student = load_or_build_student(self.cfg, teacher, "causal_lm")
        for who, model, tok in (("teacher", teacher, self.t_tok), ("student", student, ctx.tokenizer)):
            if model is None:
                continue
            rows = model.get_output_embeddings().weight.shape[0] if model.get_output_embeddings() is not None \
                else getattr(model.config.get_text_config(), "vocab_size", None)
            if rows is not None and rows < len(tok):
                raise KDError(f"the {who} has {rows} logit rows but its tokenizer has {len(tok)} tokens: pass the "
                              f"{who}'s own tokenizer ({'--teacher_tokenizer' if who == 'teacher' else '--tokenizer'})")
            if self._fused():
                lm_head.output_layer(model, who)
        return student

    def build_data(self, ctx) -> DataBundle:
        bundle = build_paired_data(self.cfg, ctx.tokenizer, self.t_tok)
        self.data_collate = bundle.collate_fn
        return bundle

    def _fused(self) -> bool:
        return self.opts.kd_loss_impl != "naive"

    def _maps(self, device, s_tok) -> dict:
        if self.vmap is None:
            t_ids, s_ids = vocab_map(self.t_tok, s_tok)
            t_rest = torch.ones(len(self.t_tok), dtype=torch.bool)
            s_rest = torch.ones(len(s_tok), dtype=torch.bool)
            t_rest[t_ids] = False
            s_rest[s_ids] = False
            table: dict = {}
            self.vmap = {"t_ids": t_ids, "s_ids": s_ids, "t_rest": t_rest, "s_rest": s_rest,
                         "t_word": word_ids(self.t_tok, table), "s_word": word_ids(s_tok, table),
                         "mapped": int(t_ids.numel())}
            self.vmap = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in self.vmap.items()}
        return self.vmap

    # ---- the loss pass --------------------------------------------------------------------------------
    def pair_kinds(self) -> tuple[str, ...]:
        """The row terms (``losses.xtoken.pair_terms`` kinds) this method's loss uses."""
        raise NotImplementedError

    def combine(self, parts: dict, like: torch.Tensor) -> dict[str, torch.Tensor]:
        """The method's weighted loss terms from ``parts`` (row terms, ``ce``, ``span_bkl``)."""
        raise NotImplementedError

    def _parts(self, ctx, batch, evaluating: bool = False) -> tuple[list[str], torch.Tensor]:
        s_inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
        t_inputs = {"input_ids": batch["teacher_input_ids"], "attention_mask": batch["teacher_attention_mask"]}
        student, fused = ctx.student.module, self._fused()
        vmap = self._maps(batch["input_ids"].device, ctx.tokenizer)
        s_vocab, t_vocab = len(ctx.tokenizer), len(self.t_tok)
        if fused:
            t_src = lm_head.hidden_states(ctx.teacher_forward, ctx.teacher_module, "teacher", **t_inputs)
            t_w = lm_head.output_layer(ctx.teacher_module, "teacher").weight
            if hasattr(t_w, "ds_id"):  # ZeRO-3: backward recomputes teacher chunks, after the gather has ended;
                with lm_head.gathered(t_w):  # a whole copy lives for this step (what fused kd gathers anyway)
                    t_w = t_w.detach().clone()
        else:
            t_src, t_w = ctx.teacher_forward(**t_inputs).logits, None
        names: list[str] = []

        def loss_vector(s_src, s_w):
            out = self._loss_parts(s_src, s_w, s_vocab, t_src, t_w, t_vocab, batch, vmap, evaluating)
            names.extend(out)
            return torch.stack([out[k].float() for k in out])

        if fused:
            head = lm_head.output_layer(student, "student")
            with lm_head.head_replaced(student, lambda h: loss_vector(h, head.weight), "student"):
                vector = ctx.student(**s_inputs).logits
        else:
            vector = loss_vector(ctx.student(**s_inputs).logits, None)
        return names, vector

    def _loss_parts(self, s_src, s_w, s_vocab, t_src, t_w, t_vocab, batch, vmap, evaluating) -> dict:
        o = self.opts
        ids, t_ids = batch["input_ids"], batch["teacher_input_ids"]
        lab = batch["labels"]
        b, r = (lab[:, 1:] != -100).nonzero(as_tuple=True)
        s_lp = token_log_probs(s_src, s_w, ids, b, r, s_vocab)
        tb, tr = (batch["teacher_labels"][:, 1:] != -100).nonzero(as_tuple=True)
        with torch.no_grad():
            t_lp = token_log_probs(t_src, t_w, t_ids, tb, tr, t_vocab)
        like = s_lp
        parts = {"ce": -_mean(s_lp, like)}
        # spans: chain-rule log-probs of the same text under both models
        valid = batch["span_s0"] >= 0
        sb, k = valid.nonzero(as_tuple=True)
        s0, s1 = batch["span_s0"][sb, k], batch["span_s1"][sb, k]
        t0, t1 = batch["span_t0"][sb, k], batch["span_t1"][sb, k]
        if self.uses_spans:
            dense_s = s_lp.new_zeros(ids.shape).index_put((b, r + 1), s_lp)
            dense_t = t_lp.new_zeros(t_ids.shape).index_put((tb, tr + 1), t_lp)
            multi = ((s1 - s0) > 1) | ((t1 - t0) > 1)
            span_s = _gather_spans(dense_s, sb, s0, s1)
            span_t = _gather_spans(dense_t, sb, t0, t1)
            parts["span_bkl"] = _mean(binary_kl(span_t[multi], span_s[multi]), like)
        # next-token distributions at row pairs
        if self.pair_mode == "position":
            pv = batch["pos_s"] >= 0
            pb, pk = pv.nonzero(as_tuple=True)
            p_s, p_t = batch["pos_s"][pb, pk], batch["pos_t"][pb, pk]
        else:
            pb, p_s, p_t = sb, s0 - 1, t0 - 1
        rows = pair_terms(s_src, s_w, s_vocab, t_src, t_w, t_vocab, pb, p_s, p_t, vmap, self.pair_kinds(),
                          o.temperature)
        parts.update({k: _mean(v, like) for k, v in rows.items()})
        if evaluating:
            word = batch["span_word"][sb, k] > 0
            agree = pair_terms(s_src, s_w, s_vocab, t_src, t_w, t_vocab, sb[word], (s0 - 1)[word], (t0 - 1)[word],
                               vmap, ("agree",), 1.0)["agree"]
            parts["agree_sum"], parts["agree_n"] = agree.sum(), like.new_tensor(float(agree.numel()))
            parts["s_nll"], parts["s_n"] = -s_lp.sum(), like.new_tensor(float(s_lp.numel()))
            parts["t_nll"] = -t_lp.sum()
        return parts

    def compute_loss(self, ctx, batch):
        names, vector = self._parts(ctx, batch)
        return self.combine(dict(zip(names, vector)), vector)

    @torch.no_grad()
    def eval_step(self, ctx, batch):
        names, vector = self._parts(ctx, batch, evaluating=True)
        parts = dict(zip(names, vector.tolist()))
        terms = self.combine({k: torch.tensor(v) for k, v in parts.items()}, vector)
        ln2 = math.log(2.0)
        out = {k: (float(v), 1.0) for k, v in terms.items()}
        out.update({
            "lm_loss": (parts["s_nll"], parts["s_n"]),
            "bits_per_byte": (parts["s_nll"] / ln2, float(batch["n_bytes"].sum())),
            "teacher_bits_per_byte": (parts["t_nll"] / ln2, float(batch["t_bytes"].sum())),
            "next_word_agreement": (parts["agree_sum"], parts["agree_n"]),
        })
        return out

    def card_info(self):
        o = self.opts
        info = {"teacher_tokenizer": o.teacher_tokenizer or self.cfg.teacher, "temperature": o.temperature,
                "kd_loss_impl": "fused" if self._fused() else "naive"}
        if self.vmap is not None:
            info["mapped_tokens"] = self.vmap["mapped"]
        return info


def _gather_spans(dense: torch.Tensor, b: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
    """Sum of ``dense[b, lo:hi]`` per span (prefix sums; ``dense`` holds each token's log-prob at its position)."""
    prefix = torch.cat([dense.new_zeros(dense.shape[0], 1), dense.cumsum(1)], dim=1)
    return prefix[b, hi] - prefix[b, lo]


def check_temperature(t: float) -> None:
    if not 0.01 <= t <= 100:
        raise ConfigError(f"temperature must be in [0.01, 100]; got {t}")


def check_impl(impl: str) -> None:
    if impl not in ("auto", "fused", "naive"):
        raise ConfigError(f"kd_loss_impl must be auto, fused or naive; got {impl!r}")


def check_weight(name: str, value: float, hi: Optional[float] = 100.0) -> None:
    if not 0.0 <= value <= hi:
        raise ConfigError(f"{name} must be in [0, {hi:g}]; got {value}")
