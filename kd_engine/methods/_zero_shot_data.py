"""Texts and gold labels of the zero-shot method: the unlabeled corpus (plus ``--extra_text_files``), the evaluation
rows (``--eval_file``, or the ``--eval_split`` hold-out of the corpus with its ``--label_column`` when it has one),
and class labels given as names, indices, or names listed in ``--eval_label_names_file``."""
from __future__ import annotations

from typing import Optional, Sequence

from ..data.split import split_rows
from ..errors import KDError
from ..teachers.zero_shot import load_class_names, read_texts


def _columns(path: str, data_columns: Optional[str]) -> Optional[list[str]]:
    if not data_columns or not path.lower().endswith((".csv", ".tsv")):
        return None
    return [c.strip() for c in data_columns.split(",")]


def _table(path: str, data_columns: Optional[str], columns: Sequence[str], split: str = "train"):
    from ..data.files import load_table, require_columns

    ds = load_table(path, split=split, column_names=_columns(path, data_columns))
    require_columns(ds, list(columns), path)
    return ds


def read_corpus(path: str, text_column: str, data_columns: Optional[str],
                label_column: Optional[str] = None) -> tuple[list[str], int, Optional[list]]:
    """(texts, blank rows skipped, their labels or None) of a .txt/.raw (one text per line) or a table."""
    if path.endswith((".txt", ".raw")):
        texts, blank = read_texts(path)
        return texts, blank, None
    ds = _table(path, data_columns, [text_column] + ([label_column] if label_column else []))
    col = ds[text_column]
    keep = [i for i, t in enumerate(col) if isinstance(t, str) and t.strip()]
    if not keep:
        raise KDError(f"data file {path} has no text in column '{text_column}'")
    labels = [ds[label_column][i] for i in keep] if label_column else None
    return [col[i] for i in keep], len(col) - len(keep), labels


def label_indices(values: Sequence, names: Sequence[str], names_file: Optional[str]) -> list[int]:
    """Gold labels as class indices: class names (or the names of ``names_file``, in class order) or integers."""
    order = load_class_names(names_file) if names_file else list(names)
    if len(order) != len(names):
        raise KDError(f"--eval_label_names_file lists {len(order)} labels for {len(names)} classes")
    out = []
    for v in values:
        s = str(v).strip()
        if s in order:
            out.append(order.index(s))
        elif s.lstrip("-").isdigit() and 0 <= int(s) < len(names):
            out.append(int(s))
        else:
            raise KDError(f"label {s!r} is neither a class name ({', '.join(order)}) nor a class index")
    return out


def zero_shot_rows(cfg, opts, names: Sequence[str]) -> dict:
    """Training texts, evaluation texts and their gold labels (or None), under the one split rule of every method.

    With ``--eval_split`` and a ``--label_column`` in the corpus, the held-out rows keep their gold labels
    (accuracy on a dev split of the user's own data); the training rows' labels are never read into the run.
    ``--extra_text_files`` add training texts only (after the split and ``--max_train_samples``); an extra text
    equal to an evaluation text is dropped so that nothing evaluated is trained on."""
    path = opts.data_file or cfg.train_file
    if not path:
        raise KDError("zero_shot needs --data_file (unlabeled texts, one per line)")
    held_labels = cfg.label_column if (cfg.label_column and not cfg.eval_file and cfg.eval_split > 0) else None
    if held_labels and path.endswith((".txt", ".raw")):
        raise KDError(f"--label_column {cfg.label_column} with --eval_split needs a table as --data_file, not {path}")
    texts, blank, labels = read_corpus(path, cfg.text_column, opts.data_columns, held_labels)
    eval_texts, eval_labels = None, None
    if cfg.eval_file:
        if cfg.label_column:
            ds = _table(cfg.eval_file, opts.data_columns, [cfg.text_column, cfg.label_column], split="validation")
            eval_texts = list(ds[cfg.text_column])
            eval_labels = label_indices(list(ds[cfg.label_column]), names, opts.eval_label_names_file)
        else:
            eval_texts, _, _ = read_corpus(cfg.eval_file, cfg.text_column, opts.data_columns)
    rows = split_rows(cfg, len(texts), len(eval_texts) if eval_texts is not None else None)
    if rows.eval is not None and rows.held_out:
        eval_texts = [texts[i] for i in rows.eval]
        if labels is not None:
            eval_labels = label_indices([labels[i] for i in rows.eval], names, opts.eval_label_names_file)
    elif rows.eval is not None:
        eval_texts = [eval_texts[i] for i in rows.eval]
        eval_labels = [eval_labels[i] for i in rows.eval] if eval_labels is not None else None
    train = [texts[i] for i in rows.train]
    extra_rows, leaked = 0, 0
    held = set(eval_texts or ())
    for f in opts.extra_text_files or ():
        more, b, _ = read_corpus(f, cfg.text_column, opts.data_columns)
        blank += b
        kept = [t for t in more if t not in held]
        leaked += len(more) - len(kept)
        extra_rows += len(kept)
        train.extend(kept)
    return {"texts": train, "blank": blank, "eval_texts": eval_texts, "eval_labels": eval_labels,
            "extra_texts": extra_rows, "extra_dropped_as_eval": leaked}
