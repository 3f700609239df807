"""A language model's output layer, used without computing its full logits (for the fused KD loss).

``output_layer(model)`` finds the layer (``get_output_embeddings()``: a bias-free ``[V, H]`` linear map) or raises a
``ConfigError`` naming the model and suggesting ``--kd_loss_impl naive``. ``head_replaced(model, fn)`` swaps that
layer's forward for ``fn(hidden)`` for one call of the model: whatever ``fn`` returns takes the place of the logits
in the model's output. The model computes everything up to and including what enters the head (T5's
``d_model ** -0.5`` scaling included), so the hidden states are exactly those the logits would be made from.

ZeRO-3: module hooks still run around a replaced forward (``nn.Module.__call__`` calls them), so DeepSpeed gathers
the head's weight before ``fn`` runs, fetches it again for the backward and reduces its gradient like any layer's.
Running the student's loss *inside* ``fn`` is therefore what makes the fused loss ZeRO-3 safe without
``register_external_parameter``. A weight needed outside its model's forward (the teacher's, which gets no
gradient) is gathered with ``deepspeed.zero.GatheredParameters`` (``gathered``).
"""
from __future__ import annotations

import contextlib
from typing import Callable

import torch

from ..errors import ConfigError


def output_layer(model: torch.nn.Module, who: str = "model") -> torch.nn.Module:
    name = type(model).__name__
    get = getattr(model, "get_output_embeddings", None)
    head = get() if callable(get) else None
    weight = getattr(head, "weight", None)
    if head is None or not isinstance(weight, torch.Tensor) or getattr(head, "bias", None) is not None:
        raise ConfigError(f"fused KD loss: cannot find a bias-free output layer (get_output_embeddings) in the "
                          f"{who} ({name}); use --kd_loss_impl naive")
    if getattr(getattr(model, "config", None), "final_logit_softcapping", None):
        raise ConfigError(f"fused KD loss: the {who} ({name}) soft-caps its logits after the output layer; use "
                          f"--kd_loss_impl naive")
    return head


@contextlib.contextmanager
def head_replaced(model: torch.nn.Module, fn: Callable[[torch.Tensor], torch.Tensor], who: str = "model"):
    head = output_layer(model, who)
    head.forward = fn  # instance attribute shadows the class's forward; hooks still run around it
    try:
        yield head
    finally:
        del head.forward


def capture(hidden: torch.Tensor) -> torch.Tensor:
    """Stand-in logits: an empty ``[..., 0]`` view; the caller keeps ``hidden`` itself."""
    return hidden[..., :0]


def gathered(*params: torch.Tensor):
    """ZeRO-3 partitioned parameters made whole for a block (read-only); a no-op for ordinary tensors."""
    parts = [p for p in params if hasattr(p, "ds_id")]
    if not parts:
        return contextlib.nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(parts, modifier_rank=None)


def hidden_states(model_call: Callable, model: torch.nn.Module, who: str = "teacher", **inputs) -> torch.Tensor:
    """The inputs of ``model``'s output layer for ``model_call(**inputs)``, with no logits computed."""
    box = []

    def grab(h):
        box.append(h)
        return capture(h)

    with head_replaced(model, grab, who):
        model_call(**inputs)
    if len(box) != 1:
        raise ConfigError(f"fused KD loss: the {who}'s output layer ran {len(box)} times in one forward; use "
                          f"--kd_loss_impl naive")
    return box[0]
