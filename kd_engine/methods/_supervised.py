"""Helpers shared by the supervised methods (kd, sft): model inputs, logit/label alignment, evaluation metrics."""
from __future__ import annotations

import torch

from ..losses.kd import hard_cross_entropy, kl_div_rows, shift_for_causal_lm


def aligned_logits(task: str, logits: torch.Tensor, labels: torch.Tensor):
    """Logit rows and the labels they predict (causal LMs predict the next token)."""
    if task == "causal_lm":
        return shift_for_causal_lm(logits, labels)
    return logits, labels


def model_inputs(batch: dict) -> dict:
    """The batch's model inputs. Packed rows (position ids, no attention mask) also get ``use_cache=False``:
    transformers creates a KV cache in every forward that does not say so, even in training, and with a cache it
    skips the packed-sequence detection, so the examples of a row would attend to each other."""
    out = {k: v for k, v in batch.items() if k in ("input_ids", "attention_mask", "token_type_ids", "position_ids",
                                                    "decoder_input_ids", "decoder_attention_mask")}
    if "position_ids" in out and "attention_mask" not in out:
        out["use_cache"] = False
    return out


def seq2seq_inputs(model, batch: dict) -> dict:
    """Decoder inputs from the labels, start token once (``prepare_decoder_input_ids_from_labels``)."""
    inputs = model_inputs(batch)
    if "labels" in batch and "decoder_input_ids" not in inputs:
        inputs["decoder_input_ids"] = model.prepare_decoder_input_ids_from_labels(labels=batch["labels"])
        inputs["decoder_attention_mask"] = (batch["labels"] != -100).long()
    return inputs


def evaluation_metrics(task, s, t, labels, vocab_size, temperature) -> dict:
    """Student loss, accuracy and agreement with the teacher, as (sum, count) pairs over real rows."""
    mask = labels != -100
    n = float(mask.sum())
    if n == 0:
        return {}
    s_v = s[..., :vocab_size] if vocab_size else s
    pred = s_v.argmax(-1)
    loss_key = "lm_loss" if task != "sequence_classification" else "ce_loss"
    out = {loss_key: (float(hard_cross_entropy(s, labels, vocab_size)) * n, n),
           "accuracy": (float(((pred == labels) & mask).sum()), n)}
    if t is not None:
        t_v = t[..., :vocab_size] if vocab_size else t
        out["teacher_agreement"] = (float(((pred == t_v.argmax(-1)) & mask).sum()), n)
        out["kd_kl"] = (float(kl_div_rows(s, t, temperature, mask, vocab_size)) * n, n)
        out["teacher_accuracy"] = (float(((t_v.argmax(-1) == labels) & mask).sum()), n)
        out["teacher_" + loss_key] = (float(hard_cross_entropy(t, labels, vocab_size)) * n, n)
    return out


def chunked_evaluation_metrics(task, s_hidden, s_weight, t_hidden, t_weight, labels, vocab_size, temperature,
                               chunk_rows=None) -> dict:
    """``evaluation_metrics`` from the inputs of the output layers (aligned with ``labels``; shift causal LMs
    first), a chunk of real rows at a time: no ``[rows x vocab]`` logits of either model beyond one chunk."""
    from ..losses.fused_kd import chunk_rows_for

    vocab = int(vocab_size or s_weight.shape[0])
    flat_y = labels.reshape(-1)
    idx = (flat_y != -100).nonzero().squeeze(-1)
    fs = s_hidden.reshape(-1, s_hidden.shape[-1])
    ft = t_hidden.reshape(-1, t_hidden.shape[-1]) if t_hidden is not None else None
    ws = s_weight[:vocab].float()
    wt = t_weight[:vocab].float() if t_weight is not None else None
    out: dict = {}
    step = chunk_rows_for(vocab, chunk_rows)
    for start in range(0, idx.numel(), step):
        rows = idx[start:start + step]
        s = fs[rows].float() @ ws.T
        t = ft[rows].float() @ wt.T if ft is not None else None
        for k, (total, n) in evaluation_metrics(task, s, t, flat_y[rows], None, temperature).items():
            old = out.get(k, (0.0, 0.0))
            out[k] = (old[0] + total, old[1] + n)
    return out

