"""Figures of a training run: ``python -m kd_engine.report OUTPUT_DIR [--out DIR]``.

Reads ``OUTPUT_DIR/train_log.jsonl`` and writes PNGs (matplotlib, the ``[plots]`` extra) to ``OUTPUT_DIR/figures``:

- ``loss_terms.png``: the total loss and every loss term of the method over steps;
- ``lr.png``: learning rate (and gradient norm when logged);
- ``time_share.png``: teacher and student milliseconds per step, stacked, and the teacher's share;
- ``eval.png``: every evaluation metric over steps (when the run evaluated).

Bad input (no such folder, no or empty log, no train rows, matplotlib missing): one ``error:`` line, exit 2,
nothing written.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys

META = {"step", "split", "epoch", "time", "wall_time", "samples", "tokens"}
NOT_TERMS = {"lr", "grad_norm", "samples_per_s", "tokens_per_s", "teacher_ms", "student_ms"}


def read_log(run_dir: str) -> tuple[list[dict], list[dict]]:
    from .errors import KDError
    from .input_files import reading

    path = os.path.join(run_dir, "train_log.jsonl")
    if not os.path.isdir(run_dir):
        raise KDError(f"{run_dir}: no such folder")
    if not os.path.isfile(path):
        raise KDError(f"{run_dir} has no train_log.jsonl (not a kd_engine output folder?)")
    rows = []
    with reading("training log", path), open(path, encoding="utf-8") as f:
        for i, line in enumerate(f, 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except ValueError:
                    raise KDError(f"{path}:{i}: not JSON") from None
    train = [r for r in rows if r.get("split") == "train" and "step" in r]
    if not train:
        raise KDError(f"{path} has no training rows yet")
    return train, [r for r in rows if r.get("split") == "eval" and "step" in r]


def _numeric(rows: list[dict], key: str) -> tuple[list[int], list[float]]:
    pts = [(r["step"], float(r[key])) for r in rows if isinstance(r.get(key), (int, float))
           and math.isfinite(float(r[key]))]
    return [p[0] for p in pts], [p[1] for p in pts]


def _keys(rows: list[dict], skip: set) -> list[str]:
    seen = []
    for r in rows:
        for k, v in r.items():
            if k not in skip and k not in seen and isinstance(v, (int, float)) and not isinstance(v, bool):
                seen.append(k)
    return seen


def figures(train: list[dict], evals: list[dict], out_dir: str, plt) -> list[str]:
    written = []

    def save(fig, name):
        fig.tight_layout()
        path = os.path.join(out_dir, name)
        fig.savefig(path, dpi=100)
        plt.close(fig)
        written.append(path)

    fig, ax = plt.subplots(figsize=(7, 4))
    for k in ["loss"] + [k for k in _keys(train, META | NOT_TERMS) if k != "loss"]:
        x, y = _numeric(train, k)
        if x:
            ax.plot(x, y, label=k, lw=2 if k == "loss" else 1)
    ax.set_xlabel("step")
    ax.set_ylabel("loss (weighted terms)")
    ax.legend()
    ax.grid(alpha=0.3)
    save(fig, "loss_terms.png")

    fig, ax = plt.subplots(figsize=(7, 4))
    x, y = _numeric(train, "lr")
    ax.plot(x, y, label="lr")
    ax.set_xlabel("step")
    ax.set_ylabel("learning rate")
    gx, gy = _numeric(train, "grad_norm")
    if gx:
        ax2 = ax.twinx()
        ax2.plot(gx, gy, color="tab:red", alpha=0.6, label="grad_norm")
        ax2.set_ylabel("gradient norm")
    ax.grid(alpha=0.3)
    save(fig, "lr.png")

    tx, ty = _numeric(train, "teacher_ms")
    sx, sy = _numeric(train, "student_ms")
    if tx and sx and tx == sx:
        fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4))
        a1.stackplot(tx, ty, sy, labels=["teacher", "student"])
        a1.set_xlabel("step")
        a1.set_ylabel("ms per step")
        a1.legend(loc="upper right")
        a2.plot(tx, [t / (t + s) if t + s > 0 else 0.0 for t, s in zip(ty, sy)])
        a2.set_ylim(0, 1)
        a2.set_xlabel("step")
        a2.set_ylabel("teacher share of step time")
        a2.grid(alpha=0.3)
        save(fig, "time_share.png")

    keys = _keys(evals, META)
    if keys:
        cols = min(3, len(keys))
        rows_n = -(-len(keys) // cols)
        fig, axes = plt.subplots(rows_n, cols, figsize=(4 * cols, 3 * rows_n), squeeze=False)
        for ax, k in zip(axes.flat, keys):
            x, y = _numeric(evals, k)
            ax.plot(x, y, "o-")
            ax.set_title(k)
            ax.set_xlabel("step")
            ax.grid(alpha=0.3)
        for ax in list(axes.flat)[len(keys):]:
            ax.axis("off")
        save(fig, "eval.png")
    return written


def main(argv=None) -> int:
    from .errors import KDError

    ap = argparse.ArgumentParser(prog="python -m kd_engine.report", description=__doc__.split("\n")[0])
    ap.add_argument("output_dir", help="a training run's --output_dir (holds train_log.jsonl)")
    ap.add_argument("--out", default=None, help="folder for the PNGs (default OUTPUT_DIR/figures)")
    a = ap.parse_args(sys.argv[1:] if argv is None else argv)
    try:
        train, evals = read_log(a.output_dir)
        try:
            import matplotlib
            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError:
            raise KDError("matplotlib is not installed: pip install 'kd_engine[plots]' (or pip install "
                          "matplotlib)") from None
        out = a.out or os.path.join(a.output_dir, "figures")
        os.makedirs(out, exist_ok=True)
        written = figures(train, evals, out, plt)
    except KDError as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        return 2
    print(f"{len(written)} figures in {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
