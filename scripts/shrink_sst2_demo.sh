#!/usr/bin/env bash
# Issue 5's real run: all-MiniLM-L6-v2 + 2-way head fine-tuned on SST-2 (teacher), shrunk 6->3 and 6->2 by
# copying teacher layers, each student trained with --method sft (labels only) and --method kd (logits of the
# fine-tuned teacher); held-out accuracy and inference speedup via benchmarks/shrink_speed.py.
#
#   bash scripts/shrink_sst2_demo.sh   # measured ~60 min on 2 shared cores at load 6-11: teacher 38, students 12, bench 9
#   STEPS=100 STUDENT_STEPS=50 bash scripts/shrink_sst2_demo.sh   # quicker, lower accuracy
#
# Env: OUT (outputs/sst2demo), DATA (../shared/data/sst2/train.tsv), WORK (tmp dir for the tsv slices),
#      STEPS (teacher steps, 250 = 2 epochs of 4000 at batch 32), STUDENT_STEPS (100, every student),
#      LR (1e-4), TRAIN_ROWS (4000), EVAL_FROM (60001), EVAL_ROWS (1000),
#      PARALLEL (1: the four students train side by side, 1 OMP thread each; 0: one after the other, 2 threads).
# Data rows are counted after the header: train = rows 1..TRAIN_ROWS, held-out = rows EVAL_FROM.. (+EVAL_ROWS).
# A stage whose OUT/<name>/final/config.json exists is skipped (delete it to redo).
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib.sh
OUT=${OUT:-outputs/sst2demo}
DATA=${DATA:-../shared/data/sst2/train.tsv}
WORK=${WORK:-${TMPDIR:-/tmp}/sst2demo}
STEPS=${STEPS:-250}
STUDENT_STEPS=${STUDENT_STEPS:-100}
LR=${LR:-1e-4}
TRAIN_ROWS=${TRAIN_ROWS:-4000}
EVAL_FROM=${EVAL_FROM:-60001}
EVAL_ROWS=${EVAL_ROWS:-1000}
PARALLEL=${PARALLEL:-1}
[ -f "$DATA" ] || { echo "missing $DATA (GLUE SST-2 train.tsv: sentence<TAB>label with a header)" >&2; exit 2; }
mkdir -p "$OUT"
tsv_slices "$DATA" "$WORK" "$TRAIN_ROWS" "$EVAL_FROM" "$EVAL_ROWS"

COMMON=(--train_file "$WORK/train.tsv" --eval_file "$WORK/eval.tsv" --text_column sentence --label_column label
        --max_length 64 --per_device_train_batch_size 32 --learning_rate "$LR" --logging_steps 25
        --report_to none --disable_tqdm true --overwrite_output_dir true)

train() {  # name, steps, OMP threads, then method arguments
  local name=$1 steps=$2 threads=$3; shift 3
  train_stage "$name" "$threads" "$@" --max_steps "$steps" --warmup_steps $(( steps / 10 )) "${COMMON[@]}"
}

# 1. teacher: the sentence-embedding encoder (no head) gets a fresh 2-way classification head
train teacher "$STEPS" 2 --method sft --student offline:all-minilm-l6-v2 --num_labels 2
T=$OUT/teacher/final

# 2. students built from the fine-tuned teacher's layers (6->3 copies [0, 2, 5], 6->2 copies [0, 5]),
#    same data and steps: sft = labels only, kd = 0.5 * T^2 KL(teacher || student) at T=2 + 0.5 * CE
if [ "$PARALLEL" = 1 ]; then  # all four side by side, 1 OMP thread each
  pids=()
  for L in 3 2; do
    for M in sft kd; do
      train l${L}_$M "$STUDENT_STEPS" 1 --method $M --teacher "$T" --student.layers $L & pids+=($!)
    done
  done
  for p in "${pids[@]}"; do wait "$p"; done
else
  for L in 3 2; do
    for M in sft kd; do
      train l${L}_$M "$STUDENT_STEPS" 2 --method $M --teacher "$T" --student.layers $L
    done
  done
fi

# 3. accuracy on the held-out rows, speed of batch 32 x 64 tokens (1 thread), speedup vs the teacher
OMP_NUM_THREADS=1 $PY benchmarks/shrink_speed.py --eval_file "$WORK/eval.tsv" \
  --model "teacher (6 layers)=$T" --model "3-layer sft=$OUT/l3_sft/final" --model "3-layer kd=$OUT/l3_kd/final" \
  --model "2-layer sft=$OUT/l2_sft/final" --model "2-layer kd=$OUT/l2_kd/final"
