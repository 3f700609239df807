"""Generalized knowledge distillation (GKD, Agarwal et al., ICLR 2024; TRL's ``GKDTrainer``): token-level
generalized JSD between teacher and student on responses that are, per micro-batch, the student's own samples
(on-policy, with probability ``lmbda``) or fixed responses (the dataset's targets, or with ``--seq_kd true`` the
teacher's cached responses, as ``seqkd`` makes them).

- Loss: ``T^2 * mean over response tokens of JSD_beta(p_T || q_T)`` over the full vocabulary in fp32, through
  ``kd``'s loss paths (``--kd_loss_impl auto``: the fused chunked loss for LMs, ``naive``: full logits;
  ``losses.divergences``: ``beta = 0`` is forward KL (Hinton KD), ``beta = 1`` reverse KL, in between
  ``beta KL(p || m) + (1 - beta) KL(q || m)`` with ``m = beta p + (1 - beta) q``, TRL's definition). TRL divides
  the logits by ``temperature`` without the ``T^2`` factor: identical at the default ``temperature 1``.
- On-policy responses: the student samples with the KV-cached sampler (``gen_temperature``, ``gen_top_k``,
  ``gen_top_p``, ``max_new_tokens``; dropout off while sampling). The coin flip of each micro-batch comes from a
  generator seeded by ``--seed`` alone (the same on every rank: under ZeRO-3 all ranks must generate together),
  the samples from a per-rank generator; both are checkpointed (method state), so a resumed run flips and samples
  exactly as a straight run (TRL draws from Python's global ``random`` and does not store it).
- Logged per step: ``kd`` (the JSD term), ``on_policy`` (share of this step's micro-batches that were sampled).
"""
from __future__ import annotations

from dataclasses import dataclass

from ..data.prompt_response import with_responses
from ..errors import ConfigError, KDError
from ._draws import SeededDraws
from ._responses import ResponseMethod, ResponseOptions, check_generation
from .base import register


@dataclass
class GKDOptions(ResponseOptions):
    beta: float = 0.5  # generalized JSD weight: 0 = forward KL, 1 = reverse KL
    lmbda: float = 0.5  # share of micro-batches whose responses the student samples (on-policy)
    seq_kd: bool = False  # off-policy responses: the teacher's (cached, as seqkd) instead of the dataset's
    temperature: float = 1.0  # softmax temperature of both models in the loss (T^2-scaled)
    kd_loss_impl: str = "auto"  # auto (fused) | fused | naive
    gen_temperature: float = 1.0  # student sampling temperature
    gen_top_k: int = 0  # student sampling top-k (0 = off)
    gen_top_p: float = 1.0  # student sampling nucleus top-p

    divergence = "jsd"

    def validate(self) -> None:
        super().validate()
        if not 0.0 <= self.beta <= 1.0:
            raise ConfigError(f"beta must be in [0, 1]; got {self.beta}")
        if not 0.0 <= self.lmbda <= 1.0:
            raise ConfigError(f"lmbda must be in [0, 1]; got {self.lmbda}")
        if self.temperature <= 0:
            raise ConfigError(f"temperature must be > 0; got {self.temperature}")
        if self.kd_loss_impl not in ("auto", "fused", "naive"):
            raise ConfigError(f"kd_loss_impl must be auto, fused or naive; got {self.kd_loss_impl!r}")
        check_generation("gen_", self.gen_temperature, self.gen_top_k, self.gen_top_p)

    def needs_teacher_responses(self) -> bool:
        return self.seq_kd and self.lmbda < 1.0

    def needs_dataset_targets(self) -> bool:
        return self.lmbda < 1.0 and not self.seq_kd


@register("gkd")
class GKD(SeededDraws, ResponseMethod):
    """Generalized KD: JSD(beta) on student samples (share lmbda) and on dataset or teacher responses."""

    Options = GKDOptions
    supports_teacher_service = True  # --teacher_ranks: served hidden states (divergence jsd, see LogitKD)

    def __init__(self, cfg, opts):
        super().__init__(cfg, opts)
        self.init_draws(cfg.seed)

    def setup(self, ctx) -> None:
        super().setup(ctx)
        self.setup_draws(ctx)

    def compute_loss(self, ctx, batch):
        on = self.flip()
        if on:
            o = self.opts
            responses = self.sample(ctx, ctx.student.module, batch, do_sample=True, temperature=o.gen_temperature,
                                    top_k=o.gen_top_k, top_p=o.gen_top_p, generator=self.sampler_gen)
            batch = with_responses(self.collate, batch, responses, ctx.device)
        elif "labels" not in batch:
            raise KDError("gkd: an off-policy batch has no responses (pass --target_column or --seq_kd true)")
        return super().compute_loss(ctx, batch), {"on_policy": float(on)}

    def card_info(self):
        o = self.opts
        info = super().card_info()
        info.update(beta=o.beta, lmbda=o.lmbda, seq_kd=o.seq_kd, temperature=o.temperature,
                    kd_loss_impl="fused" if self._fused() else "naive", on_policy_share=self.on_policy_share())
        return info
