"""Chat data: conversations (``--messages_column``, a list of ``{role, content}``) rendered with the tokenizer's
own chat template, with the mask of the tokens the assistant says.

How the assistant tokens are found, for any template: for each assistant turn ``i`` the template renders the
conversation up to it with the generation prompt (``messages[:i]``, ``add_generation_prompt=True``) and up to and
including it (``messages[:i + 1]``); both must be prefixes of the full rendering. The characters between the two
are the turn: its content, then what the template puts after it. The mask covers the content and the template's
text after it up to and including its first special token (the end-of-turn token, ``<|im_end|>`` for SmolLM2 /
Qwen, ``<|eot_id|>`` for Llama 3), or all of that text when it has none. The full rendering is tokenized once
(fast tokenizer, offsets) with no extra special tokens (the template writes them), and a token is an assistant
token when it starts inside a turn's span.

- ``encode_conversation``: ``input_ids`` and ``labels`` (-100 outside the assistant turns) for training on all
  assistant turns (kd, sft).
- ``encode_prompt_response``: the prompt (everything before the last assistant turn, ending at the generation
  prompt) and the response (that turn's tokens) for the sequence-level methods (gkd, seqkd, minillm); a conversation
  that ends on a user turn is a prompt alone where a method needs no response.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any, Optional

from ..errors import KDError

# roles kd_engine passes to a template; anything else is a typo or a template-specific role the user must map
KNOWN_ROLES = ("system", "user", "assistant", "tool", "developer")


@dataclass
class Conversation:
    ids: list[int]
    assistant: list[bool]  # per token: said by the assistant (content and end-of-turn)
    turn_starts: list[int]  # token index where each assistant turn's span starts


def check_chat_tokenizer(tokenizer, where: str) -> None:
    if not getattr(tokenizer, "chat_template", None):
        raise KDError(f"{where}: --messages_column needs a tokenizer with a chat template; "
                      f"{getattr(tokenizer, 'name_or_path', 'this tokenizer')} has none (pass --tokenizer with one, "
                      f"or give prompt/response columns with --text_column / --target_column)")
    if not getattr(tokenizer, "is_fast", False):
        raise KDError(f"{where}: --messages_column needs a fast tokenizer (character offsets)")


def template_sha256(tokenizer) -> str:
    return hashlib.sha256(str(tokenizer.chat_template).encode()).hexdigest()


def check_messages(value: Any, row: int, where: str, need_assistant: bool = True) -> list[dict]:
    """The conversation of one row as a list of {role, content} dicts, or KDError naming the row."""
    at = f"{where}, row {row + 1}"
    if not isinstance(value, (list, tuple)):
        raise KDError(f"{at}: the messages column holds {type(value).__name__}, not a list of {{role, content}} "
                      f"messages")
    if not value:
        raise KDError(f"{at}: the conversation is empty")
    out = []
    for j, m in enumerate(value):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise KDError(f"{at}, message {j + 1}: expected {{role, content}}, got {m!r:.80}")
        role, content = m["role"], m["content"]
        if role not in KNOWN_ROLES:
            raise KDError(f"{at}, message {j + 1}: unknown role {role!r} (known: {', '.join(KNOWN_ROLES)})")
        if not isinstance(content, str):
            raise KDError(f"{at}, message {j + 1}: content is {type(content).__name__}, not text")
        out.append({"role": role, "content": content})
    if need_assistant and not any(m["role"] == "assistant" for m in out):
        raise KDError(f"{at}: the conversation has no assistant turn (nothing to learn from)")
    return out


def _render(tokenizer, messages, at: str, generation_prompt: bool = False) -> str:
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)
    except Exception as exc:  # jinja raise_exception (unknown role, bad order) or a template error
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise KDError(f"{at}: the chat template refused the conversation: {first}") from None


def _special_strings(tokenizer) -> list[str]:
    specials = set(getattr(tokenizer, "all_special_tokens", []) or [])
    for tok in getattr(tokenizer, "added_tokens_decoder", {}).values():
        if getattr(tok, "special", False):
            specials.add(str(tok))
    return sorted((s for s in specials if s), key=len, reverse=True)


def assistant_char_spans(tokenizer, messages: list[dict], at: str) -> tuple[str, list[tuple[int, int]]]:
    """The full rendering and, per assistant turn, the (start, end) characters of its content + end of turn."""
    full = _render(tokenizer, messages, at)
    specials = _special_strings(tokenizer)
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        before = _render(tokenizer, messages[:i], at, generation_prompt=True) if i else ""
        upto = _render(tokenizer, messages[:i + 1], at)
        if not (upto.startswith(before) and full.startswith(upto)):
            raise KDError(f"{at}: the chat template renders earlier turns differently once later turns follow "
                          f"(turn {i + 1}); kd_engine cannot tell which tokens the assistant said")
        seg = upto[len(before):]
        content = m["content"]
        pos = seg.find(content) if content else 0
        if pos < 0:  # templates that trim the content
            content = content.strip()
            pos = seg.find(content)
        if pos < 0:
            raise KDError(f"{at}: the chat template does not reproduce the assistant's content of turn {i + 1}")
        end = pos + len(content)
        rest = seg[end:]
        hits = [(rest.find(s), s) for s in specials if rest.find(s) >= 0]
        if hits:
            first, s = min(hits, key=lambda h: (h[0], -len(h[1])))
            end += first + len(s)
        else:
            end = len(seg)
        spans.append((len(before) + pos, len(before) + end))
    return full, spans


def render_conversation(tokenizer, messages: list[dict], at: str) -> Conversation:
    full, spans = assistant_char_spans(tokenizer, messages, at)
    enc = tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = list(enc["input_ids"]), enc["offset_mapping"]
    mask = [False] * len(ids)
    starts = []
    for a, b in spans:
        first = None
        for k, (s, e) in enumerate(offsets):
            if a <= s < b and e > s:
                mask[k] = True
                first = k if first is None else first
        if first is not None:
            starts.append(first)
    return Conversation(ids, mask, starts)


def encode_conversation(tokenizer, messages: list[dict], max_length: int, at: str) -> Optional[dict]:
    """Training form: ``input_ids`` and ``labels`` (the assistant tokens, -100 elsewhere), cut at ``max_length``
    from the right; None when no assistant token is left after the cut."""
    conv = render_conversation(tokenizer, messages, at)
    ids, mask = conv.ids[:max_length], conv.assistant[:max_length]
    if not any(mask):
        return None
    return {"input_ids": ids, "attention_mask": [1] * len(ids),
            "labels": [t if m else -100 for t, m in zip(ids, mask)], "length": len(ids)}


def encode_prompt_response(tokenizer, messages: list[dict], at: str,
                           need_response: bool) -> tuple[list, Optional[list]]:
    """(prompt_ids, response_ids or None): the prompt is the rendering before the last assistant turn, ending at
    the template's generation prompt; the response is that turn's assistant tokens. A conversation ending on
    another role is a prompt alone (the whole conversation plus the generation prompt)."""
    if messages[-1]["role"] != "assistant":
        if need_response:
            raise KDError(f"{at}: the conversation does not end with an assistant turn (the response to learn)")
        text = _render(tokenizer, messages, at, generation_prompt=True)
        return list(tokenizer(text, add_special_tokens=False)["input_ids"]), None
    conv = render_conversation(tokenizer, messages, at)
    if not conv.turn_starts:
        raise KDError(f"{at}: the last assistant turn has no tokens")
    start = conv.turn_starts[-1]
    response = [t for t, m in zip(conv.ids[start:], conv.assistant[start:]) if m]
    return conv.ids[:start], response
