"""``python -m kd_engine.compare SPEC.yaml``: train and evaluate every cell of a comparison, then write the report.

    python -m kd_engine.compare spec.yaml              # every cell in sequence (resumable), then the report
    python -m kd_engine.compare spec.yaml --dry_run    # check the spec and list the cells; nothing written
    python -m kd_engine.compare spec.yaml --slurm      # one SLURM array task per cell + a report job after them
    python -m kd_engine.compare spec.yaml --cell 3     # one cell (what each array task runs)
    python -m kd_engine.compare spec.yaml --report     # the report from the cells finished so far

The spec format is in ``kd_engine/compare/spec.py``. A bad spec is one ``error:`` line, exit 2, nothing written.
"""
from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys
from typing import Optional


def _args(argv):
    ap = argparse.ArgumentParser(prog="python -m kd_engine.compare", description=__doc__.splitlines()[0])
    ap.add_argument("spec", help="the comparison spec (YAML or JSON)")
    ap.add_argument("--cell", type=int, default=None, help="run only the cell with this index (0-based)")
    ap.add_argument("--report", action="store_true", help="only write the report from the finished cells")
    ap.add_argument("--dry_run", action="store_true", help="check the spec, list the cells, write nothing")
    ap.add_argument("--slurm", action="store_true", help="submit the cells as a SLURM job array and a report job")
    ap.add_argument("--sbatch_args", default="", help="extra sbatch options for the array, e.g. '--gres=gpu:8 -N 1'")
    return ap.parse_args(argv)


def _submit(spec, extra: str) -> str:
    """Write ``<output_dir>/compare.sbatch``, submit the array and a report job after it; their job ids."""
    os.makedirs(os.path.join(spec.output_dir, "logs"), exist_ok=True)
    script = os.path.join(spec.output_dir, "compare.sbatch")
    py, path = shlex.quote(sys.executable), shlex.quote(os.path.abspath(spec.path))
    with open(script, "w", encoding="utf-8") as fh:
        fh.write(f"#!/bin/bash\n#SBATCH --job-name=kd-compare\n#SBATCH --array=0-{len(spec.cells) - 1}\n"
                 f"#SBATCH --output={os.path.abspath(spec.output_dir)}/logs/array-%a.out\n"
                 f"cd {shlex.quote(os.getcwd())}\nexec {py} -m kd_engine.compare {path} --cell $SLURM_ARRAY_TASK_ID\n")
    array = subprocess.run(["sbatch", "--parsable", *shlex.split(extra), script], capture_output=True, text=True)
    if array.returncode != 0:
        from ..errors import KDError

        raise KDError(f"sbatch refused the array: {array.stderr.strip()}")
    job = array.stdout.strip().split(";")[0]
    rep = subprocess.run(["sbatch", "--parsable", f"--dependency=afterany:{job}", "--job-name=kd-compare-report",
                          f"--output={os.path.abspath(spec.output_dir)}/logs/report.out",
                          f"--wrap={py} -m kd_engine.compare {path} --report"], capture_output=True, text=True)
    if rep.returncode != 0:
        from ..errors import KDError

        raise KDError(f"sbatch refused the report job: {rep.stderr.strip()}")
    return f"array job {job} ({len(spec.cells)} cells), report job {rep.stdout.strip().split(';')[0]}"


def main(argv: Optional[list[str]] = None) -> int:
    from ..errors import KDError

    args = _args(sys.argv[1:] if argv is None else argv)
    try:
        from ..cli import _setup_logging

        _setup_logging(False)
        from .spec import find_cell, load_spec

        spec = load_spec(args.spec)
        cells = find_cell(spec, args.cell)
        if args.dry_run:
            for i, c in enumerate(spec.cells):
                print(f"{i}: {c.name}: {' '.join(c.argv)}")
            return 0
        if args.slurm:
            print(f"submitted: {_submit(spec, args.sbatch_args)}; report in {spec.output_dir}/compare.md")
            return 0
        from .report import write_report
        from .run import run_all

        failed = [] if args.report else run_all(spec, cells)
        if args.cell is not None:
            return 1 if failed else 0
        rep = write_report(spec)
        missing = rep["missing_cells"]
        print(f"compare: {len(spec.cells) - len(missing)}/{len(spec.cells)} cells done; report in "
              f"{os.path.abspath(os.path.join(spec.output_dir, 'compare.md'))}")
        return 1 if failed or missing else 0
    except KDError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
