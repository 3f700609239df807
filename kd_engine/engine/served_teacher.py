"""A student rank's stand-in for the teacher when a teacher group serves final hidden states (``--teacher_ranks``
with a loss that needs the teacher's whole output distribution: kd with ``--divergence reverse_kl`` / ``jsd``, gkd
with the student's own samples, minillm).

The teacher group sends, once at start-up, its output layer's weight ``[V, H]``, and per call the hidden states that
enter that layer ``[B, L, H]`` (in the teacher's dtype). ``ServedTeacher`` is an ``nn.Module`` whose forward asks the
service for them and applies the output layer itself, so the methods' code paths stay as they are: the fused loss
(``models.lm_head.hidden_states`` captures what enters ``get_output_embeddings()``, and the teacher's weight is read
from it) and the naive one (``.logits``) both see exactly what a co-located teacher gives. At the size users run
(a 70B Llama teacher: V 128256, H 8192) the layer is 2.1 GB of bf16 on each student rank, and an answer is H values
per token (16 KB in bf16), 16 times fewer than dense logits.

Rollouts (``models.sampling.mixed_sample``, minillm's teacher-mixed sampling): ``rollout_state`` gives a decoding
state whose KV cache lives on the teacher group (``ServedRollout``): the prompt once (an encoder-decoder's encoder runs
on it there, once), then one token per row per step, each answered with the hidden state of the newest position.
"""
from __future__ import annotations

from types import SimpleNamespace

import torch

DTYPES = (torch.float32, torch.bfloat16, torch.float16)  # the wire code of a floating tensor: its index here


def wire(t: torch.Tensor) -> torch.Tensor:
    """An integer view of a floating tensor (gloo moves bytes; the view keeps bf16 / fp16 exact)."""
    return t.contiguous().view(torch.int32 if t.element_size() == 4 else torch.int16)


def dtype_code(dtype: torch.dtype) -> int:
    return DTYPES.index(dtype)


class ServedTeacher(torch.nn.Module):
    """The teacher as the methods call it: ``forward(**inputs).logits`` from served hidden states and the teacher's
    output layer held here (frozen)."""

    def __init__(self, client, weight: torch.Tensor, config=None):
        super().__init__()
        self.client, self.config = client, config  # the teacher's config (is_encoder_decoder, decoder start)
        self.head = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=False, device="meta")
        self.head.weight = torch.nn.Parameter(weight, requires_grad=False)
        self.eval()

    def get_output_embeddings(self) -> torch.nn.Module:
        return self.head

    def forward(self, input_ids, attention_mask=None, decoder_input_ids=None, decoder_attention_mask=None,
                position_ids=None, logits_to_keep: int = 0, use_cache=None, **other):
        if other:
            raise RuntimeError(f"the teacher service takes ids, masks and positions only, not {sorted(other)}")
        hidden = self.client.hidden(input_ids, attention_mask, decoder_input_ids, decoder_attention_mask,
                                    position_ids, int(logits_to_keep or 0))
        return SimpleNamespace(logits=self.logits(hidden))

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.head(hidden.to(self.head.weight.device))

    def rollout_state(self, input_ids, attention_mask):
        return ServedRollout(self, input_ids, attention_mask)


class ServedRollout:
    """The teacher's decoding state for ``mixed_sample`` (``first()`` / ``step(tokens)`` -> next-token logits
    ``[B, V]``), kept on the teacher group: the same positions and KV cache as a co-located teacher's (causal LMs:
    the left-padded prompt; encoder-decoders: the encoder output of the prompt and the decoder's cache)."""

    def __init__(self, teacher: ServedTeacher, input_ids, attention_mask):
        self.teacher, self.ids, self.mask = teacher, input_ids, attention_mask

    def first(self) -> torch.Tensor:
        return self.teacher.logits(self.teacher.client.rollout_start(self.ids, self.mask))[:, -1]

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.teacher.logits(self.teacher.client.rollout_step(tokens))[:, -1]
