"""Zero-shot teachers: turn N unlabeled texts and K class names into an N x K matrix of soft labels.

Two teachers (as the Hugging Face zero-shot-distillation example, plus a bi-encoder):

- ``NLITeacher``: a cross-encoder NLI model scores the N*K pairs (premise = text, hypothesis =
  ``template.format(class)``). Single-label: softmax over the K entailment logits / temperature (rows sum to 1).
  Multi-label: per-class softmax over (contradiction, entailment) / temperature, keeping P(entail) (each in [0, 1]).
- ``EmbeddingTeacher``: a bi-encoder (e.g. all-MiniLM-L6-v2): mean-pooled, L2-normalised embeddings of the text
  and of each templated class description; softmax(cosine / temperature) over the K classes.

Both tokenize each text once and the K hypotheses once, sort the work by token length, pad each batch only to
its own longest row, run under ``torch.inference_mode`` with the model in ``eval()``, and return the rows in the
caller's order. ``label_corpus`` (``kd_engine.teachers.labeling``) adds sharding across ranks and the disk cache.
"""
from __future__ import annotations

import hashlib
import json
import logging
from typing import Any, Optional, Sequence

import torch

from ..errors import KDError
from ..models.modes import eval_mode
from .batching import overhead_tokens_for, pad_batch, sorted_batches
from .labeling import label_corpus  # noqa: F401  (re-exported: the labeling entry point)
from .zero_shot_inputs import (check_class_names, check_template, class_prompts, load_class_names,  # noqa: F401
                               read_texts, resolve_nli_ids)

logger = logging.getLogger(__name__)

DEFAULT_TEMPLATE = "This example is {}."
# Default sharpening of the embedding teacher: cosines of a sentence encoder span a narrow range (AG News with
# all-MiniLM-L6-v2: the best and second-best class typically differ by a few hundredths), so softmax(cos / 1)
# is almost uniform. 0.05 (= the 20x scale sentence-transformers trains these models with) gives peaked but not
# one-hot targets; see benchmarks/embedding_teacher_accuracy.py for the measured accuracy / NLL per value.
EMBEDDING_TEMPERATURE = 0.05


# ---------------------------------------------------------------------------------------------------------
# shared helpers


def _model_config(model: Any) -> Any:
    cfg = getattr(model, "config", None)
    if cfg is None and hasattr(model, "module"):  # DeepSpeed engines wrap the HF model
        cfg = getattr(model.module, "config", None)
    if cfg is None:
        raise KDError("the teacher model has no .config (expected a Hugging Face model)")
    return cfg


def _hf_module(model: Any) -> torch.nn.Module:
    return model.module if hasattr(model, "module") and isinstance(model.module, torch.nn.Module) else model


def _templates(template: "str | Sequence[str]") -> list[str]:
    templates = [template] if isinstance(template, str) else list(template)
    if not templates:
        raise KDError("no hypothesis template")
    return [check_template(t) for t in templates]


def group_mean(x: torch.Tensor, group: Sequence[int], k: int) -> torch.Tensor:
    """Mean over dim 1 within each class: x is N x H x ..., ``group[h]`` the class of hypothesis h; N x K x ..."""
    if len(group) == k and list(group) == list(range(k)):
        return x
    g = torch.tensor(list(group), dtype=torch.long)
    out = torch.zeros((x.shape[0], k) + tuple(x.shape[2:]), dtype=x.dtype).index_add_(1, g, x)
    counts = torch.bincount(g, minlength=k).to(x.dtype)
    return out / counts.view((1, k) + (1,) * (x.dim() - 2))


@torch.inference_mode()
def batched_logits(model: Any, ids: list, types: Optional[list], pad_id: int, side: str, batch_size: int):
    """Logits (float32, N x C, rows in input order) of a sequence classifier over token id rows, in batches of
    similar length padded to their own longest row (cuts planned by :func:`.batching.sorted_batches`)."""
    device = _device(model)
    out: Optional[torch.Tensor] = None
    with eval_mode(_hf_module(model)):
        for idx in sorted_batches([len(x) for x in ids], batch_size, overhead_tokens_for(device)):
            rows = idx.tolist()
            input_ids, mask = pad_batch([ids[r] for r in rows], pad_id, side)
            inputs = {"input_ids": input_ids.to(device), "attention_mask": mask.to(device)}
            if types is not None:
                inputs["token_type_ids"] = pad_batch([types[r] for r in rows], 0, side)[0].to(device)
            logits = model(**inputs).logits.float()
            if out is None:
                out = torch.empty(len(ids), logits.shape[-1], dtype=torch.float32)
            out[idx] = logits.cpu()
    assert out is not None
    return out


def _prompt_key(teacher: Any) -> dict:
    """Cache-key part of the prompts: one template and bare class names keep the original key."""
    if len(teacher.hypotheses) == len(teacher.class_names):
        return {"template": teacher.template}
    return {"template": teacher.template, "hypotheses": teacher.hypotheses, "groups": teacher.group}


def _device(model: Any) -> torch.device:
    for p in _hf_module(model).parameters():
        return p.device
    return torch.device("cpu")


def weights_fingerprint(model: Any) -> str:
    """A cheap content fingerprint of the weights: per tensor its name, shape, sum and first values.

    One pass over the parameters (a fraction of a second for a few hundred MB); changes whenever any tensor is
    retrained, re-initialised or swapped, without hashing every byte.
    """
    h = hashlib.sha256()
    with torch.no_grad():
        for name, t in _hf_module(model).state_dict().items():
            t = t.detach()
            h.update(f"{name}:{tuple(t.shape)}:{t.dtype}".encode())
            if t.numel():
                flat = t.reshape(-1)
                h.update(f"{float(flat.double().sum()):.9e}:{float(flat.double().abs().sum()):.9e}".encode())
                h.update(flat[:8].double().cpu().numpy().tobytes())
    return h.hexdigest()[:16]


def _default_max_length(tokenizer: Any, config: Any) -> int:
    m = getattr(tokenizer, "model_max_length", None) or 512
    if m > 100_000:  # "unset" sentinel
        m = 512
    pos = getattr(config, "max_position_embeddings", None)
    return int(min(m, pos) if pos else m)


def _pad_id(tokenizer: Any) -> int:
    pid = tokenizer.pad_token_id
    if pid is None:
        pid = tokenizer.eos_token_id
    if pid is None:
        raise KDError("the tokenizer has neither a pad nor an eos token; cannot pad batches")
    return int(pid)


class PairTemplate:
    """The tokenizer's own pair layout (special tokens, segment ids), read once from one probe encoding.

    ``tokenizer(premise, hypothesis)`` = prefix + premise + middle + hypothesis + suffix, where prefix / middle /
    suffix are special tokens ([CLS] / [SEP] / [SEP] for BERT, <s> / </s></s> / </s> for RoBERTa). Knowing them,
    pairs are assembled from the premise's and hypothesis' ids without tokenizing any pair again. ``verify``
    checks the layout against a second real encoding; callers fall back to plain pair tokenization if it fails.
    """

    def __init__(self, tokenizer: Any):
        self.tok = tokenizer
        self.use_types = "token_type_ids" in getattr(tokenizer, "model_input_names", [])
        a, b = "premise words here", "hypothesis words"
        pa = tokenizer(a, add_special_tokens=False)["input_ids"]
        hb = tokenizer(b, add_special_tokens=False)["input_ids"]
        enc = tokenizer(a, b)
        ids = list(enc["input_ids"])
        types = list(enc.get("token_type_ids") or [0] * len(ids))
        i = _find(ids, pa, 0)
        j = _find(ids, hb, i + len(pa)) if i >= 0 else -1
        if i < 0 or j < 0:
            raise ValueError("cannot locate the premise / hypothesis inside the tokenizer's pair encoding")
        self.prefix, self.middle, self.suffix = ids[:i], ids[i + len(pa):j], ids[j + len(hb):]
        self.t_prefix, self.t_middle, self.t_suffix = types[:i], types[i + len(pa):j], types[j + len(hb):]
        self.t_premise, self.t_hyp = types[i], types[j]
        self.n_special = len(self.prefix) + len(self.middle) + len(self.suffix)

    def build(self, premise: list[int], hyp: list[int]) -> tuple[list[int], list[int]]:
        ids = self.prefix + premise + self.middle + hyp + self.suffix
        types = (self.t_prefix + [self.t_premise] * len(premise) + self.t_middle + [self.t_hyp] * len(hyp)
                 + self.t_suffix)
        return ids, types

    def verify(self) -> bool:
        a, b = "Another, longer premise: 12 tests!", "A second hypothesis?"
        pa = self.tok(a, add_special_tokens=False)["input_ids"]
        hb = self.tok(b, add_special_tokens=False)["input_ids"]
        ref = self.tok(a, b)
        ids, types = self.build(pa, hb)
        ok = ids == list(ref["input_ids"])
        if self.use_types and "token_type_ids" in ref:
            ok = ok and types == list(ref["token_type_ids"])
        return ok


def _find(seq: list[int], sub: list[int], start: int) -> int:
    for i in range(start, len(seq) - len(sub) + 1):
        if seq[i:i + len(sub)] == sub:
            return i
    return -1


def _truncate(ids: list[int], keep: int, side: str) -> list[int]:
    if len(ids) <= keep:
        return ids
    return ids[len(ids) - keep:] if side == "left" else ids[:keep]


# ---------------------------------------------------------------------------------------------------------
# teachers


class NLITeacher:
    """Zero-shot labels from an NLI cross-encoder (``AutoModelForSequenceClassification`` with an entailment
    label). ``teacher(texts, batch_size)`` returns a float32 tensor N x K (rows in the order of ``texts``);
    ``batch_size`` counts (text, class) pairs, like the reference script's ``teacher_batch_size`` and the
    zero-shot pipeline's ``batch_size``.
    """

    kind = "nli"

    def __init__(self, model: Any, tokenizer: Any, template: "str | Sequence[str]", class_names: Sequence[str],
                 multi_label: bool = False, temperature: float = 1.0, max_length: Optional[int] = None,
                 name: Optional[str] = None, descriptions: Optional[dict] = None):
        self.model = model
        self.tokenizer = tokenizer
        self.templates = _templates(template)
        self.template = self.templates[0]
        self.class_names = check_class_names(class_names)
        self.hypotheses, self.group = class_prompts(self.class_names, self.templates, descriptions)
        self.multi_label = bool(multi_label)
        if not temperature > 0:
            raise KDError(f"temperature must be > 0, got {temperature}")
        self.temperature = float(temperature)
        config = _model_config(model)
        self.entail_id, self.contr_id = resolve_nli_ids(config)
        if self.multi_label and self.contr_id is None:
            raise KDError(f"multi-label needs a contradiction label in the teacher's label2id: {config.label2id}")
        self.max_length = int(max_length or _default_max_length(tokenizer, config))
        self.name = name or getattr(config, "_name_or_path", "") or type(_hf_module(model)).__name__
        self.pad_id = _pad_id(tokenizer)
        self.calls = 0  # number of __call__s (tests count teacher work)
        try:
            self.pair = PairTemplate(tokenizer)
            if not self.pair.verify():
                raise ValueError("assembled pair differs from the tokenizer's own encoding")
        except ValueError as e:
            logger.warning("NLI teacher: %s; tokenizing every pair instead (slower)", e)
            self.pair = None
        self.hyp_ids = tokenizer(self.hypotheses, add_special_tokens=False)["input_ids"]  # H, once
        if self.pair is not None:
            longest = max(len(h) for h in self.hyp_ids) + self.pair.n_special
            if longest >= self.max_length:
                raise KDError(f"a hypothesis is {longest} tokens with special tokens; max_length "
                              f"{self.max_length} leaves no room for the text")

    def cache_key(self) -> dict:
        return {"teacher_kind": self.kind, "teacher": self.name, "weights": weights_fingerprint(self.model),
                **_prompt_key(self), "class_names": self.class_names, "multi_label": self.multi_label,
                "temperature": self.temperature, "max_length": self.max_length}

    def encode_pairs(self, texts: Sequence[str]) -> tuple[list[list[int]], Optional[list[list[int]]]]:
        """Token ids (and segment ids) of the N*H pairs (H hypotheses), text-major (pair n*H + h), premise
        truncated only."""
        tok = self.tokenizer
        K = len(self.hypotheses)
        if self.pair is None:
            pairs = [(t, h) for t in texts for h in self.hypotheses]
            enc = tok([p for p, _ in pairs], [h for _, h in pairs], truncation="only_first",
                      max_length=self.max_length)
            return enc["input_ids"], enc.get("token_type_ids")
        premises = tok(list(texts), add_special_tokens=False, verbose=False)["input_ids"]  # once per text
        side = getattr(tok, "truncation_side", "right")
        ids: list[list[int]] = []
        types: list[list[int]] = []
        for p in premises:
            for k in range(K):
                h = self.hyp_ids[k]
                i, t = self.pair.build(_truncate(p, self.max_length - self.pair.n_special - len(h), side), h)
                ids.append(i)
                types.append(t)
        return ids, (types if self.pair.use_types else None)

    @torch.inference_mode()
    def logits(self, texts: Sequence[str], batch_size: int = 32) -> torch.Tensor:
        """NLI logits, float32, N x K x num_labels (averaged over each class's hypotheses)."""
        ids, types = self.encode_pairs(texts)
        out = batched_logits(self.model, ids, types, self.pad_id, getattr(self.tokenizer, "padding_side", "right"),
                             batch_size)
        return group_mean(out.view(len(texts), len(self.hypotheses), -1), self.group, len(self.class_names))

    def probs_from_logits(self, logits: torch.Tensor) -> torch.Tensor:
        """N x K x C logits -> N x K soft labels (the zero-shot-distillation example's teacher probabilities),
        float32."""
        logits = logits.float()
        if self.multi_label:
            two = logits[..., [self.contr_id, self.entail_id]] / self.temperature  # N x K x 2
            return torch.softmax(two, dim=-1)[..., 1]
        return torch.softmax(logits[..., self.entail_id] / self.temperature, dim=1)

    def __call__(self, texts: Sequence[str], batch_size: int = 32) -> torch.Tensor:
        self.calls += 1
        if len(texts) == 0:
            return torch.empty(0, len(self.class_names))
        return self.probs_from_logits(self.logits(texts, batch_size))


class EmbeddingTeacher:
    """Zero-shot labels from a bi-encoder (``AutoModel``, e.g. all-MiniLM-L6-v2): softmax over the K classes of
    cos(mean-pooled text embedding, mean-pooled ``template.format(class)`` embedding) / temperature.
    ``batch_size`` counts texts. Returns float32 N x K; rows sum to 1.
    """

    kind = "embedding"

    def __init__(self, model: Any, tokenizer: Any, template: "str | Sequence[str]", class_names: Sequence[str],
                 temperature: float = EMBEDDING_TEMPERATURE, max_length: Optional[int] = None,
                 name: Optional[str] = None, descriptions: Optional[dict] = None):
        self.model = model
        self.tokenizer = tokenizer
        self.templates = _templates(template)
        self.template = self.templates[0]
        self.class_names = check_class_names(class_names)
        self.hypotheses, self.group = class_prompts(self.class_names, self.templates, descriptions)
        if not temperature > 0:
            raise KDError(f"temperature must be > 0, got {temperature}")
        self.temperature = float(temperature)
        self.multi_label = False
        config = _model_config(model)
        self.max_length = int(max_length or _default_max_length(tokenizer, config))
        self.name = name or getattr(config, "_name_or_path", "") or type(_hf_module(model)).__name__
        self.pad_id = _pad_id(tokenizer)
        self.calls = 0
        self._class_emb: Optional[torch.Tensor] = None

    def cache_key(self) -> dict:
        return {"teacher_kind": self.kind, "teacher": self.name, "weights": weights_fingerprint(self.model),
                **_prompt_key(self), "class_names": self.class_names, "multi_label": False,
                "temperature": self.temperature, "max_length": self.max_length}

    @torch.inference_mode()
    def embed(self, texts: Sequence[str], batch_size: int = 64) -> torch.Tensor:
        """L2-normalised mean-pooled embeddings, float32, N x hidden, in input order."""
        ids = self.tokenizer(list(texts), truncation=True, max_length=self.max_length, verbose=False)["input_ids"]
        device = _device(self.model)
        side = getattr(self.tokenizer, "padding_side", "right")
        out: Optional[torch.Tensor] = None
        with eval_mode(_hf_module(self.model)):
            for idx in sorted_batches([len(x) for x in ids], batch_size, overhead_tokens_for(device)):
                input_ids, mask = pad_batch([ids[r] for r in idx.tolist()], self.pad_id, side)
                inputs = {"input_ids": input_ids.to(device), "attention_mask": mask.to(device)}
                if "token_type_ids" in getattr(self.tokenizer, "model_input_names", []):
                    inputs["token_type_ids"] = torch.zeros_like(inputs["input_ids"])
                hidden = self.model(**inputs).last_hidden_state.float()  # B x T x H
                m = inputs["attention_mask"].unsqueeze(-1).float()
                pooled = (hidden * m).sum(1) / m.sum(1).clamp_min(1.0)  # empty rows stay 0, no NaN
                emb = torch.nn.functional.normalize(pooled, dim=-1)
                if out is None:
                    out = torch.empty(len(ids), emb.shape[-1], dtype=torch.float32)
                out[idx] = emb.cpu()
        assert out is not None
        return out

    def class_embeddings(self) -> torch.Tensor:
        """K x hidden: each class's hypotheses embedded, averaged and re-normalised (the class centroid)."""
        if self._class_emb is None:
            e = self.embed(self.hypotheses).unsqueeze(0)  # 1 x H x hidden
            mean = group_mean(e, self.group, len(self.class_names))[0]
            self._class_emb = torch.nn.functional.normalize(mean, dim=-1)
        return self._class_emb

    def cosine(self, texts: Sequence[str], batch_size: int = 64) -> torch.Tensor:
        return self.embed(texts, batch_size) @ self.class_embeddings().T  # N x K

    def __call__(self, texts: Sequence[str], batch_size: int = 64) -> torch.Tensor:
        self.calls += 1
        if len(texts) == 0:
            return torch.empty(0, len(self.class_names))
        return torch.softmax(self.cosine(texts, batch_size) / self.temperature, dim=-1)


def describe(teacher: Any) -> str:
    return json.dumps({k: v for k, v in teacher.cache_key().items() if k != "weights"})
