#!/usr/bin/env bash
# MiniLMv2 (self-attention relation distillation) with the bloomberg run.sh settings (bloomberg/minilmv2.bb run.sh):
# teacher bert-base-uncased (last layer), 6L x 384H x 12-head student initialised at random, 48 relation heads,
# lr 6e-4, 4000 warmup steps, 400k steps, batch 256 per device, AdamW eps 1e-6, wd 0.01, sequences of 512 tokens
# (PaddleNLP uses 128), raw-text corpus packed into blocks. The only signal is the Q-Q + K-K + V-V relation KL.
#
#   NGPUS=8 TRAIN=/data/wiki_books bash scripts/minilmv2.sh                       # the reference recipe
#   TEACHER=offline:all-minilm-l6-v2 LAYERS=3 BATCH=8 STEPS=100 WARMUP=10 MAX_LENGTH=128 bash scripts/minilmv2.sh
#
# Env: TEACHER, TRAIN (file, folder or glob; default the Wikipedia sample), LAYERS (6), HIDDEN (384), HEADS (12),
#      RELATION_HEADS (48: must divide the Q/K/V width of teacher and student), TEACHER_LAYER (last),
#      LR (6e-4), WARMUP (4000), STEPS (400000), BATCH (256 per device on GPU, 8 on CPU), MAX_LENGTH (512),
#      DS_CONFIG (ds_configs/zero2.json), OUT (outputs/minilmv2), NGPUS (all visible GPUs).
# Any engine/method option can be appended and wins over these (e.g. --relation_chunk_size 64 --save_steps 10000).
# Without nvidia-smi this runs one process through plain python (CPU).
set -euo pipefail
cd "$(dirname "$0")/.."
if command -v nvidia-smi >/dev/null 2>&1; then GPU=1; else GPU=0; fi
TEACHER=${TEACHER:-bert-base-uncased}
TRAIN=${TRAIN:-../shared/data/enwiki_2015_sample}
DS_CONFIG=${DS_CONFIG:-ds_configs/zero2.json}
OUT=${OUT:-outputs/minilmv2}
BATCH=${BATCH:-$([ "$GPU" = 1 ] && echo 256 || echo 8)}
ARGS=(--method minilmv2 --teacher "$TEACHER" --train_file "$TRAIN" --deepspeed "$DS_CONFIG" --output_dir "$OUT"
      --student.layers "${LAYERS:-6}" --student.hidden "${HIDDEN:-384}" --student.heads "${HEADS:-12}"
      --student.init random --relation_heads "${RELATION_HEADS:-48}"
      --learning_rate "${LR:-6e-4}" --warmup_steps "${WARMUP:-4000}" --max_steps "${STEPS:-400000}"
      --per_device_train_batch_size "$BATCH" --max_length "${MAX_LENGTH:-512}"
      --adam_beta1 0.9 --adam_beta2 0.999 --adam_epsilon 1e-6 --weight_decay 0.01 --blocks packed)
[ -n "${TEACHER_LAYER:-}" ] && ARGS+=(--teacher_layer "$TEACHER_LAYER")
if [ "$GPU" = 1 ]; then
  NGPUS=${NGPUS:-$(nvidia-smi -L | wc -l)}
  exec deepspeed --num_gpus "$NGPUS" launch/train.py "${ARGS[@]}" "$@"
fi
exec python launch/train.py "${ARGS[@]}" "$@"
