"""Run a comparison's cells, evaluate each exported student, and write the report.

A cell is one training run (``<output_dir>/cells/<row>-seed<k>``, started through the training CLI with
``--resume auto``) followed by its evaluation (``<cell>/compare_eval.json``, written atomically). Rerunning the
comparison never reruns a finished cell (its evaluation file exists), evaluates a trained but unevaluated one, and
resumes a killed one from its last checkpoint (the engine's own exact resume). A cell's output goes to
``<output_dir>/logs/<cell>.log``. A failed cell is reported and the others still run; the report then marks it
missing and the command exits 1.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time

from ..errors import KDError
from ..io import atomic_file
from .evaluate import evaluate
from .spec import Cell, Spec

EVAL_FILE = "compare_eval.json"


def cell_result(cell: Cell):
    path = os.path.join(cell.output_dir, EVAL_FILE)
    if not os.path.isfile(path):
        return None
    from ..input_files import read_json

    return read_json(path, "compare cell result")


def _train(spec: Spec, cell: Cell) -> None:
    logs = os.path.join(spec.output_dir, "logs")
    os.makedirs(logs, exist_ok=True)
    cmd = list(spec.launch) if spec.launch else [sys.executable]
    cmd += ["-m", "kd_engine.cli", *cell.argv, "--resume", "auto", "--disable_tqdm", "true"]
    with open(os.path.join(logs, f"{cell.name}.log"), "a", encoding="utf-8") as log:
        log.write(f"$ {' '.join(cmd)}\n")
        log.flush()
        p = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=os.getcwd())
    if p.returncode != 0:
        raise KDError(f"cell {cell.name}: training exited with {p.returncode} (log: {logs}/{cell.name}.log)")


def run_cell(spec: Spec, cell: Cell) -> tuple[dict, str]:
    """Train (or resume) and evaluate one cell; (result, what was done)."""
    done = cell_result(cell)
    if done is not None:
        return done, "finished before"
    final = os.path.join(cell.output_dir, "final")
    t0 = time.time()
    how = "evaluated"
    if not os.path.isfile(os.path.join(final, "config.json")):
        _train(spec, cell)
        how = "trained and evaluated"
    res = evaluate(spec.evaluator, final)
    res.update(row=cell.row, seed=cell.seed, seconds=round(time.time() - t0, 1), kind=spec.evaluator["kind"])
    with atomic_file(os.path.join(cell.output_dir, EVAL_FILE)) as fh:
        json.dump(res, fh)
    return res, how


def run_all(spec: Spec, cells: list[Cell]) -> list[str]:
    """Every cell in order; the names of the cells that failed."""
    failed = []
    for i, cell in enumerate(cells):
        try:
            res, how = run_cell(spec, cell)
        except KDError as exc:
            print(f"[{i + 1}/{len(cells)}] {cell.name}: FAILED: {exc}", flush=True)
            failed.append(cell.name)
            continue
        print(f"[{i + 1}/{len(cells)}] {cell.name}: {how}, {spec.evaluator['kind']} {res['value']:.4f}", flush=True)
    return failed
