"""Example method: a causal LM student matches the teacher's next-token logits (mean squared error) plus the LM loss."""
from dataclasses import dataclass

import torch

from kd_engine.data.supervised import build_supervised_data
from kd_engine.losses.kd import hard_cross_entropy, shift_for_causal_lm
from kd_engine.methods.base import Method, register
from kd_engine.models.build import load_or_build_student, load_teacher_model


@dataclass
class LogitMSEOptions:
    mse_weight: float = 1.0  # weight of the logit MSE term (--mse_weight)


@register("logit_mse")
class LogitMSE(Method):
    """Logit matching (MSE) + LM loss for causal LMs."""

    Options = LogitMSEOptions
    lm_loss_key = "lm_loss"  # the engine reports perplexity = exp(lm_loss), teacher_perplexity from teacher_lm_loss

    def load_teacher(self, ctx):
        return load_teacher_model(self.cfg, "causal_lm")

    def load_student(self, ctx, teacher):
        return load_or_build_student(self.cfg, teacher, "causal_lm")

    def build_data(self, ctx):  # --train_file / --eval_file / --eval_split / --max_*_samples, one rule for all
        return build_supervised_data(self.cfg, ctx.tokenizer, "causal_lm")

    def _logits(self, ctx, batch):
        inputs = {k: batch[k] for k in ("input_ids", "attention_mask")}
        s, labels = shift_for_causal_lm(ctx.student(**inputs).logits, batch["labels"])
        t, _ = shift_for_causal_lm(ctx.teacher_forward(**inputs).logits, batch["labels"])  # no grad, timed
        return s.float(), t.float(), labels

    def compute_loss(self, ctx, batch):  # named terms; the engine sums, backpropagates, steps and logs them
        s, t, labels = self._logits(ctx, batch)
        real = (labels != -100).float()
        mse = (((s - t) ** 2).mean(-1) * real).sum() / real.sum().clamp_min(1.0)
        return {"mse": self.opts.mse_weight * mse, "lm": hard_cross_entropy(s, labels)}

    @torch.no_grad()
    def eval_step(self, ctx, batch):  # {metric: (sum, count)}: the engine sums over batches and ranks
        s, t, labels = self._logits(ctx, batch)
        n = float((labels != -100).sum())
        return {"lm_loss": (float(hard_cross_entropy(s, labels)) * n, n),
                "teacher_lm_loss": (float(hard_cross_entropy(t, labels)) * n, n)}
