"""Statistics of a comparison: mean ± std over seeds, and a paired bootstrap interval of a row minus the baseline.

Pairing: when every cell of both rows scored the same examples (per-example parts), one bootstrap resample draws
example indices with replacement and applies them to every seed of both rows (the same examples, the same seeds):
the row's score is the mean over its seeds of ``transform(sum num / sum den)`` on the resample, and the interval is
the 2.5 / 97.5 percentiles of (row - baseline) over ``resamples`` draws (Koehn 2004's paired bootstrap, averaged
over seeds). Otherwise (an evaluator without parts) the seeds themselves are resampled, paired by seed.
"""
from __future__ import annotations

import math
import statistics
from typing import Optional

import numpy as np



def mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.mean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def _score(parts: np.ndarray, idx: np.ndarray, kind: str) -> np.ndarray:
    """Per resample (rows of ``idx``): transform(sum num / sum den) of ``parts[idx]``."""
    num, den = parts[idx, 0].sum(-1), parts[idx, 1].sum(-1)
    ratio = num / np.maximum(den, 1e-12)
    return np.exp(ratio) if kind == "perplexity" else ratio


def paired_interval(row: dict[int, dict], base: dict[int, dict], kind: str, resamples: int = 2000,
                    seed: int = 0) -> Optional[tuple[float, float, str]]:
    """(low, high, how) of row - baseline; ``row`` / ``base``: {seed: evaluate() result}. None without a pair."""
    seeds = sorted(set(row) & set(base))
    if not seeds:
        return None
    rng = np.random.default_rng(seed)
    parts = [row[s]["parts"] for s in seeds] + [base[s]["parts"] for s in seeds]
    if all(p is not None for p in parts) and len({len(p) for p in parts}) == 1 and len(parts[0]) > 1:
        n = len(parts[0])
        idx = rng.integers(0, n, size=(resamples, n))
        arr = [np.asarray(p, dtype=np.float64) for p in parts]
        k = len(seeds)
        diff = np.mean([_score(a, idx, kind) for a in arr[:k]], 0) - np.mean([_score(a, idx, kind) for a in arr[k:]], 0)
        how = f"paired bootstrap over {n} examples x {k} seed(s)"
    else:
        d = np.asarray([row[s]["value"] - base[s]["value"] for s in seeds])
        if len(d) < 2:
            return (float(d[0]), float(d[0]), "one seed, no interval")
        diff = d[rng.integers(0, len(d), size=(resamples, len(d)))].mean(-1)
        how = f"bootstrap over {len(d)} paired seeds"
    lo, hi = np.percentile(diff, [2.5, 97.5])
    return float(lo), float(hi), how


def fmt(x: float) -> str:
    return "nan" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.4f}"

