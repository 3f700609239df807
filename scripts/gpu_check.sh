#!/usr/bin/env bash
# The CUDA check list (benchmarks/gpu_check.py): fused KD loss == naive on the GPU, a bf16 ZeRO-3 student + ZeRO-3
# teacher KD step through the real engine (tokens/s, MFU, peak memory), DeepSpeed's FusedAdam chosen, gradient
# checkpointing on/off, a minillm rollout, sparse rows with tail samples on the device; one JSON line last (also
# $OUT/gpu_check.json when OUT is set).
#
# On the CPU machine first:  bash scripts/gpu_wheels.sh     (wheels the GPU image lacks + SmolLM2's config/tokenizer)
# Then on a GPU machine:     bash scripts/gpu_check.sh      (carry .gpu_wheels; <= 8 minutes on one H200)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
W=.gpu_wheels
if ! "$PY" -c "import deepspeed, datasets" 2>/dev/null; then
  ls "$W"/*.whl >/dev/null 2>&1 || { echo "error: deepspeed/datasets missing and no wheels in $W (run scripts/gpu_wheels.sh)" >&2; exit 2; }
  "$PY" -m pip install -q --no-index --no-deps --target "$W/site" "$W"/*.whl
  export PYTHONPATH="$(pwd)/$W/site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$(pwd)${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || true
timeout "${GPU_CHECK_TIMEOUT:-480}" "$PY" benchmarks/gpu_check.py --output "${OUT:-.}/gpu_check.json" "$@"
