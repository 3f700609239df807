"""Evaluators of an exported student (a Hugging Face folder): one score per cell, and per-example parts.

Every evaluator returns ``{"value": float, "parts": [[num, den], ...] or None}``: the score is
``transform(sum(num) / sum(den))`` over the examples, so that a paired bootstrap can resample examples
(``stats.py``). Kinds (``evaluator: {kind: ..., ...}`` in the spec):

- ``accuracy``: a classifier on ``file`` (``text_column`` [+ ``text_pair_column``], ``label_column``; labels as
  names of the model's ``label2id`` or integers); higher is better.
- ``bits_per_byte``: a causal LM on the texts of ``file`` (one per line of a .txt, or ``text_column``): summed NLL
  of every token after one start token / (ln 2 x UTF-8 bytes); lower is better. ``perplexity``: exp(mean token NLL).
- ``teacher_agreement``: share of examples (classifier) or next tokens (causal LM) where the student's top-1 equals
  ``teacher``'s (one tokenizer); higher is better.
- ``python``: ``function: "module:name"`` or ``"path/file.py:name"``, called as ``name(model_dir)`` and returning a
  float or ``(float, parts)``; ``higher_is_better`` (default true) says which way is better.
"""
from __future__ import annotations

import importlib
import importlib.util
import math
import os
from typing import Callable

from ..errors import ConfigError

KINDS = {"accuracy": True, "bits_per_byte": False, "perplexity": False, "teacher_agreement": True, "python": None}
KEYS = ("kind", "file", "text_column", "text_pair_column", "label_column", "column_names", "max_length", "teacher",
        "function", "higher_is_better", "max_examples", "batch_size")


def _function(spec: str, where: str) -> Callable:
    if ":" not in spec:
        raise ConfigError(f"{where}: evaluator function must be 'module:name' or 'path/file.py:name'; got {spec!r}")
    mod, name = spec.rsplit(":", 1)
    try:
        if mod.endswith(".py"):
            if not os.path.isfile(mod):
                raise FileNotFoundError(mod)
            s = importlib.util.spec_from_file_location(f"kd_compare_eval_{abs(hash(mod))}", mod)
            module = importlib.util.module_from_spec(s)
            s.loader.exec_module(module)
        else:
            module = importlib.import_module(mod)
        fn = getattr(module, name)
    except (ImportError, FileNotFoundError, AttributeError, SyntaxError) as exc:
        raise ConfigError(f"{where}: evaluator function {spec!r} cannot be loaded ({type(exc).__name__}: "
                          f"{exc})") from None
    if not callable(fn):
        raise ConfigError(f"{where}: evaluator function {spec!r} is not callable")
    return fn


def check_evaluator(ev, where: str) -> dict:
    """The evaluator mapping, checked (kind, keys, file, function) before anything runs."""
    where = f"{where}, evaluator"
    if not isinstance(ev, dict) or "kind" not in ev:
        raise ConfigError(f"{where}: a mapping with 'kind' ({', '.join(KINDS)})")
    for key in ev:
        if key not in KEYS:
            import difflib

            close = difflib.get_close_matches(key, KEYS, n=1, cutoff=0.6)
            raise ConfigError(f"{where}: unknown key '{key}'" + (f"; did you mean '{close[0]}'?" if close else ""))
    kind = ev["kind"]
    if kind not in KINDS:
        raise ConfigError(f"{where}: kind must be one of {', '.join(KINDS)}; got {kind!r}")
    out = dict(ev)
    if kind == "python":
        _function(str(ev.get("function", "")), where)
        out["higher_is_better"] = bool(ev.get("higher_is_better", True))
        return out
    if not ev.get("file") or not os.path.isfile(str(ev["file"])):
        raise ConfigError(f"{where}: file {ev.get('file')!r} does not exist")
    if kind == "teacher_agreement" and not ev.get("teacher"):
        raise ConfigError(f"{where}: teacher_agreement needs 'teacher' (a model folder or id)")
    out["higher_is_better"] = KINDS[kind]
    return out


def _rows(ev: dict):
    from ..data.files import load_table, require_columns

    ds = load_table(str(ev["file"]), split="validation", column_names=ev.get("column_names"))
    cols = [ev.get("text_column", "text"), ev.get("text_pair_column"),
            ev.get("label_column", "label") if ev["kind"] == "accuracy" else None]
    require_columns(ds, cols, str(ev["file"]))
    n = min(len(ds), int(ev.get("max_examples") or len(ds)))
    return ds.select(range(n))


def _classify(model, tok, ds, ev):
    import torch

    text, pair = ev.get("text_column", "text"), ev.get("text_pair_column")
    size, top = int(ev.get("batch_size", 32)), []
    with torch.no_grad():
        for lo in range(0, len(ds), size):
            chunk = ds[lo:lo + size]
            enc = tok(chunk[text], chunk[pair] if pair else None, truncation=True, padding=True,
                      max_length=int(ev.get("max_length", 128)), return_tensors="pt")
            top += model(**enc).logits.argmax(-1).tolist()
    return top


def _token_scores(model, tok, texts, ev):
    """Per text: (NLL sum, tokens, bytes, top-1 ids per predicted position) with one start token in front."""
    import torch

    from ..data.xtoken import encode_side

    out = []
    with torch.no_grad():
        for text, (ids, offs) in zip(texts, encode_side(tok, texts, int(ev.get("max_length", 1024)))):
            x = torch.tensor([ids])
            logits = model(input_ids=x).logits[0, :-1, :len(tok)].float()
            lp = torch.log_softmax(logits, -1).gather(-1, x[0, 1:, None])[:, 0]
            covered = max((b for a, b in offs), default=0)
            out.append((-float(lp.sum()), len(ids) - 1, len(text[:covered].encode()), logits.argmax(-1).tolist()))
    return out


def evaluate(ev: dict, model_dir: str) -> dict:
    """Score the exported student in ``model_dir`` (see the module docstring)."""
    from ..models.loading import load_model, load_tokenizer

    kind = ev["kind"]
    if kind == "python":
        res = _function(str(ev["function"]), "evaluator")(model_dir)
        value, parts = (res if isinstance(res, tuple) else (res, None))
        return {"value": float(value), "parts": parts}
    ds = _rows(ev)
    tok = load_tokenizer(model_dir)
    classifier = kind == "accuracy" or (kind == "teacher_agreement" and ev.get("label_column"))
    task = "sequence_classification" if classifier else "causal_lm"
    model = load_model(model_dir, task).eval()
    if classifier:
        top = _classify(model, tok, ds, ev)
        if kind == "accuracy":
            label2id = {str(k).lower(): v for k, v in (model.config.label2id or {}).items()}
            gold = [label2id[str(y).lower()] if str(y).lower() in label2id else int(y)
                    for y in ds[ev.get("label_column", "label")]]
        else:
            gold = _classify(load_model(str(ev["teacher"]), task).eval(), tok, ds, ev)
        parts = [[float(a == b), 1.0] for a, b in zip(top, gold)]
        return {"value": sum(p[0] for p in parts) / len(parts), "parts": parts}
    texts = [t for t in ds[ev.get("text_column", "text")] if isinstance(t, str) and t.strip()]
    scores = _token_scores(model, tok, texts, ev)
    if kind == "teacher_agreement":
        ref = _token_scores(load_model(str(ev["teacher"]), task).eval(), tok, texts, ev)
        parts = [[float(sum(a == b for a, b in zip(s[3], r[3]))), float(len(s[3]))] for s, r in zip(scores, ref)]
    elif kind == "bits_per_byte":
        parts = [[s[0] / math.log(2), float(s[2])] for s in scores]
    else:
        parts = [[s[0], float(s[1])] for s in scores]
    return {"value": transform(kind, sum(p[0] for p in parts) / max(sum(p[1] for p in parts), 1e-12)),
            "parts": parts}


def transform(kind: str, ratio: float) -> float:
    return math.exp(ratio) if kind == "perplexity" else ratio
