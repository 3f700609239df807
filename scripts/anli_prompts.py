"""ANLI -> MiniLLM prompt files in the instruction format of the Flan-T5 ANLI setting (Fabio-Klinge/MiniLLM_Seq2Seq).

    python scripts/anli_prompts.py ../shared/data/anli/R1/dev.jsonl ../shared/data/anli/R2/dev.jsonl \
        --out data/anli_prompts.jsonl [--with_reason]

Causal LMs (``--answer_cue``): the prompt ends with a cue (e.g. "\nAnswer:") and the answer starts with a space, so
prompt + answer reads "...\nAnswer: entailment" (without it the answer tokens would be glued to the last option,
"- neutralentailment"). Instruction-tuned causal LMs (``--chat_template MODEL``): the prompt (plus the cue, if any)
becomes the user turn of MODEL's chat template with the assistant turn opened, and the answer is the bare label
word (SmolLM2-135M-Instruct answers label words only in its own chat format). The Flan-T5 setting keeps the
reference prompt (no cue, no template).

Each output row: ``text`` (the prompt), ``answer`` (entailment / contradiction / neutral, optionally followed by
the annotator's reason), ``label`` and ``uid``. Rows with an unknown label are skipped and counted.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

LABELS = {"e": "entailment", "c": "contradiction", "n": "neutral"}
PROMPT = ("{premise}\nCan we infer the following and why?\n{hypothesis}\n\n"
          "OPTIONS:\n- entailment\n- contradiction\n- neutral")


def convert(row: dict, with_reason: bool, answer_cue: str = "", chat=None) -> dict | None:
    label = LABELS.get(str(row.get("label", "")).strip().lower()[:1])
    if label is None or not row.get("context") or not row.get("hypothesis"):
        return None
    answer = label
    reason = (row.get("reason") or "").strip()
    if with_reason and reason:
        answer = f"{label}. {reason}"
    prompt = PROMPT.format(premise=row["context"].strip(), hypothesis=row["hypothesis"].strip())
    if chat is not None:  # a tokenizer with a chat template
        prompt = chat.apply_chat_template([{"role": "user", "content": prompt + answer_cue}], tokenize=False,
                                          add_generation_prompt=True)
    elif answer_cue:
        prompt, answer = prompt + answer_cue, " " + answer
    return {"text": prompt, "answer": answer, "label": label, "uid": row.get("uid")}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("files", nargs="+", help="ANLI jsonl files (context, hypothesis, label e/n/c, reason)")
    p.add_argument("--out", required=True)
    p.add_argument("--with_reason", action="store_true", help="append the annotator's reason to the answer")
    p.add_argument("--answer_cue", default="",
                   help='text ending each prompt before the answer, for causal LMs (e.g. "\\nAnswer:"; backslash-n '
                        'is read as a newline); the answer then starts with a space')
    p.add_argument("--chat_template", default=None, metavar="MODEL",
                   help="wrap each prompt in MODEL's chat template (path, hub id or offline:NAME)")
    args = p.parse_args()
    cue = args.answer_cue.replace("\\n", "\n")
    chat = None
    if args.chat_template:
        sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
        from kd_engine.models.loading import load_tokenizer

        chat = load_tokenizer(args.chat_template)
        if not getattr(chat, "chat_template", None):
            sys.exit(f"error: the tokenizer of {args.chat_template} has no chat template")
    kept = skipped = 0
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w", encoding="utf-8") as out:
        for path in args.files:
            if not os.path.exists(path):
                sys.exit(f"error: no such file: {path}")
            with open(path, encoding="utf-8") as fh:
                for line in fh:
                    if not line.strip():
                        continue
                    row = convert(json.loads(line), args.with_reason, cue, chat)
                    if row is None:
                        skipped += 1
                        continue
                    out.write(json.dumps(row, ensure_ascii=False) + "\n")
                    kept += 1
    print(f"wrote {kept} prompts to {args.out} ({skipped} rows skipped: unknown label or empty text)")


if __name__ == "__main__":
    main()
