#!/usr/bin/env bash
# Set up (scripts/setup.sh) and run the test suite on CPU with real DeepSpeed.
# Extra arguments go to pytest, e.g.  bash scripts/test.sh -m "not slow"
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
export DS_ACCELERATOR=cpu GLOO_SOCKET_IFNAME=lo HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
# tests/test_slurm.py starts a local SLURM cluster (scripts/slurm/local_cluster.sh) and stops it at the end;
# this trap also stops it when pytest is interrupted (only if it was not running before)
if ! bash scripts/slurm/local_cluster.sh status >/dev/null 2>&1; then
  trap 'bash scripts/slurm/local_cluster.sh status >/dev/null 2>&1 && bash scripts/slurm/local_cluster.sh stop' EXIT
fi
set +e
python -m pytest -q -p no:cacheprovider --durations=15 "$@"
rc=$?
set -e
[ "$rc" = 5 ] && { echo "pytest collected no tests" >&2; exit 1; }
exit "$rc"
