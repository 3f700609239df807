#!/usr/bin/env bash
# DistilBART-MNLI "shrink and fine-tune" (no teacher), for GPU machines.
#
#   1. bart-large-mnli (12 encoder + 12 decoder layers) -> 12-N student: all encoder layers, decoder layers
#      picked by make_student.py's map (12-6: teacher decoder layers 0,2,4,7,9,11), via kd_engine.shrink.
#   2. Supervised fine-tuning (--method sft: cross-entropy on the MNLI labels) under DeepSpeed ZeRO-2 with the
#      seed's settings (distilbart-mnli args.json): lr 3e-5, batch 32 x grad accumulation 4, 2 epochs,
#      warmup 500, max length 128, weight decay 0.01, Adam beta2 0.98, encoder and embeddings frozen.
#
# Usage (every setting is an environment variable):
#   MNLI_TRAIN=data/mnli/train.jsonl MNLI_EVAL=data/mnli/dev_matched.jsonl NUM_GPUS=8 scripts/distilbart_mnli.sh
#   TEACHER=/models/bart-large-mnli DECODER_LAYERS=3 OUT=runs/distilbart-mnli-12-3 scripts/distilbart_mnli.sh
# MNLI data: jsonl with premise / hypothesis / label_text (as ../shared/data/mnli/dev_matched.jsonl), or the GLUE
# tsv (set TEXT_COLUMN=sentence1 PAIR_COLUMN=sentence2 LABEL_COLUMN=gold_label). Text labels are mapped through
# the model's label2id (bart-large-mnli: contradiction 0, neutral 1, entailment 2), so use the label text column.
# The seed trained in fp16; on bf16 GPUs set DS_CONFIG=ds_configs/zero2_bf16.json.
set -euo pipefail
cd "$(dirname "$0")/.."

TEACHER=${TEACHER:-facebook/bart-large-mnli}        # hub id or a local copy
DECODER_LAYERS=${DECODER_LAYERS:-6}                 # 12-N student: 1, 3, 6 or 9 in the distilbart-mnli release
MNLI_TRAIN=${MNLI_TRAIN:-data/mnli/train.jsonl}
MNLI_EVAL=${MNLI_EVAL:-../shared/data/mnli/dev_matched.jsonl}
TEXT_COLUMN=${TEXT_COLUMN:-premise}
PAIR_COLUMN=${PAIR_COLUMN:-hypothesis}
LABEL_COLUMN=${LABEL_COLUMN:-label_text}
OUT=${OUT:-runs/distilbart-mnli-12-${DECODER_LAYERS}}    # ${OUT}/student_init: shrunk student, ${OUT}/train: run
STUDENT_DIR=${STUDENT_DIR:-${OUT}/student_init}
NUM_GPUS=${NUM_GPUS:-1}
DS_CONFIG=${DS_CONFIG:-ds_configs/zero2.json}
PER_DEVICE_BATCH=${PER_DEVICE_BATCH:-32}            # seed: 32 per device
GRAD_ACCUM=${GRAD_ACCUM:-4}
MASTER_PORT=${MASTER_PORT:-29511}

if [ ! -f "$MNLI_TRAIN" ]; then
  echo "error: MNLI training file not found: $MNLI_TRAIN (set MNLI_TRAIN)" >&2
  exit 2
fi

# 1. shrink (skipped when the student folder already exists, e.g. on a re-run)
if [ ! -f "${STUDENT_DIR}/config.json" ]; then
  python -m kd_engine.shrink --teacher "$TEACHER" --decoder_layers "$DECODER_LAYERS" --output_dir "$STUDENT_DIR"
fi

# 2. fine-tune the shrunk student on MNLI labels (no teacher)
deepspeed --num_gpus "$NUM_GPUS" --master_port "$MASTER_PORT" launch/train.py \
  --method sft \
  --deepspeed "$DS_CONFIG" \
  --student "$STUDENT_DIR" \
  --train_file "$MNLI_TRAIN" \
  --eval_file "$MNLI_EVAL" \
  --text_column "$TEXT_COLUMN" \
  --text_pair_column "$PAIR_COLUMN" \
  --label_column "$LABEL_COLUMN" \
  --max_length 128 \
  --learning_rate 3e-5 \
  --weight_decay 0.01 \
  --adam_beta2 0.98 \
  --per_device_train_batch_size "$PER_DEVICE_BATCH" \
  --gradient_accumulation_steps "$GRAD_ACCUM" \
  --num_train_epochs 2 \
  --warmup_steps 500 \
  --freeze_encoder true \
  --freeze_embeds true \
  --output_dir "${OUT}/train" \
  "$@"
