"""A trained K-way classifier as a zero-shot-style teacher: the self-training round of zero-shot distillation.

A student distilled from a zero-shot teacher generalises past its teacher's mistakes (it sees the same texts but
learns features shared by a class, not the teacher's prompt matching); relabeling the unlabeled corpus with that
student and distilling again is one self-training round. ``ClassifierTeacher`` labels texts with
``softmax(logits / temperature)`` of an exported student (``out/final``, ``id2label`` = the class names, in any
order: columns are put in the run's class order), sharing ``label_corpus``'s sharding and cache with the other
zero-shot teachers.
"""
from __future__ import annotations

from typing import Any, Optional, Sequence

import torch

from ..errors import KDError
from .zero_shot import _default_max_length, _hf_module, _model_config, _pad_id, batched_logits, weights_fingerprint
from .zero_shot_inputs import check_class_names


def classifier_columns(config: Any, class_names: Sequence[str]) -> Optional[list[int]]:
    """The model's output index of each class name, or None when its labels are not exactly the class names."""
    id2label = {int(k): str(v).strip() for k, v in (getattr(config, "id2label", None) or {}).items()}
    by_name = {v: k for k, v in id2label.items()}
    if len(by_name) != len(class_names) or set(by_name) != set(class_names):
        return None
    return [by_name[n] for n in class_names]


class ClassifierTeacher:
    """Soft labels N x K (float32, rows sum to 1) from a sequence classifier whose labels are the class names."""

    kind = "classifier"

    def __init__(self, model: Any, tokenizer: Any, class_names: Sequence[str], temperature: float = 1.0,
                 max_length: Optional[int] = None, name: Optional[str] = None):
        self.model = model
        self.tokenizer = tokenizer
        self.class_names = check_class_names(class_names)
        if not temperature > 0:
            raise KDError(f"temperature must be > 0, got {temperature}")
        self.temperature = float(temperature)
        self.multi_label = False
        config = _model_config(model)
        cols = classifier_columns(config, self.class_names)
        if cols is None:
            raise KDError(f"the classifier teacher's labels {sorted((config.id2label or {}).values())} are not the "
                          f"class names {self.class_names}")
        self.columns = cols
        self.max_length = int(max_length or _default_max_length(tokenizer, config))
        self.name = name or getattr(config, "_name_or_path", "") or type(_hf_module(model)).__name__
        self.pad_id = _pad_id(tokenizer)
        self.calls = 0

    def cache_key(self) -> dict:
        return {"teacher_kind": self.kind, "teacher": self.name, "weights": weights_fingerprint(self.model),
                "class_names": self.class_names, "temperature": self.temperature, "max_length": self.max_length}

    @torch.inference_mode()
    def logits(self, texts: Sequence[str], batch_size: int = 64) -> torch.Tensor:
        """Logits N x K in the run's class order, float32, rows in input order."""
        enc = self.tokenizer(list(texts), truncation=True, max_length=self.max_length, verbose=False)
        side = getattr(self.tokenizer, "padding_side", "right")
        logits = batched_logits(self.model, enc["input_ids"], enc.get("token_type_ids"), self.pad_id, side,
                                batch_size)
        return logits[:, self.columns]

    def __call__(self, texts: Sequence[str], batch_size: int = 64) -> torch.Tensor:
        self.calls += 1
        if len(texts) == 0:
            return torch.empty(0, len(self.class_names))
        return torch.softmax(self.logits(texts, batch_size) / self.temperature, dim=-1)
