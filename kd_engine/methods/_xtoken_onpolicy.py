"""On-policy micro-batches for the cross-tokenizer hybrid (GKD's student-sample path, GOLD's setting).

With probability ``lmbda`` per micro-batch (one draw each, from a generator seeded by ``--seed`` alone: under
ZeRO-3 every rank must generate together) the student continues the first ``onpolicy_prompt_tokens`` content
tokens of each plain-text row, or answers the prompt of a prompt + response row, with up to ``max_new_tokens``
sampled tokens (the KV-cached sampler of ``models.sampling``; the
samples from a per-rank generator). The row's text becomes the student's decoded prompt + continuation; both
tokenizers encode that text again and it is aligned again (``data.xtoken.paired_example``), and the loss keeps only
the spans inside the continuation. The student's CE is not applied to its own samples (its term is 0 for such a
micro-batch). The draws are ``_draws.SeededDraws``'s (checkpointed: a resumed run flips and samples as a straight
one).
"""
from __future__ import annotations

import torch

from ..data.collate import to_device
from ..data.xtoken import encode_side, paired_example
from ._draws import SeededDraws


class OnPolicy(SeededDraws):
    """Seeded draws (``_draws``) plus the cross-tokenizer sample path; the method's options carry ``lmbda``,
    ``max_new_tokens``, ``gen_temperature``, ``onpolicy_prompt_tokens``."""

    def student_batch(self, ctx, batch: dict) -> dict:
        """The micro-batch with every row's text replaced by the student's continuation of its beginning."""
        from ..models.sampling import mixed_sample

        o, s_tok, t_tok = self.opts, ctx.tokenizer, self.t_tok
        prompts = []
        for ids, lab in zip(batch["input_ids"].tolist(), batch["labels"].tolist()):
            content = [k for k, y in enumerate(lab) if y != -100]
            if content and content[0] > 1:  # prompt + response rows: the student answers the prompt itself
                end = content[0]
            else:  # plain text: the student continues the row's first tokens
                end = content[min(o.onpolicy_prompt_tokens, len(content)) - 1] + 1 if content else 1
            prompts.append(ids[:end])
        width = max(len(p) for p in prompts)
        pad = s_tok.pad_token_id
        p_ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts], device=ctx.device)  # left-padded
        p_mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=ctx.device)
        r = mixed_sample(ctx.student.module, None, p_ids, p_mask, max_new_tokens=o.max_new_tokens,
                         eos_token_id=s_tok.eos_token_id, pad_token_id=pad, alpha=0.0, temperature=o.gen_temperature,
                         do_sample=True, generator=self.sampler_gen, vocab_size=len(s_tok),
                         synced_ranks=ctx.world_size > 1)
        examples = []
        for prompt, resp, m in zip(prompts, r.response_ids.tolist(), r.response_mask.tolist()):
            head = s_tok.decode(prompt, skip_special_tokens=True)
            text = head + s_tok.decode([t for t, k in zip(resp, m) if k], skip_special_tokens=True)
            s, t = encode_side(s_tok, [text], self.cfg.max_length)[0], encode_side(t_tok, [text], self.cfg.max_length)[0]
            examples.append(paired_example(text, s, t, s_tok, t_tok, from_char=len(head), keep_empty=True))
        return to_device(self.data_collate(examples), ctx.device)
