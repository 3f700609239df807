#!/usr/bin/env bash
# MATE-KD reference recipe for GPUs (huawei-noah/Efficient-NLP/MATE-KD, RoBERTa pairing; methods.md §4.2):
#   teacher   RoBERTa-large fine-tuned on MNLI (roberta-large-mnli)
#   student   distilroberta-base (6 layers; a fresh 3-way head, labels taken from the teacher)
#   generator distilroberta-base's masked-LM (RobertaForMaskedLM, same 50265-token vocabulary)
#   global batch 32, max length 128, student lr 2e-5 (linear, 2138 warm-up steps, over the STUDENT steps only),
#   generator AdamW lr 5e-7 (linear over its own steps), grad clip 5 for both, mask prob 0.3, Gumbel tau 1,
#   10 generator : 100 student steps, loss 1/3 CE + 1/3 D(x~) + 1/3 D(x), evaluation every 500 steps.
# D is KL (our default; the reference's soft cross-entropy is --divergence ce, see the README).
#
# Usage (every setting is an environment variable; extra arguments go to launch/train.py):
#   MNLI_TRAIN=data/mnli/train.jsonl NUM_GPUS=8 PER_DEVICE_BATCH=4 scripts/mate_kd.sh
#   EPOCHS=3 DS_CONFIG=ds_configs/zero3_bf16.json scripts/mate_kd.sh --divergence ce
# The reference trains 30 epochs (EPOCHS) and keeps the best dev checkpoint; we save every SAVE_STEPS and export
# the last. Global batch = PER_DEVICE_BATCH x NUM_GPUS x GRAD_ACCUM (reference: 32). ZeRO-3 also partitions the
# teacher and the generator.
set -euo pipefail
cd "$(dirname "$0")/.."

TEACHER=${TEACHER:-FacebookAI/roberta-large-mnli}
STUDENT=${STUDENT:-distilbert/distilroberta-base}
GENERATOR=${GENERATOR:-distilbert/distilroberta-base}
MNLI_TRAIN=${MNLI_TRAIN:-data/mnli/train.jsonl}
MNLI_EVAL=${MNLI_EVAL:-../shared/data/mnli/dev_matched.jsonl}
TEXT_COLUMN=${TEXT_COLUMN:-premise}
PAIR_COLUMN=${PAIR_COLUMN:-hypothesis}
LABEL_COLUMN=${LABEL_COLUMN:-label_text}      # text labels go through the teacher's label2id
NUM_GPUS=${NUM_GPUS:-$(command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L | wc -l || echo 1)}
PER_DEVICE_BATCH=${PER_DEVICE_BATCH:-$(( 32 / NUM_GPUS > 0 ? 32 / NUM_GPUS : 1 ))}
GRAD_ACCUM=${GRAD_ACCUM:-1}
EPOCHS=${EPOCHS:-30}
DS_CONFIG=${DS_CONFIG:-ds_configs/zero2.json}
OUT=${OUT:-runs/mate-kd-mnli}
SAVE_STEPS=${SAVE_STEPS:-5000}
MASTER_PORT=${MASTER_PORT:-29512}

if [ ! -f "$MNLI_TRAIN" ]; then
  echo "error: MNLI training file not found: $MNLI_TRAIN (set MNLI_TRAIN)" >&2
  exit 2
fi

ARGS=(--method mate_kd --teacher "$TEACHER" --student "$STUDENT" --generator "$GENERATOR"
      --train_file "$MNLI_TRAIN" --eval_file "$MNLI_EVAL" --text_column "$TEXT_COLUMN"
      --text_pair_column "$PAIR_COLUMN" --label_column "$LABEL_COLUMN" --max_length 128
      --per_device_train_batch_size "$PER_DEVICE_BATCH" --gradient_accumulation_steps "$GRAD_ACCUM"
      --num_train_epochs "$EPOCHS" --learning_rate 2e-5 --warmup_steps 2138 --lr_scheduler_type linear
      --max_grad_norm 5 --generator_lr 5e-7 --generator_max_grad_norm 5 --mask_prob 0.3 --gumbel_tau 1.0
      --temperature 1.0 --generator_steps 10 --student_steps 100 --w_ce 0.3333333 --w_adv 0.3333333
      --w_kd 0.3333333 --eval_steps 500 --save_steps "$SAVE_STEPS" --deepspeed "$DS_CONFIG" --output_dir "$OUT")

if command -v nvidia-smi >/dev/null 2>&1; then
  exec deepspeed --num_gpus "$NUM_GPUS" --master_port "$MASTER_PORT" launch/train.py "${ARGS[@]}" "$@"
fi
exec python launch/train.py "${ARGS[@]}" "$@"
