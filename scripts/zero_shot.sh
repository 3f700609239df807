#!/usr/bin/env bash
# Zero-shot classifier distillation (HF zero-shot-distillation example): a zero-shot teacher labels unlabeled text
# once (sharded over the ranks, cached, resumable), a small K-way classifier learns its soft labels.
#
# Defaults reproduce the AG News setup offline on this project's machines: embedding teacher all-MiniLM-L6-v2
# (offline:all-minilm-l6-v2), the seed's class names and template, a 2-layer student built from the teacher's
# layers. With an NLI teacher (the seed: roberta-large-mnli) set TEACHER and TEMPERATURE=1.0.
#
# Usage (every setting is an environment variable; extra arguments go to launch/train.py):
#   DATA=unlabeled.txt CLASSES=classes.txt scripts/zero_shot.sh
#   TEACHER=roberta-large-mnli TEMPERATURE=1.0 NUM_GPUS=8 STUDENT=distilbert-base-uncased scripts/zero_shot.sh
#   scripts/zero_shot.sh --max_steps 200          # on CPU: LAUNCHER=python (one process) or torchrun
set -euo pipefail
cd "$(dirname "$0")/.."

TEACHER=${TEACHER:-offline:all-minilm-l6-v2}
DATA=${DATA:-../shared/data/ag_news/train_subset10k.tsv}
TEXT_COLUMN=${TEXT_COLUMN:-text}
DATA_COLUMNS=${DATA_COLUMNS:-text,label}            # names of the columns of a header-less csv/tsv (AG News)
CLASSES=${CLASSES:-}
DEFAULT_TEMPLATE='This text is about {}.'
TEMPLATE=${TEMPLATE:-$DEFAULT_TEMPLATE}
TEMPERATURE=${TEMPERATURE:-}                        # default: 1.0 for NLI teachers, 0.05 for sentence encoders
STUDENT=${STUDENT:-}                                # empty: build from the teacher with STUDENT_LAYERS layers
STUDENT_LAYERS=${STUDENT_LAYERS:-2}
OUT=${OUT:-runs/zero_shot}
NUM_GPUS=${NUM_GPUS:-1}
LAUNCHER=${LAUNCHER:-deepspeed}                     # deepspeed | torchrun | python
DS_CONFIG=${DS_CONFIG:-ds_configs/zero0.json}
MASTER_PORT=${MASTER_PORT:-29512}

if [ -z "$CLASSES" ]; then
  CLASSES=$(mktemp)
  printf 'the world\nsports\nbusiness\nscience/tech\n' > "$CLASSES"   # the seed's AG News class names
fi
args=(--method zero_shot --deepspeed "$DS_CONFIG" --teacher "$TEACHER" --data_file "$DATA"
      --text_column "$TEXT_COLUMN" --data_columns "$DATA_COLUMNS" --class_names_file "$CLASSES" --hypothesis_template "$TEMPLATE"
      --output_dir "$OUT" --per_device_train_batch_size 32 --learning_rate 5e-5 --num_train_epochs 1)
[ -n "$TEMPERATURE" ] && args+=(--temperature "$TEMPERATURE")
if [ -n "$STUDENT" ]; then args+=(--student "$STUDENT"); else args+=(--student.layers "$STUDENT_LAYERS"); fi

case "$LAUNCHER" in
  deepspeed) exec deepspeed --num_gpus "$NUM_GPUS" --master_port "$MASTER_PORT" launch/train.py "${args[@]}" "$@" ;;
  torchrun)  exec torchrun --nproc_per_node "$NUM_GPUS" --master_addr 127.0.0.1 --master_port "$MASTER_PORT" \
               launch/train.py "${args[@]}" "$@" ;;
  python)    RANK=0 WORLD_SIZE=1 LOCAL_RANK=0 MASTER_ADDR=127.0.0.1 MASTER_PORT="$MASTER_PORT" \
               exec python launch/train.py "${args[@]}" "$@" ;;
  *) echo "error: LAUNCHER must be deepspeed, torchrun or python (got $LAUNCHER)" >&2; exit 2 ;;
esac
