"""Teacher-forced logits of a response given its prompt, aligned so that position t predicts response token t.

Causal LMs: the model reads ``[prompt; response]`` (prompt left-padded, response right-padded), position ids are
``cumsum(mask) - 1``, and the logits at positions ``P-1 .. P+T-2`` are returned (one forward, only the last
``T+1`` positions projected to the vocabulary).

Encoder-decoder models (T5, BART; as the seq2seq MiniLLM reference code, Fabio-Klinge/MiniLLM_Seq2Seq): the prompt
goes to the model's OWN encoder,
``decoder_input_ids = [decoder_start] + response[:-1]`` (the start token exactly once, never taken from the
response), the decoder mask comes from the response mask (never from the encoder mask), and logit t predicts
response token t with no prompt offset.
"""
from __future__ import annotations

import inspect

import torch

from ..errors import KDError


def decoder_start_token_id(model) -> int:
    """The model's own decoder start token (config, then generation config)."""
    start = getattr(model.config, "decoder_start_token_id", None)
    if start is None and getattr(model, "generation_config", None) is not None:
        start = model.generation_config.decoder_start_token_id
    if start is None:
        raise KDError(f"encoder-decoder model {type(model).__name__} has no decoder_start_token_id in its config")
    return int(start)


def is_encoder_decoder(model) -> bool:
    return bool(getattr(model.config, "is_encoder_decoder", False))


def position_ids_from_mask(mask: torch.Tensor) -> torch.Tensor:
    """Left-padding-aware positions: ``cumsum(mask) - 1``, pads set to 1 (as Hugging Face generate does)."""
    pos = mask.long().cumsum(-1) - 1
    return pos.masked_fill(mask == 0, 1)


def accepts_logits_to_keep(model) -> bool:
    try:
        return "logits_to_keep" in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False


def decoder_inputs(response_ids: torch.Tensor, response_mask: torch.Tensor, start: int):
    """``[start] + y[:-1]`` and its mask ``[1] + mask[:-1]`` for a right-padded response ``y``."""
    B = response_ids.shape[0]
    first = torch.full((B, 1), start, dtype=response_ids.dtype, device=response_ids.device)
    dec_ids = torch.cat([first, response_ids[:, :-1]], dim=1)
    dec_mask = torch.cat([torch.ones_like(response_mask[:, :1]), response_mask[:, :-1]], dim=1)
    return dec_ids, dec_mask


def response_logits(
    model,
    prompt_ids: torch.Tensor,
    prompt_mask: torch.Tensor,
    response_ids: torch.Tensor,
    response_mask: torch.Tensor,
    module=None,
) -> torch.Tensor:
    """Logits ``[B, T, V']`` with row t predicting ``response_ids[:, t]`` (dtype of the model; cast later).

    ``model`` is what gets called (an HF model, a DeepSpeed engine, a timed no-grad teacher wrapper); ``module``
    is the underlying HF model whose config and forward signature are read (default: ``model``).
    """
    module = model if module is None else module
    T = response_ids.shape[1]
    if is_encoder_decoder(module):
        dec_ids, dec_mask = decoder_inputs(response_ids, response_mask, decoder_start_token_id(module))
        out = model(
            input_ids=prompt_ids,
            attention_mask=prompt_mask,
            decoder_input_ids=dec_ids,
            decoder_attention_mask=dec_mask,
            use_cache=False,
        )
        return out.logits
    ids = torch.cat([prompt_ids, response_ids], dim=1)
    mask = torch.cat([prompt_mask.long(), response_mask.long()], dim=1)
    kwargs = {"logits_to_keep": T + 1} if accepts_logits_to_keep(module) else {}
    pos = position_ids_from_mask(mask)
    out = model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=False, **kwargs)
    return out.logits[:, -(T + 1) : -1]
