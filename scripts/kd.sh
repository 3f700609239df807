#!/usr/bin/env bash
# Logit KD (Hinton). Single node:  NGPUS=8 bash scripts/kd.sh --teacher T --student.layers 6 --train_file F ...
# Any engine/method option can be appended; DS_CONFIG picks the ZeRO JSON (default zero2; zero3 partitions the
# teacher too). On a CPU-only machine this runs one process through plain python.
set -euo pipefail
cd "$(dirname "$0")/.."
DS_CONFIG=${DS_CONFIG:-ds_configs/zero2.json}
OUT=${OUT:-outputs/kd}
if command -v nvidia-smi >/dev/null 2>&1; then
  NGPUS=${NGPUS:-$(nvidia-smi -L | wc -l)}
  exec deepspeed --num_gpus "$NGPUS" launch/train.py --method kd --deepspeed "$DS_CONFIG" --output_dir "$OUT" "$@"
fi
exec python launch/train.py --method kd --deepspeed "$DS_CONFIG" --output_dir "$OUT" "$@"
