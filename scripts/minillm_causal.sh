#!/usr/bin/env bash
# MiniLLM for causal LMs with the reference GPT-2 settings (microsoft/LMOps minillm scripts):
# lr 5e-6, ppo_epochs 4, alpha 0.2, gamma 0.95, PPO clip 0.2, reward scaling 0.5, reward clip 100, length norm,
# single-step term on, pretraining batch with kd_ratio 0.5, prompts <= 256 tokens, <= 256 new tokens, AdamW.
#   TEACHER=path STUDENT=path TRAIN=prompts.jsonl PT=corpus.txt bash scripts/minillm_causal.sh [more options]
# Defaults: SmolLM2-135M (offline) teacher, a 10-layer student built from it (sft it first: --method sft),
# ANLI R1+R2 dev prompts (scripts/anli_prompts.py, ending with "\nAnswer:"), Wikipedia sample as the pretraining corpus.
set -euo pipefail
cd "$(dirname "$0")/.."
TEACHER=${TEACHER:-offline:smollm2-135m}
DS_CONFIG=${DS_CONFIG:-ds_configs/zero1.json}
OUT=${OUT:-outputs/minillm_causal}
if [ -z "${TRAIN:-}" ]; then
  mkdir -p outputs/data
  python scripts/anli_prompts.py ../shared/data/anli/R1/dev.jsonl ../shared/data/anli/R2/dev.jsonl \
    --out outputs/data/anli_r12_dev.jsonl --answer_cue '\nAnswer:'
  TRAIN=outputs/data/anli_r12_dev.jsonl
fi
PT=${PT:-../shared/data/wikitext-2-raw/wiki.valid.raw}  # one text per line (.txt/.raw/.jsonl/.csv)
STUDENT_ARGS=(--student.layers 10)
[ -n "${STUDENT:-}" ] && STUDENT_ARGS=(--student "$STUDENT")
ARGS=(--method minillm --teacher "$TEACHER" "${STUDENT_ARGS[@]}" --deepspeed "$DS_CONFIG" --output_dir "$OUT"
      --train_file "$TRAIN" --text_column text --target_column answer --pt_file "$PT"
      --learning_rate 5e-6 --per_device_train_batch_size 16 --lr_scheduler_type constant --warmup_steps 100
      --ppo_epochs 4 --num_rollouts 256 --teacher_mixed_alpha 0.2 --gamma 0.95 --cliprange 0.2
      --reward_scaling 0.5 --cliprange_reward 100 --length_norm true --single_step_reg true --kd_ratio 0.5
      --max_prompt_length 256 --max_new_tokens 256)
if command -v nvidia-smi >/dev/null 2>&1; then
  NGPUS=${NGPUS:-$(nvidia-smi -L | wc -l)}
  exec deepspeed --num_gpus "$NGPUS" launch/train.py "${ARGS[@]}" "$@"
fi
exec python launch/train.py "${ARGS[@]}" "$@"
