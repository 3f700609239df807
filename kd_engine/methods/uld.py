"""ULD, the Universal Logit Distillation loss (Boizard et al. 2024): distillation across tokenizers by the
closed-form 1-D Wasserstein distance between sorted probability vectors.

Loss: ``ce_weight * CE + uld_weight * mean over compared pairs of sum_i |sort(p)_i - sort(q)_i|`` with the teacher's
``p`` and the student's ``q`` at temperature ``temperature``, the shorter vocabulary padded with zeros. Pairs
(``--alignment``): ``position`` (the paper's: the i-th token of each tokenization, cut to the shorter) or
``span`` (ours: the first token of each aligned span, where both models predict after the same prefix text).
Assumes nothing about the vocabularies; exact in neither case: ULD compares distribution *profiles*, and is 0 for
any permutation of the same probabilities (it teaches how confident to be, not which token). Causal LMs.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from ..errors import ConfigError
from . import _xtoken
from .base import register


@dataclass
class ULDOptions:
    HELP = dict(_xtoken.HELP, **{
        "uld_weight": "lambda, weight of the ULD term; the paper tunes it per task, 1.0 (default) is the plain sum "
                      "with the CE term",
        "alignment": "position (default; the paper's i-th token pairs) | span (the starts of character-aligned "
                     "spans, kd_engine.data.token_alignment)",
    })
    uld_weight: float = 1.0
    ce_weight: float = 1.0  # weight of the student's cross-entropy on the text (the paper's CE term)
    temperature: float = 1.0  # softmax temperature of both models in the ULD term
    alignment: str = "position"
    teacher_tokenizer: Optional[str] = None
    kd_loss_impl: str = "auto"

    def validate(self) -> None:
        _xtoken.check_weight("uld_weight", self.uld_weight)
        _xtoken.check_weight("ce_weight", self.ce_weight)
        _xtoken.check_temperature(self.temperature)
        _xtoken.check_impl(self.kd_loss_impl)
        if self.alignment not in ("position", "span"):
            raise ConfigError(f"alignment must be position or span; got {self.alignment!r}")


@register("uld")
class ULD(_xtoken.CrossTokenizerMethod):
    """ULD: CE + lambda * L1 of sorted teacher/student probabilities (any two tokenizers)."""

    Options = ULDOptions

    def __init__(self, cfg, opts):
        super().__init__(cfg, opts)
        self.pair_mode = opts.alignment

    def pair_kinds(self):
        return ("uld",)

    def combine(self, parts, like):
        o = self.opts
        return {"uld": o.uld_weight * parts["uld"], "ce": o.ce_weight * parts["ce"]}

    def card_info(self):
        return dict(super().card_info(), uld_weight=self.opts.uld_weight, alignment=self.opts.alignment)
