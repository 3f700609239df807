"""MiniLLM's options (defaults: the reference code's, microsoft/LMOps/minillm) and the answer normalisation its
evaluation uses."""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Optional

from ..errors import ConfigError


@dataclass
class MiniLLMOptions:
    task: str = "auto"  # auto | causal_lm | seq2seq_lm
    teacher_mixed_alpha: float = 0.2  # share of the teacher in rollout sampling
    ppo_epochs: int = 4  # passes over each rollout buffer
    num_rollouts: int = 64  # prompts per rollout round on each rank (reference: 256 over 16 GPUs)
    max_prompt_length: int = 256  # prompt tokens kept (cut from the left)
    max_new_tokens: int = 256  # generated tokens per response at most
    gen_temperature: float = 1.0  # sampling temperature of rollouts
    gen_top_k: int = 0  # sampling top-k (0 = off)
    gen_top_p: float = 1.0  # sampling nucleus top-p
    gamma: float = 0.95  # discount of future rewards
    cliprange: float = 0.2  # PPO ratio clipping
    reward_scaling: float = 0.5  # scale of the reward before clipping
    cliprange_reward: float = 100.0  # clip rewards to +- this
    length_norm: bool = True  # normalise returns by response length
    whiten_advantages: bool = True  # whiten advantages per batch
    single_step_reg: bool = True  # add the single-step reverse-KL term
    pt_file: Optional[str] = None  # pretraining corpus (plain text); None: no pt term
    pt_text_column: str = "text"  # text column of --pt_file
    pt_max_length: int = 512  # tokens per pretraining example
    pt_objective: str = "auto"  # encoder-decoder: span_corruption | prefix_lm | auto (span corruption when the
    # tokenizer has <extra_id_*> sentinels); causal LMs: the LM loss (auto / lm)
    pt_noise_density: float = 0.15  # span corruption: share of corrupted tokens (T5)
    pt_mean_span_length: float = 3.0  # span corruption: mean corrupted span length (T5)
    kd_ratio: float = 0.5  # share of KD in the pretraining term
    lm_coef: float = 1.0  # weight of the pretraining term
    answer_max_tokens: int = 8  # eval: greedy answer length for answer accuracy / teacher agreement

    def check_against(self, cfg) -> None:
        """--teacher_ranks: the teacher ranks load --teacher (rollout sessions keep its KV cache, and an
        encoder-decoder's encoder output, on the teacher group)."""
        if cfg.teacher_ranks > 0 and not cfg.teacher:
            raise ConfigError("--teacher_ranks needs --teacher (the model the teacher ranks load)")

    def validate(self) -> None:
        if not 0.0 <= self.teacher_mixed_alpha <= 1.0:
            raise ConfigError(f"teacher_mixed_alpha must be in [0, 1]; got {self.teacher_mixed_alpha}")
        for k in ("ppo_epochs", "num_rollouts", "max_prompt_length", "max_new_tokens", "pt_max_length",
                  "answer_max_tokens"):
            if getattr(self, k) < 1:
                raise ConfigError(f"{k} must be >= 1; got {getattr(self, k)}")
        if self.reward_scaling <= 0 or self.cliprange <= 0 or self.gen_temperature <= 0:
            raise ConfigError("reward_scaling, cliprange and gen_temperature must be > 0")
        if not 0.0 <= self.kd_ratio <= 1.0:
            raise ConfigError(f"kd_ratio must be in [0, 1]; got {self.kd_ratio}")
        if self.pt_objective not in ("auto", "lm", "span_corruption", "prefix_lm"):
            raise ConfigError(f"pt_objective must be auto, lm, span_corruption or prefix_lm; got {self.pt_objective!r}")
        if not 0.0 < self.pt_noise_density < 1.0 or self.pt_mean_span_length < 1.0:
            raise ConfigError("pt_noise_density must be in (0, 1) and pt_mean_span_length >= 1")
        if not 0.0 < self.gen_top_p <= 1.0 or self.gen_top_k < 0:
            raise ConfigError("gen_top_p must be in (0, 1] and gen_top_k >= 0")


def first_word(text: str) -> str:
    """Lower-cased first run of letters (``"\\n Contradiction. Because"`` -> ``"contradiction"``); '' if none."""
    m = re.search(r"[a-z]+", text.lower())
    return m.group(0) if m else ""
