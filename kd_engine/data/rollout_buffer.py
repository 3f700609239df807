"""Rollout storage for PPO-style methods (MiniLLM): per-sample tensors in, padded minibatches out.

Each rollout chunk (a ``kd_engine.models.sampling.Rollout`` plus its rewards) is split into per-sample tensors
on the CPU with their padding removed; a minibatch re-pads prompts on the left (causal LMs) or right
(encoder-decoder) and responses on the right, so chunks of different widths mix freely. ``epoch_order`` gives a
seeded shuffle per PPO epoch (same on every call for the same seed and epoch).
"""
from __future__ import annotations

from typing import Optional

import torch

_PER_TOKEN = ("student_logprobs", "teacher_logprobs", "weights", "rewards")


class RolloutBuffer:
    def __init__(self, pad_token_id: int, prompt_padding_side: str = "left"):
        self.pad_token_id = int(pad_token_id)
        self.prompt_padding_side = prompt_padding_side
        self.samples: list[dict] = []

    def __len__(self) -> int:
        return len(self.samples)

    def clear(self) -> None:
        self.samples = []

    def add(self, rollout, rewards: torch.Tensor) -> None:
        pm = rollout.prompt_mask.bool().cpu()
        rm = rollout.response_mask.bool().cpu()
        per_token = {
            "student_logprobs": rollout.student_logprobs, "teacher_logprobs": rollout.teacher_logprobs,
            "weights": rollout.weights, "rewards": rewards,
        }
        per_token = {k: v.detach().float().cpu() for k, v in per_token.items() if v is not None}
        inf = rollout.inf_mask.cpu() if rollout.inf_mask is not None else None
        for b in range(rollout.prompt_ids.shape[0]):
            n = int(rm[b].sum())
            s = {
                "prompt_ids": rollout.prompt_ids[b].cpu()[pm[b]],
                "response_ids": rollout.response_ids[b].cpu()[:n],
                **{k: v[b, :n] for k, v in per_token.items()},
            }
            if inf is not None:
                s["inf_mask"] = inf[b, :n]
            self.samples.append(s)

    def epoch_order(self, epoch: int, seed: int) -> list[int]:
        g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
        return torch.randperm(len(self.samples), generator=g).tolist()

    def collate(self, idx: list[int], device: Optional[torch.device] = None) -> dict[str, torch.Tensor]:
        from torch.nn.utils.rnn import pad_sequence

        rows = [self.samples[i] for i in idx]
        left = self.prompt_padding_side == "left"

        def pad(seqs, value, left_pad=False):
            if left_pad:
                return pad_sequence([s.flip(0) for s in seqs], batch_first=True, padding_value=value).flip(1)
            return pad_sequence(seqs, batch_first=True, padding_value=value)

        prompts = [r["prompt_ids"] for r in rows]
        out = {
            "prompt_ids": pad(prompts, self.pad_token_id, left),
            "prompt_mask": pad([torch.ones_like(p) for p in prompts], 0, left),
            "response_ids": pad([r["response_ids"] for r in rows], self.pad_token_id),
            "response_mask": pad([torch.ones_like(r["response_ids"]) for r in rows], 0),
        }
        for k in _PER_TOKEN:
            if k in rows[0]:
                out[k] = pad([r[k] for r in rows], 1.0 if k == "weights" else 0.0)
        if "inf_mask" in rows[0]:
            out["inf_mask"] = pad([r["inf_mask"] for r in rows], False)
        if device is not None:
            out = {k: v.to(device) for k, v in out.items()}
        return out
