"""Cross-tokenizer KD (hybrid, in the spirit of TRL's GOLD): exact where the vocabularies agree, ULD where not.

At the start of every character-aligned span (``data.token_alignment``) both models predict a next token after the
same prefix text. There the loss takes

- ``kd``: ``alpha * T^2 * KL`` over the vocabulary part that maps one to one (``data.vocab_map``: tokens that spell
  the same text), plus one outcome holding each side's unmapped mass (``losses.xtoken.mapped_kl``);
- ``uld``: ``uld_weight * L1`` of the sorted unmapped probabilities (ULD on the remainder);

and over every span one model spells in several tokens, the span's text probability by the chain rule:

- ``span``: ``span_weight * KL(Bernoulli(P_teacher(span)) || Bernoulli(P_student(span)))``, exact;
- ``ce``: ``(1 - alpha) *`` the student's cross-entropy on the text.

With one tokenizer on both sides every token maps, every span is one token on each side, ``uld`` and ``span``
are 0 and the loss is ``kd``'s (forward KL, same alpha and temperature; tested). What it assumes: that a mapped
token means the same continuation to both models (true for the same string after the same prefix, up to how
each tokenizer would split what follows); the span term assumes nothing. Causal LMs.

On-policy (``--lmbda`` > 0, ``methods._xtoken_onpolicy``): that share of micro-batches is the student's own
continuations of the rows' beginnings, re-tokenized by the teacher and aligned again; the loss covers the
continuation's spans, without the CE term. Logged per step: ``on_policy`` (share of sampled micro-batches).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from ..errors import ConfigError
from . import _xtoken
from ._xtoken_onpolicy import OnPolicy
from .base import register


@dataclass
class XTokenKDOptions:
    HELP = dict(_xtoken.HELP, **{
        "alpha": "weight of the mapped-vocabulary KL term, 1 - alpha goes to the student's CE; default 0.5 as kd's "
                 "LM mix (MiniLLM's word-level KD baseline mixes 0.5 LM + 0.5 KD)",
        "uld_weight": "weight of ULD (sorted L1) over the unmapped rest of both vocabularies",
        "span_weight": "weight of the exact span term: Bernoulli KL of the chain-rule probability of each span one "
                       "side spells in several tokens",
        "temperature": "softmax temperature of the KL and ULD terms (T^2-scaled KL); default 1.0, the LM recipe",
    })
    alpha: float = 0.5
    uld_weight: float = 1.0
    span_weight: float = 1.0
    temperature: float = 1.0
    teacher_tokenizer: Optional[str] = None
    kd_loss_impl: str = "auto"
    lmbda: float = 0.0  # share of micro-batches on the student's own samples (on-policy, GKD's lmbda); 0 = off
    max_new_tokens: int = 32  # tokens the student samples per on-policy row
    gen_temperature: float = 1.0  # the student's sampling temperature (on-policy rows)
    onpolicy_prompt_tokens: int = 16  # content tokens of each row the student continues (on-policy rows)

    def validate(self) -> None:
        if not 0.0 <= self.lmbda <= 1.0:
            raise ConfigError(f"lmbda must be in [0, 1]; got {self.lmbda}")
        if self.max_new_tokens < 1 or self.onpolicy_prompt_tokens < 1:
            raise ConfigError("max_new_tokens and onpolicy_prompt_tokens must be >= 1")
        if not 0.0 < self.gen_temperature <= 100:
            raise ConfigError(f"gen_temperature must be in (0, 100]; got {self.gen_temperature}")
        _xtoken.check_weight("alpha", self.alpha, 1.0)
        _xtoken.check_weight("uld_weight", self.uld_weight)
        _xtoken.check_weight("span_weight", self.span_weight)
        _xtoken.check_temperature(self.temperature)
        _xtoken.check_impl(self.kd_loss_impl)


@register("xtoken_kd")
class CrossTokenizerKD(OnPolicy, _xtoken.CrossTokenizerMethod):
    """Hybrid cross-tokenizer KD: mapped-vocabulary KL + ULD on the rest + exact span term + CE."""

    Options = XTokenKDOptions
    uses_spans = True

    def __init__(self, cfg, opts):
        super().__init__(cfg, opts)
        self.init_draws(cfg.seed)

    def setup(self, ctx) -> None:
        self.setup_draws(ctx)

    def compute_loss(self, ctx, batch):
        on = self.flip()
        if on:
            batch = self.student_batch(ctx, batch)
        names, vector = self._parts(ctx, batch)
        terms = self.combine(dict(zip(names, vector)), vector)
        if on and "ce" in terms:
            terms["ce"] = terms["ce"] * 0.0  # no CE on the student's own samples
        return terms, {"on_policy": float(on)}

    def pair_kinds(self):
        return ("kl", "uld_rest")

    def combine(self, parts, like):
        o = self.opts
        terms = {"kd": o.alpha * o.temperature ** 2 * parts["kl"], "uld": o.uld_weight * parts["uld_rest"],
                 "span": o.span_weight * parts["span_bkl"]}
        if o.alpha < 1.0:
            terms["ce"] = (1.0 - o.alpha) * parts["ce"]
        return terms

    def card_info(self):
        o = self.opts
        return dict(super().card_info(), alpha=o.alpha, uld_weight=o.uld_weight, span_weight=o.span_weight,
                    lmbda=o.lmbda, on_policy_share=self.on_policy_share())
