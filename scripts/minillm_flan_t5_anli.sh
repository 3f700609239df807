#!/usr/bin/env bash
# MiniLLM on Flan-T5 + ANLI with the seed's setting (Fabio-Klinge/MiniLLM_Seq2Seq train_large_large.sh):
# lr 7e-5, batch 12 x grad_acc 6, ZeRO-2, fp32, 100 steps, ppo_epochs 2, 32 rollouts, alpha 0.2, reward
# scaling 0.5, reward clip 100, length norm, kd_ratio 0.5, prompts <= 180 tokens, <= 180 new tokens, no single-step
# term (the seed ran without --single-step-reg; pass --single_step_reg true for the paper's estimator).
#   TEACHER=google/flan-t5-xl STUDENT=google/flan-t5-small bash scripts/minillm_flan_t5_anli.sh [--pt_file F ...]
# Prompts: ANLI R1+R2 dev converted by scripts/anli_prompts.py (answers = label words; ANLI_REASON=1 adds reasons).
# With --pt_file the pretraining term is T5 span corruption (15% noise, mean span 3; the Flan-T5 tokenizer has the
# 100 <extra_id_*> sentinels), mixed with forward KD by kd_ratio; --pt_objective prefix_lm for the prefix-LM variant.
set -euo pipefail
cd "$(dirname "$0")/.."
TEACHER=${TEACHER:-google/flan-t5-xl}
STUDENT=${STUDENT:-google/flan-t5-small}
DS_CONFIG=${DS_CONFIG:-ds_configs/zero2.json}
OUT=${OUT:-outputs/minillm_flan_t5_anli}
DATA=${DATA:-../shared/data/anli}
mkdir -p outputs/data
REASON=${ANLI_REASON:+--with_reason}
python scripts/anli_prompts.py "$DATA/R1/dev.jsonl" "$DATA/R2/dev.jsonl" --out outputs/data/anli_r12_dev.jsonl $REASON
python scripts/anli_prompts.py "$DATA/R1/test.jsonl" "$DATA/R2/test.jsonl" --out outputs/data/anli_r12_test.jsonl $REASON
ARGS=(--method minillm --teacher "$TEACHER" --student "$STUDENT" --deepspeed "$DS_CONFIG" --output_dir "$OUT"
      --train_file outputs/data/anli_r12_dev.jsonl --eval_file outputs/data/anli_r12_test.jsonl
      --text_column text --target_column answer --max_eval_samples 200
      --learning_rate 7e-5 --per_device_train_batch_size 12 --gradient_accumulation_steps 6 --max_steps 100
      --lr_scheduler_type constant --ppo_epochs 2 --num_rollouts 32 --teacher_mixed_alpha 0.2 --reward_scaling 0.5
      --cliprange_reward 100 --length_norm true --kd_ratio 0.5 --single_step_reg false
      --max_prompt_length 180 --max_new_tokens 180 --teacher_dtype fp32)
if command -v nvidia-smi >/dev/null 2>&1; then
  NGPUS=${NGPUS:-$(nvidia-smi -L | wc -l)}
  exec deepspeed --num_gpus "$NGPUS" launch/train.py "${ARGS[@]}" "$@"
fi
exec python launch/train.py "${ARGS[@]}" "$@"
