#!/usr/bin/env bash
# Cross-tokenizer KD (teacher and student with different tokenizers). Single node:
#   NGPUS=8 bash scripts/xtoken_kd.sh --teacher T --student S --train_file corpus.txt [--lmbda 0.5] ...
# METHOD=uld runs ULD instead. Any engine/method option can be appended; DS_CONFIG picks the ZeRO JSON (default
# zero2; zero3 partitions the teacher too). On a CPU-only machine this runs one process through plain python.
set -euo pipefail
cd "$(dirname "$0")/.."
METHOD=${METHOD:-xtoken_kd}
DS_CONFIG=${DS_CONFIG:-ds_configs/zero2.json}
OUT=${OUT:-outputs/$METHOD}
if command -v nvidia-smi >/dev/null 2>&1; then
  NGPUS=${NGPUS:-$(nvidia-smi -L | wc -l)}
  exec deepspeed --num_gpus "$NGPUS" launch/train.py --method "$METHOD" --deepspeed "$DS_CONFIG" --output_dir "$OUT" "$@"
fi
exec python launch/train.py --method "$METHOD" --deepspeed "$DS_CONFIG" --output_dir "$OUT" "$@"
