"""Build the DataBundle of supervised methods (kd, sft) from the engine config: files -> tokens -> batches.

Tasks: ``classification`` (text [+ pair] -> label), ``causal_lm`` (plain text, or prompt in ``text_column`` +
response in ``target_column`` with the loss on the response only) and ``seq2seq_lm`` (source ``text_column`` ->
target ``target_column``).
"""
from __future__ import annotations

import hashlib
import logging
import os
from typing import Optional

from ..dist import main_process_first
from ..errors import KDError
from ..paths import cache_dir
from .bundle import DataBundle
from .collate import PadCollator
from .files import require_columns
from .split import load_split_tables
from .tokenize import tokenize_dataset

logger = logging.getLogger(__name__)


def _cache_dir() -> str:
    return cache_dir("tokenized")


def _pair_encode(ds, tokenizer, cfg, task: str, name: str):
    """Prompt/response (causal LM: loss on the response) or source/target (seq2seq) tokenization."""
    src, tgt, max_len = cfg.text_column, cfg.target_column, cfg.max_length
    require_columns(ds, [src, tgt], name)
    key = hashlib.sha256(repr((ds._fingerprint, tokenizer.name_or_path, len(tokenizer), src, tgt, max_len,
                               task)).encode()).hexdigest()[:32]
    eos = tokenizer.eos_token_id

    def encode(batch):
        out = {"input_ids": [], "attention_mask": [], "labels": [], "length": []}
        if task == "seq2seq_lm":
            enc = tokenizer(batch[src], truncation=True, max_length=max_len)
            lab = tokenizer(text_target=batch[tgt], truncation=True, max_length=max_len)["input_ids"]
            out.update(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"], labels=lab,
                       length=[len(x) for x in enc["input_ids"]])
            return out
        for p, r in zip(batch[src], batch[tgt]):
            pi = tokenizer(p, add_special_tokens=True)["input_ids"]
            ri = tokenizer(r, add_special_tokens=False)["input_ids"] + ([eos] if eos is not None else [])
            ri = ri[:max_len]
            pi = pi[-(max_len - len(ri)):] if len(pi) + len(ri) > max_len else pi  # keep the prompt's end
            ids = pi + ri
            out["input_ids"].append(ids)
            out["attention_mask"].append([1] * len(ids))
            out["labels"].append([-100] * len(pi) + ri)
            out["length"].append(len(ids))
        return out

    cache = os.path.join(_cache_dir(), f"pair-{key}.arrow")
    os.makedirs(os.path.dirname(cache), exist_ok=True)
    return ds.map(encode, batched=True, remove_columns=ds.column_names, new_fingerprint=key, cache_file_name=cache,
                  desc="tokenizing")


def _chat_encode(ds, tokenizer, cfg, task: str, name: str):
    """Conversations -> input_ids / labels on the assistant tokens (``data.chat``), cut at max_length."""
    from datasets import Dataset

    from .chat import check_chat_tokenizer, check_messages, encode_conversation

    if task != "causal_lm":
        raise KDError(f"--messages_column is for causal LMs (chat templates); this run's task is {task}")
    check_chat_tokenizer(tokenizer, name)
    require_columns(ds, [cfg.messages_column], name)
    out: dict[str, list] = {"input_ids": [], "attention_mask": [], "labels": [], "length": []}
    cut = 0
    for i, value in enumerate(ds[cfg.messages_column]):
        messages = check_messages(value, i, name)
        ex = encode_conversation(tokenizer, messages, cfg.max_length, f"{name}, row {i + 1}")
        if ex is None:
            cut += 1
            continue
        for k in out:
            out[k].append(ex[k])
    if cut:
        logger.warning("%s: %d conversation(s) dropped: no assistant token within max_length %d", name, cut,
                       cfg.max_length)
    if not out["input_ids"]:
        raise KDError(f"{name}: no conversation keeps an assistant token within max_length {cfg.max_length}")
    return Dataset.from_dict(out)


def _tokenize(ds, tokenizer, cfg, task: str, label2id, name: str):
    if cfg.messages_column:
        return _chat_encode(ds, tokenizer, cfg, task, name)
    if task == "seq2seq_lm" and not cfg.target_column:
        raise KDError("seq2seq data needs --target_column (the column holding the target text)")
    if task == "seq2seq_lm" or (task == "causal_lm" and cfg.target_column):
        return _pair_encode(ds, tokenizer, cfg, task, name)
    return tokenize_dataset(ds, tokenizer, text_column=cfg.text_column, text_pair_column=cfg.text_pair_column,
                            label_column=cfg.label_column if task == "classification" else None, label2id=label2id,
                            max_length=cfg.max_length, task="causal_lm" if task == "causal_lm" else "classification",
                            cache_dir=_cache_dir(), name=name)


def build_supervised_data(cfg, tokenizer, task: str, label2id: Optional[dict] = None) -> DataBundle:
    if not cfg.train_file:
        raise KDError("no training data: pass --train_file PATH (txt, jsonl, json, csv, tsv or a hub dataset id)")
    if task == "classification" and not cfg.label_column:
        raise KDError("classification needs --label_column (the column holding the labels)")
    train_raw, eval_raw = load_split_tables(cfg)
    ev = None
    with main_process_first():  # rank 0 tokenizes into the cache, the other ranks load it
        train = _tokenize(train_raw, tokenizer, cfg, task, label2id, cfg.train_file)
        if eval_raw is not None:
            ev = _tokenize(eval_raw, tokenizer, cfg, task, label2id,
                           cfg.eval_file or f"{cfg.train_file} (held-out {cfg.eval_split:.0%})")
    info = {"train_examples": len(train), "eval_examples": len(ev) if ev is not None else 0}
    if cfg.packing:
        if task != "causal_lm":
            raise KDError(f"--packing is for causal LMs; this run's task is {task} (one example per row)")
        from .packing import PackedCollator, PackedDataset

        packed = PackedDataset(train, cfg.max_length)
        info.update(packed_rows=len(packed))
        logger.info("packing: %d examples in %d rows of up to %d tokens (%.1f%% of the row tokens are real)",
                    packed.examples, len(packed), cfg.max_length,
                    100.0 * sum(packed.lengths) / max(len(packed) * cfg.max_length, 1))
        # one collator for both: evaluation rows (one example each) get position ids and a padding segment too
        return DataBundle(train=packed, eval=ev, collate_fn=PackedCollator(tokenizer.pad_token_id),
                          train_lengths=packed.lengths, info=info)
    collate = PadCollator(tokenizer.pad_token_id, padding_side="right")
    return DataBundle(train=train, eval=ev, collate_fn=collate,
                      train_lengths=train.with_format("arrow")["length"].to_pylist(), info=info)
