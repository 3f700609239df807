"""Prompt/response rows for the sequence-level methods (seqkd, gkd): tokenized once, collated two ways.

A row is ``{"prompt_ids": [...], "response_ids": [...]}`` (``response_ids`` absent until a response exists: a
dataset target, a teacher response from the SeqKD cache, or a student sample). Responses end with the EOS token
when they are complete (dataset targets always; samples when the model produced it within ``max_new_tokens``).

``PromptResponseCollator`` turns rows into one batch holding both forms:

- ``prompt_ids`` / ``prompt_mask``: the prompts alone, ready for ``models.sampling.mixed_sample`` (left-padded
  for causal LMs, right-padded for encoder-decoder models);
- when every row has a response, the supervised form that ``methods.kd`` consumes: causal LMs
  ``input_ids = prompt + response`` right-padded with ``labels`` -100 on the prompt (exactly what
  ``data.supervised`` builds for prompt/response files), encoder-decoder models ``input_ids = prompt`` and
  ``labels = response``.

``with_responses(batch, responses)`` rebuilds a batch with new responses for its prompts (on-policy samples).
"""
from __future__ import annotations

import hashlib
import logging
from typing import Optional

import torch

from ..errors import KDError
from .collate import PadCollator, to_device
from .files import load_table, require_columns

logger = logging.getLogger(__name__)


def load_prompt_rows(path: str, tokenizer, text_column: str, target_column: Optional[str], *, split: str,
                     max_rows: Optional[int], max_prompt_length: int, max_new_tokens: int,
                     messages_column: Optional[str] = None, need_response: bool = False) -> tuple[list, dict]:
    """Rows of ``path``: prompt tokens (cut from the LEFT to ``max_prompt_length``: the instruction's end is kept)
    and, when ``target_column`` is given, the target's tokens + EOS (cut to ``max_new_tokens``). Returns the rows
    and counts of cut prompts / targets. With ``messages_column`` the rows are conversations (``data.chat``): the
    prompt ends at the generation prompt of the last assistant turn, that turn is the response (required when
    ``need_response``)."""
    ds = load_table(path, split=split)
    if max_rows is not None and max_rows < len(ds):
        ds = ds.select(range(max_rows))
    if messages_column:
        return chat_prompt_rows(ds, path, tokenizer, messages_column, max_prompt_length, max_new_tokens,
                                need_response)
    require_columns(ds, [text_column] + ([target_column] if target_column else []), path)
    texts = ds[text_column]
    keep = [i for i, t in enumerate(texts) if t is not None and str(t).strip()]
    if not keep:
        raise KDError(f"{path}: no non-empty prompts in column '{text_column}'")
    if len(keep) < len(texts):
        logger.warning("%s: %d empty prompts skipped", path, len(texts) - len(keep))
    ids = tokenizer([str(texts[i]) for i in keep], add_special_tokens=True, truncation=False)["input_ids"]
    cut_prompts = sum(len(x) > max_prompt_length for x in ids)
    rows = [{"prompt_ids": list(x[-max_prompt_length:])} for x in ids]
    cut_targets = 0
    if target_column:
        eos = tokenizer.eos_token_id
        if eos is None:
            raise KDError("the tokenizer has no EOS token: responses need one to end")
        targets = [str(ds[target_column][i] or "") for i in keep]
        tids = tokenizer(targets, add_special_tokens=False)["input_ids"]
        for r, t in zip(rows, tids):
            resp = list(t) + [eos]
            cut_targets += len(resp) > max_new_tokens
            r["response_ids"] = resp[:max_new_tokens]
    return rows, {"cut_prompts": cut_prompts, "cut_targets": cut_targets}


def chat_prompt_rows(ds, path: str, tokenizer, column: str, max_prompt_length: int, max_new_tokens: int,
                     need_response: bool) -> tuple[list, dict]:
    """``load_prompt_rows`` for conversations: prompt and response rendered with the chat template."""
    from .chat import check_chat_tokenizer, check_messages, encode_prompt_response

    check_chat_tokenizer(tokenizer, path)
    require_columns(ds, [column], path)
    rows, cut_prompts, cut_targets = [], 0, 0
    for i, value in enumerate(ds[column]):
        messages = check_messages(value, i, path, need_assistant=need_response)
        prompt, response = encode_prompt_response(tokenizer, messages, f"{path}, row {i + 1}", need_response)
        cut_prompts += len(prompt) > max_prompt_length
        row = {"prompt_ids": prompt[-max_prompt_length:]}
        if response is not None and need_response:
            cut_targets += len(response) > max_new_tokens
            row["response_ids"] = response[:max_new_tokens]
        rows.append(row)
    if not rows:
        raise KDError(f"{path}: no conversations in column '{column}'")
    return rows, {"cut_prompts": cut_prompts, "cut_targets": cut_targets}


def prompts_sha256(rows: list) -> str:
    """Content hash of the rows' prompt tokens (what the teacher is asked), in order."""
    h = hashlib.sha256()
    for r in rows:
        h.update(len(r["prompt_ids"]).to_bytes(4, "little"))
        h.update(torch.tensor(r["prompt_ids"], dtype=torch.int64).numpy().tobytes())
    return h.hexdigest()


class PromptResponseCollator:
    """Rows -> prompts for generation plus, when every row has a response, the supervised training form."""

    def __init__(self, pad_token_id: int, causal: bool, pack_capacity: Optional[int] = None):
        self.causal = causal
        self.pad = int(pad_token_id)
        self.prompts = PadCollator(pad_token_id, padding_side="left" if causal else "right")
        self.train = PadCollator(pad_token_id, padding_side="right")
        if pack_capacity is not None:  # causal only: the training form's examples packed (``data.packing``)
            from .packing import PackedCollator

            self.train = PackedCollator(pad_token_id, pack_capacity=pack_capacity)

    def __call__(self, rows: list[dict]) -> dict[str, torch.Tensor]:
        p = self.prompts([{"input_ids": r["prompt_ids"], "attention_mask": [1] * len(r["prompt_ids"])}
                          for r in rows])
        out = {"prompt_ids": p["input_ids"], "prompt_mask": p["attention_mask"]}
        if all("response_ids" in r for r in rows):
            if self.causal:
                ex = [{"input_ids": r["prompt_ids"] + r["response_ids"],
                       "attention_mask": [1] * (len(r["prompt_ids"]) + len(r["response_ids"])),
                       "labels": [-100] * len(r["prompt_ids"]) + r["response_ids"]} for r in rows]
            else:
                ex = [{"input_ids": r["prompt_ids"], "attention_mask": [1] * len(r["prompt_ids"]),
                       "labels": r["response_ids"] or [-100]} for r in rows]
            out.update(self.train(ex))
        return out


def unpad(ids: torch.Tensor, mask: torch.Tensor) -> list[list[int]]:
    return [row[m.bool()].tolist() for row, m in zip(ids.cpu(), mask.cpu())]


def with_responses(collate: PromptResponseCollator, batch: dict, responses: list[list[int]], device) -> dict:
    """The batch's prompts with ``responses`` (one token list per row), collated again, on ``device``."""
    prompts = unpad(batch["prompt_ids"], batch["prompt_mask"])
    if len(prompts) != len(responses):
        raise KDError(f"{len(responses)} responses for {len(prompts)} prompts")
    return to_device(collate([{"prompt_ids": p, "response_ids": r} for p, r in zip(prompts, responses)]), device)
