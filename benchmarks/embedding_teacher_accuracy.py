"""Zero-shot accuracy of the embedding teacher (all-MiniLM-L6-v2) on AG News, and what the temperature does.

    python benchmarks/embedding_teacher_accuracy.py --n_texts 1000

The labels (column 2 of ../shared/data/ag_news/train_subset10k.tsv: World / Sports / Business / Sci/Tech, the
order of classes.txt) are used only to score; the class names given to the teacher are the seed's
"the world", "sports", "business", "science/tech" in that same order. The argmax (hence accuracy) does not depend
on the temperature; the temperature sets how peaked the soft targets are, shown as the mean top probability,
the mean entropy and the negative log-likelihood of the true class. Last line: a JSON object.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from kd_engine.models.loading import offline_model_path  # noqa: E402
from kd_engine.teachers.zero_shot import EMBEDDING_TEMPERATURE, EmbeddingTeacher  # noqa: E402

DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "shared", "data", "ag_news")
CLASS_NAMES = ["the world", "sports", "business", "science/tech"]


def load_ag_news(n: int) -> tuple[list[str], torch.Tensor]:
    with open(os.path.join(DATA, "classes.txt"), encoding="utf-8") as f:
        order = [line.strip() for line in f if line.strip()]
    assert order == ["World", "Sports", "Business", "Sci/Tech"], order  # matches CLASS_NAMES
    texts, labels = [], []
    with open(os.path.join(DATA, "train_subset10k.tsv"), encoding="utf-8") as f:
        for line in f:
            text, label = line.rstrip("\n").rsplit("\t", 1)
            texts.append(text)
            labels.append(order.index(label))
            if len(texts) == n:
                break
    return texts, torch.tensor(labels)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n_texts", type=int, default=1000)
    ap.add_argument("--batch_size", type=int, default=64)
    ap.add_argument("--template", default="This text is about {}.")
    ap.add_argument("--temperatures", default="1.0,0.1,0.05,0.02")
    args = ap.parse_args()
    if not os.path.isdir(DATA):
        sys.exit(f"AG News not found at {DATA}")
    from transformers import AutoModel, AutoTokenizer

    path = offline_model_path("all-minilm-l6-v2")
    model, tok = AutoModel.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path)
    texts, y = load_ag_news(args.n_texts)
    teacher = EmbeddingTeacher(model, tok, args.template, CLASS_NAMES)
    t0 = time.perf_counter()
    cos = teacher.cosine(texts, args.batch_size)
    secs = time.perf_counter() - t0
    acc = float((cos.argmax(1) == y).float().mean())
    rows = []
    for t in [float(x) for x in args.temperatures.split(",")]:
        logp = torch.log_softmax(cos / t, dim=1)
        p = logp.exp()
        rows.append({"temperature": t, "accuracy": acc, "nll_true_class": float(-logp[torch.arange(len(y)), y].mean()),
                     "mean_top_prob": float(p.max(1).values.mean()),
                     "mean_entropy": float(-(p * logp).sum(1).mean())})
    print(f"{'T':>6} {'acc':>6} {'NLL':>6} {'top p':>6} {'entropy':>7}")
    for r in rows:
        print(f"{r['temperature']:>6} {r['accuracy']:6.3f} {r['nll_true_class']:6.3f} {r['mean_top_prob']:6.3f} "
              f"{r['mean_entropy']:7.3f}")
    per_class = {CLASS_NAMES[k]: float((cos.argmax(1)[y == k] == k).float().mean()) for k in range(len(CLASS_NAMES))}
    print(json.dumps({"n_texts": len(texts), "accuracy": acc, "per_class_recall": per_class,
                      "default_temperature": EMBEDDING_TEMPERATURE, "by_temperature": rows,
                      "embed_seconds": round(secs, 2), "threads": torch.get_num_threads()}))


if __name__ == "__main__":
    main()
