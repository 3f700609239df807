"""What every method that samples from its models shares: a generative task and a tokenizer that can pad."""
from __future__ import annotations

from ..models.build import generative_task, with_pad_token


class GenerativeMixin:
    """Put before the ``Method`` base: ``_task()`` is causal_lm or seq2seq_lm (else a clear error), and the tokenizer
    pads with EOS when it has no pad token."""

    def _task(self) -> str:
        if self.task is None:
            self.task = generative_task(self.opts.task, self.cfg, self.name)
        return self.task

    def load_tokenizer(self, ctx):
        return with_pad_token(super().load_tokenizer(ctx))
