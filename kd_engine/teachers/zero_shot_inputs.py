"""Inputs of the zero-shot teachers: the hypothesis template, class names, unlabeled texts, and which NLI labels
mean entailment / contradiction."""
from __future__ import annotations

import logging
import os
from typing import Any, Optional, Sequence

from ..errors import KDError
from ..input_files import reading

logger = logging.getLogger(__name__)


def check_template(template: str) -> str:
    """The hypothesis template must contain ``{}`` exactly once (and no other format fields)."""
    if not isinstance(template, str) or template.count("{}") != 1:
        raise KDError(f"hypothesis template {template!r} must contain '{{}}' exactly once, e.g. "
                      f"'This text is about {{}}.'")
    try:
        template.format("x")
    except (IndexError, KeyError, ValueError) as e:
        raise KDError(f"hypothesis template {template!r} has stray braces besides '{{}}': {e}") from None
    return template


def check_class_names(names: Sequence[str], source: str = "class names") -> list[str]:
    """Strip, then refuse empty names, duplicates and fewer than 2 classes."""
    names = [str(n).strip() for n in names]
    if any(not n for n in names):
        raise KDError(f"{source}: empty class name")
    seen: dict[str, int] = {}
    for i, n in enumerate(names):
        if n in seen:
            raise KDError(f"{source}: duplicate class name '{n}' (entries {seen[n] + 1} and {i + 1})")
        seen[n] = i
    if len(names) < 2:
        raise KDError(f"{source}: need at least 2 classes, got {len(names)}")
    return names


def load_class_names(path: str) -> list[str]:
    """One class name per line; blank lines are ignored. KDError for a missing/empty file, duplicates, < 2."""
    if not os.path.isfile(path):
        raise KDError(f"class names file not found: {path}")
    with reading("class names file", path), open(path, encoding="utf-8") as f:
        names = [line.strip() for line in f if line.strip()]
    if not names:
        raise KDError(f"class names file {path} is empty")
    return check_class_names(names, source=f"class names file {path}")


def read_texts(path: str) -> tuple[list[str], int]:
    """Unlabeled texts, one per line. Blank lines are skipped and counted: returns (texts, n_blank).

    KDError when the file is missing or holds no text at all.
    """
    if not os.path.isfile(path):
        raise KDError(f"data file not found: {path}")
    texts: list[str] = []
    blank = 0
    with reading("data file", path), open(path, encoding="utf-8") as f:
        for line in f:
            line = line.rstrip("\r\n")
            if line.strip():
                texts.append(line)
            else:
                blank += 1
    if not texts:
        raise KDError(f"data file {path} has no text ({blank} blank lines)")
    if blank:
        logger.warning("%s: skipped %d blank lines", path, blank)
    return texts, blank


def resolve_nli_ids(config: Any) -> tuple[int, Optional[int]]:
    """(entailment id, contradiction id) from the model's ``label2id``, case-insensitive prefix match.

    Entailment: the label starting with "entail". Contradiction: the label starting with "contradict"; for a
    2-way model (e.g. entailment / not_entailment) the other label; otherwise None (only multi-label needs it).
    Unlike the reference script (which falls back to id -1 and assumes contradiction at 0 or last), a model
    without an entailment label is an error.
    """
    label2id = {str(k): int(v) for k, v in (getattr(config, "label2id", None) or {}).items()}
    if not any(k.lower().startswith("entail") for k in label2id):
        # some checkpoints fill only id2label
        id2label = getattr(config, "id2label", None) or {}
        label2id = {str(v): int(k) for k, v in id2label.items()} or label2id

    def find(prefix: str) -> Optional[int]:
        hits = sorted(v for k, v in label2id.items() if k.lower().startswith(prefix))
        return hits[0] if hits else None

    entail = find("entail")
    if entail is None:
        raise KDError(f"the teacher is not an NLI model with an entailment label: label2id = {label2id}; set "
                      f"config.label2id to name its classes (e.g. contradiction / neutral / entailment)")
    contr = find("contradict")
    if contr is None and len(set(label2id.values())) == 2:
        contr = next(v for v in label2id.values() if v != entail)
    return entail, contr




def load_templates(path: str) -> list[str]:
    """Hypothesis templates, one per line (each with ``{}`` once); blank lines ignored."""
    if not os.path.isfile(path):
        raise KDError(f"hypothesis templates file not found: {path}")
    with reading("hypothesis templates file", path), open(path, encoding="utf-8") as f:
        templates = [line.rstrip("\r\n") for line in f if line.strip()]
    if not templates:
        raise KDError(f"hypothesis templates file {path} is empty")
    for t in templates:
        check_template(t)
    if len(set(templates)) != len(templates):
        raise KDError(f"hypothesis templates file {path} repeats a template")
    return templates


def load_descriptions(path: str, class_names: Sequence[str]) -> dict[str, list[str]]:
    """Extra descriptions of the classes: lines ``class name<TAB>description`` (a class may have many lines).

    Every class name must be one of ``class_names``; classes without a line keep only their name."""
    if not os.path.isfile(path):
        raise KDError(f"class descriptions file not found: {path}")
    out: dict[str, list[str]] = {}
    with reading("class descriptions file", path), open(path, encoding="utf-8") as f:
        for i, line in enumerate(f, 1):
            if not line.strip():
                continue
            name, sep, desc = line.rstrip("\r\n").partition("\t")
            name, desc = name.strip(), desc.strip()
            if not sep or not desc:
                raise KDError(f"class descriptions file {path}, line {i}: expected 'class name<TAB>description'")
            if name not in class_names:
                raise KDError(f"class descriptions file {path}, line {i}: '{name}' is not a class name "
                              f"({', '.join(class_names)})")
            if desc not in out.setdefault(name, []) and desc != name:
                out[name].append(desc)
    if not out:
        raise KDError(f"class descriptions file {path} is empty")
    return out


def class_prompts(class_names: Sequence[str], templates: Sequence[str],
                  descriptions: Optional[dict[str, list[str]]] = None) -> tuple[list[str], list[int]]:
    """Every (template, description) hypothesis of every class, and the class index of each: the teachers score
    them all and average per class. A class's descriptions are its name plus its ``descriptions`` entries."""
    hyps: list[str] = []
    group: list[int] = []
    for k, name in enumerate(class_names):
        for desc in [name] + list((descriptions or {}).get(name, [])):
            for t in templates:
                hyps.append(check_template(t).format(desc))
                group.append(k)
    return hyps, group
