"""The seeded draws of on-policy methods (gkd, xtoken_kd): which micro-batches are sampled, and the samples.

``flip()`` draws once per micro-batch from a generator seeded by ``--seed`` alone (the same on every rank: under
ZeRO-3 every rank must generate together); samples come from a per-rank generator made in ``setup_draws``. Both,
and the counts, are the method's checkpointed state, so a resumed run flips and samples exactly as a straight run
(TRL draws from Python's global ``random`` and does not store it).
"""
from __future__ import annotations

from typing import Optional

import torch


class SeededDraws:
    """Mixin for a Method whose options carry ``lmbda`` (the share of sampled micro-batches)."""

    def init_draws(self, seed: int) -> None:
        self.coin = torch.Generator().manual_seed(int(seed) * 1_000_003 + 17)
        self.sampler_gen: Optional[torch.Generator] = None
        self.pending_state = None
        self.micro_batches = 0
        self.on_policy_batches = 0

    def setup_draws(self, ctx) -> None:
        self.sampler_gen = torch.Generator(device=ctx.device).manual_seed(int(self.cfg.seed) * 7919 + 104729 * ctx.rank)
        if self.pending_state is not None:
            self.load_state_dict(self.pending_state)

    def flip(self) -> bool:
        """This micro-batch on-policy? (one draw per micro-batch, whatever lmbda); counted."""
        on = bool(torch.rand((), generator=self.coin) < self.opts.lmbda)
        self.micro_batches += 1
        self.on_policy_batches += int(on)
        return on

    def on_policy_share(self) -> float:
        return self.on_policy_batches / max(self.micro_batches, 1)

    def state_dict(self) -> dict:
        state = {"coin": self.coin.get_state(), "micro_batches": self.micro_batches,
                 "on_policy_batches": self.on_policy_batches}
        if self.sampler_gen is not None:
            state["sampler"] = self.sampler_gen.get_state()
        return state

    def load_state_dict(self, state: dict) -> None:
        if not state:
            return
        if self.sampler_gen is None:  # before setup: applied there
            self.pending_state = state
            return
        self.coin.set_state(state["coin"])
        self.sampler_gen.set_state(state["sampler"])
        self.micro_batches = int(state["micro_batches"])
        self.on_policy_batches = int(state["on_policy_batches"])
        self.pending_state = None
