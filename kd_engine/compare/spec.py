"""The comparison spec: one YAML (or JSON) file naming a base config, rows, seeds, an evaluator and a baseline.

    output_dir: runs/compare            # cells go to <output_dir>/cells/<row>-seed<k>
    base:                               # training options every cell shares (as in a --config file)
      teacher: offline:smollm2-135m
      train_file: data/train.txt
      max_steps: 200
    rows:                               # one row per method x overrides; names are the table's rows
      - {name: ce, method: sft}
      - {name: kd, method: kd, options: {alpha: 0.5, temperature: 1.0}}
    seeds: [0, 1, 2]
    evaluator: {kind: bits_per_byte, file: heldout.txt}
    baseline: ce                        # each row's paired bootstrap interval is against this row
    launch: [torchrun, --nproc_per_node, "2"]   # optional: how a cell is started (default: plain python)

In option values, ``{seed}`` is the cell's seed and ``{output_dir}`` the comparison's folder, so a row can start
from another row's student of the same seed (``teacher: "{output_dir}/cells/kd-seed{seed}/final"``); cells run
row by row in the spec's order (with ``--slurm`` they run at once: run such a row in a second comparison).

Every cell's options are checked by the training CLI's own parser before anything runs or is written (an error
names the cell); two rows with the same method and options, a baseline not in ``rows``, an evaluator that cannot
load and unknown keys are errors too.
"""
from __future__ import annotations

import difflib
import json
import os
import re
from dataclasses import dataclass
from typing import Optional

from ..errors import ConfigError

TOP_KEYS = ("output_dir", "base", "rows", "seeds", "evaluator", "baseline", "launch", "bootstrap")
ROW_KEYS = ("name", "method", "options")
ENGINE_OWNED = ("output_dir", "seed", "resume", "overwrite_output_dir", "config")


@dataclass(frozen=True)
class Cell:
    row: str
    seed: int
    argv: tuple[str, ...]
    output_dir: str

    @property
    def name(self) -> str:
        return f"{self.row}-seed{self.seed}"


@dataclass
class Spec:
    path: str
    output_dir: str
    rows: list[dict]
    seeds: list[int]
    evaluator: dict
    baseline: str
    launch: list[str]
    bootstrap: int
    cells: list[Cell]


def _unknown(key: str, known, where: str) -> ConfigError:
    close = difflib.get_close_matches(key, list(known), n=1, cutoff=0.6)
    hint = f"; did you mean '{close[0]}'?" if close else ""
    return ConfigError(f"{where}: unknown key '{key}'{hint}")


def _fill(value, seed: int, out_dir: str):
    """``{seed}`` and ``{output_dir}`` in a string option become the cell's seed and the comparison's folder."""
    if isinstance(value, str):
        return value.replace("{seed}", str(seed)).replace("{output_dir}", out_dir)
    if isinstance(value, list):
        return [_fill(v, seed, out_dir) for v in value]
    return value


def _argv(options: dict, seed: int = 0, out_dir: str = "") -> list[str]:
    from ..config import _flatten_mapping

    out = []
    for key, value in _flatten_mapping(options).items():
        value = _fill(value, seed, out_dir)
        if isinstance(value, bool):
            value = "true" if value else "false"
        elif isinstance(value, list):  # the CLI's list syntax: comma-separated
            value = ",".join("true" if v is True else "false" if v is False else str(v) for v in value)
        elif isinstance(value, dict):
            value = json.dumps(value)
        out += [f"--{key}", str(value)]
    return out


def load_spec(path: str) -> Spec:
    """The spec at ``path``, every cell's config validated by the training CLI's parser (ConfigError otherwise)."""
    from ..config import build_config
    from ..io import load_mapping

    raw = load_mapping(path, "compare spec")
    where = f"compare spec {path}"
    for key in raw:
        if key not in TOP_KEYS:
            raise _unknown(key, TOP_KEYS, where)
    for key in ("output_dir", "rows", "evaluator", "baseline"):
        if key not in raw:
            raise ConfigError(f"{where}: '{key}' is missing")
    base = raw.get("base") or {}
    rows = raw["rows"]
    if not isinstance(base, dict) or not isinstance(rows, list) or not rows:
        raise ConfigError(f"{where}: 'base' must be a mapping and 'rows' a non-empty list")
    seeds = raw.get("seeds", [0])
    if not isinstance(seeds, list) or not seeds or not all(isinstance(s, int) and s >= 0 for s in seeds) \
            or len(set(seeds)) != len(seeds):
        raise ConfigError(f"{where}: 'seeds' must be a list of distinct integers >= 0; got {seeds!r}")
    for key in ENGINE_OWNED:
        if key in base:
            raise ConfigError(f"{where}: base sets '{key}', which the comparison sets per cell")
    seen: dict[str, str] = {}
    names = []
    for i, row in enumerate(rows):
        at = f"{where}, row {i + 1}"
        if not isinstance(row, dict) or "name" not in row:
            raise ConfigError(f"{at}: a row is a mapping with a 'name' (and 'method', 'options')")
        for key in row:
            if key not in ROW_KEYS:
                raise _unknown(key, ROW_KEYS, at)
        name = str(row["name"])
        if not re.fullmatch(r"[A-Za-z0-9_.-]+", name) or name in names:
            raise ConfigError(f"{at}: row name {name!r} must be unique and use letters, digits, '_', '.', '-'")
        names.append(name)
        opts = row.get("options") or {}
        if not isinstance(opts, dict) or any(k in ENGINE_OWNED or k == "method" for k in opts):
            raise ConfigError(f"{at} ({name}): 'options' must be a mapping without {', '.join(ENGINE_OWNED)} or "
                              f"method")
        key = json.dumps({"method": row.get("method"), **{**base, **opts}}, sort_keys=True, default=str)
        if key in seen:
            raise ConfigError(f"{at}: row '{name}' repeats row '{seen[key]}' (same method and options)")
        seen[key] = name
    if raw["baseline"] not in names:
        raise ConfigError(f"{where}: baseline '{raw['baseline']}' is not a row (rows: {', '.join(names)})")
    out_dir = str(raw["output_dir"])
    launch = raw.get("launch") or []
    if not isinstance(launch, list) or not all(isinstance(x, str) for x in launch):
        raise ConfigError(f"{where}: 'launch' must be a list of strings (e.g. [torchrun, --nproc_per_node, '2'])")
    bootstrap = raw.get("bootstrap", 2000)
    if not isinstance(bootstrap, int) or not 100 <= bootstrap <= 100000:
        raise ConfigError(f"{where}: 'bootstrap' (resamples) must be an integer in [100, 100000]")
    cells = []
    for row in rows:
        method = ["--method", str(row["method"])] if row.get("method") else []
        for seed in seeds:
            cell_dir = os.path.join(out_dir, "cells", f"{row['name']}-seed{seed}")
            argv = [*method, *_argv({**base, **(row.get("options") or {})}, seed, out_dir), "--seed", str(seed),
                    "--output_dir", cell_dir]
            try:
                build_config(argv)
            except ConfigError as exc:
                raise ConfigError(f"{where}, cell {row['name']}-seed{seed}: {exc}") from None
            cells.append(Cell(str(row["name"]), seed, tuple(argv), cell_dir))
    from .evaluate import check_evaluator

    evaluator = check_evaluator(raw["evaluator"], where)
    return Spec(path, out_dir, rows, seeds, evaluator, str(raw["baseline"]), launch, bootstrap, cells)


def row_names(spec: Spec) -> list[str]:
    return [str(r["name"]) for r in spec.rows]


def find_cell(spec: Spec, index: Optional[int]) -> list[Cell]:
    if index is None:
        return spec.cells
    if not 0 <= index < len(spec.cells):
        raise ConfigError(f"--cell {index}: the spec has {len(spec.cells)} cells (0..{len(spec.cells) - 1})")
    return [spec.cells[index]]

