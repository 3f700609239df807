#!/usr/bin/env bash
# Issue 15's evidence (CPU): the sequence-level KD family on a T5 teacher trained from scratch on a synthetic
# task with many correct outputs per input (benchmarks/onpolicy_t5.py has the task and the metrics).
#   1. task files (train: 3160 category triples x 4 drawn outputs; HELDOUT triples never seen in training),
#      SentencePiece tokenizer trained on them, random T5 teacher (d_model 128, 3+3 layers, ~1.0M params)
#   2. teacher: --method sft for TEACHER_STEPS; its held-out precision must reach MIN_TEACHER_PRECISION
#   3. per seed in SEEDS: random small T5 student (d_model STUDENT_DMODEL, 1+1 layers) -> student_init: --method sft
#      for INIT_STEPS; then from student_init, STEPS steps of batch BS each of sft, kd (word-level, alpha 0.5,
#      T 1), seqkd (teacher samples, temperature 1, cached), gkd (beta 0.5, lmbda 0.5, dataset targets) and minillm
#      (teacher_mixed_alpha 0.2, ROLLOUTS rollouts per round, PPO_EPOCHS, no pretraining term), same LR
#   4. held-out metrics per seed (EVAL_INPUTS held-out inputs x SAMPLES samples) -> report over seeds:
#      benchmarks/results/onpolicy_t5.{md,json}
#
#   bash scripts/onpolicy_t5_demo.sh                 # full size: measured 15 min on the 2-core CPU machine
#                                                    # (teacher 4.5 min; per seed ~3.5 min of training + eval)
#   SIZE=tiny bash scripts/onpolicy_t5_demo.sh       # smoke run of every stage (minutes; numbers meaningless)
#
# Env: OUT (outputs/onpolicy_t5), SIZE (full|tiny), TEACHER_STEPS (2500), TEACHER_LR (2e-3), INIT_STEPS (1500),
#      STEPS (1000), BS (32), LR (1e-3), INIT_LR (3e-3), SEEDS ("1 2 3"), STUDENT_DMODEL (64), ROLLOUTS (32),
#      PPO_EPOCHS (4), EVAL_INPUTS (60), SAMPLES (32), MIN_TEACHER_PRECISION (0.9), THREADS (2), RESULTS
#      (benchmarks/results/onpolicy_t5). A stage whose OUT/<name>/final/config.json exists is skipped.
set -euo pipefail
cd "$(dirname "$0")/.."
SIZE=${SIZE:-full}
if [ "$SIZE" = tiny ]; then
  D_TEACHER_STEPS=30; D_INIT_STEPS=5; D_STEPS=4; D_SEEDS="1 2"; D_EVAL_INPUTS=4; D_SAMPLES=4; D_MIN=0
  D_OUT=outputs/onpolicy_t5_tiny; D_RESULTS=outputs/onpolicy_t5_tiny/report
else
  D_TEACHER_STEPS=2500; D_INIT_STEPS=1500; D_STEPS=1000; D_SEEDS="1 2 3"; D_EVAL_INPUTS=60; D_SAMPLES=32; D_MIN=0.9
  D_OUT=outputs/onpolicy_t5; D_RESULTS=benchmarks/results/onpolicy_t5
fi
OUT=${OUT:-$D_OUT}
TEACHER_STEPS=${TEACHER_STEPS:-$D_TEACHER_STEPS}
TEACHER_LR=${TEACHER_LR:-2e-3}
INIT_STEPS=${INIT_STEPS:-$D_INIT_STEPS}
STEPS=${STEPS:-$D_STEPS}
BS=${BS:-32}
LR=${LR:-1e-3}
INIT_LR=${INIT_LR:-3e-3}
SEEDS=${SEEDS:-$D_SEEDS}
STUDENT_DMODEL=${STUDENT_DMODEL:-64}
ROLLOUTS=${ROLLOUTS:-32}
PPO_EPOCHS=${PPO_EPOCHS:-4}
EVAL_INPUTS=${EVAL_INPUTS:-$D_EVAL_INPUTS}
SAMPLES=${SAMPLES:-$D_SAMPLES}
MIN_TEACHER_PRECISION=${MIN_TEACHER_PRECISION:-$D_MIN}
RESULTS=${RESULTS:-$D_RESULTS}
export OMP_NUM_THREADS=${THREADS:-2} TOKENIZERS_PARALLELISM=false DS_ACCELERATOR=cpu GLOO_SOCKET_IFNAME=lo \
  HF_HUB_OFFLINE=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} KD_ENGINE_CACHE=${KD_ENGINE_CACHE:-$OUT/cache}
PY=${PYTHON:-python}
H="$PY benchmarks/onpolicy_t5.py"
T0=$(date +%s)
log() { echo "[$(( $(date +%s) - T0 ))s] $*" >&2; }

done_() { [ -f "$1/final/config.json" ]; }
train() {  # name method extra...
  local name=$1; shift
  if done_ "$OUT/$name"; then log "skip $name (done)"; return; fi
  log "train $name"
  local t0=$SECONDS
  $PY launch/train.py "$@" --train_file "$OUT/data/train.jsonl" --target_column answer \
    --output_dir "$OUT/$name" --overwrite_output_dir true --logging_steps 25 --disable_tqdm true \
    > "$OUT/$name.log" 2>&1 || { tail -20 "$OUT/$name.log" >&2; exit 1; }
  echo $(( SECONDS - t0 )) > "$OUT/$name.seconds"  # wall time of the whole run (start-up, generation included)
}

mkdir -p "$OUT"
[ -f "$OUT/data/test.jsonl" ] || { log "data"; $H data "$OUT/data" > "$OUT/data.log" 2>&1; }
train teacher --method sft --student.name_or_path "$OUT/data/teacher_init" --max_steps "$TEACHER_STEPS" \
  --per_device_train_batch_size 64 --learning_rate "$TEACHER_LR" --warmup_steps 50 --seed 0
TEACHER=$OUT/teacher/final
EVAL="--teacher $TEACHER --test $OUT/data/test.jsonl --members $OUT/data/members.json --inputs $EVAL_INPUTS \
  --samples $SAMPLES"
[ -f "$OUT/teacher_check.json" ] || $H eval $EVAL --model teacher=teacher --out "$OUT/teacher_check.json" >&2
$PY - "$OUT/teacher_check.json" "$MIN_TEACHER_PRECISION" <<'EOF'
import json, sys
p = json.load(open(sys.argv[1]))["metrics"]["teacher"]["precision"]
if p < float(sys.argv[2]):
    sys.exit(f"error: the teacher's held-out precision is {p:.3f} < {sys.argv[2]}: train it longer (TEACHER_STEPS)")
print(f"teacher held-out precision {p:.3f}", file=sys.stderr)
EOF

COMMON="--teacher $TEACHER --per_device_train_batch_size $BS --max_steps $STEPS --learning_rate $LR"
RUNS=()
for SEED in $SEEDS; do
  S=seed$SEED
  [ -f "$OUT/$S/student_random/config.json" ] || $H student "$OUT/$S/student_random" --tokenizer "$OUT/data/tok" \
    --seed "$SEED" --d_model "$STUDENT_DMODEL" > /dev/null 2>&1
  train $S/student_init --method sft --student.name_or_path "$OUT/$S/student_random" --max_steps "$INIT_STEPS" \
    --per_device_train_batch_size "$BS" --learning_rate "$INIT_LR" --seed "$SEED"
  INIT=$OUT/$S/student_init/final
  train $S/sft --method sft --student.name_or_path "$INIT" --max_steps "$STEPS" --per_device_train_batch_size "$BS" \
    --learning_rate "$LR" --seed "$SEED"
  train $S/kd --method kd --student.name_or_path "$INIT" $COMMON --alpha 0.5 --temperature 1 --seed "$SEED"
  train $S/seqkd --method seqkd --student.name_or_path "$INIT" $COMMON --seqkd_do_sample true \
    --seqkd_batch_size 256 --max_new_tokens 16 --seed "$SEED"
  train $S/gkd --method gkd --student.name_or_path "$INIT" $COMMON --beta 0.5 --lmbda 0.5 --max_new_tokens 16 \
    --seed "$SEED"
  train $S/minillm --method minillm --student.name_or_path "$INIT" $COMMON --num_rollouts "$ROLLOUTS" \
    --ppo_epochs "$PPO_EPOCHS" --max_new_tokens 16 --seed "$SEED"
  if [ ! -f "$OUT/$S/eval.json" ]; then
    log "eval $S"
    MODELS=(--model teacher=teacher --model student_init="$INIT")
    for M in sft kd seqkd gkd minillm; do MODELS+=(--model "$M=$OUT/$S/$M/final"); done
    $H eval $EVAL "${MODELS[@]}" --seed "$SEED" --out "$OUT/$S/eval.json" >&2
  fi
  RUNS+=("$OUT/$S/eval.json")
done

$PY - "$OUT/setup.json" <<EOF
import json, sys
json.dump({"task": "3 slot-numbered category names (1:fruit 2:tool 3:river) -> one member of each, in order "
                   "(16 categories x 8 two-syllable pseudo-word members; 512 correct outputs per input); "
                   "3160 training inputs x 4 drawn outputs, 200 held-out inputs",
           "teacher": "T5 d_model 128, 3+3 layers, ~1.0M params, sft $TEACHER_STEPS steps x 64 from random init",
           "students": "T5 d_model $STUDENT_DMODEL, 1+1 layers, random init + sft $INIT_STEPS steps x $BS "
                       "(student_init), then $STEPS steps x $BS per method (lr $LR): sft; kd alpha 0.5 T 1; "
                       "seqkd sampled teacher responses (T 1); gkd beta 0.5 lmbda 0.5; minillm teacher_mixed_alpha "
                       "0.2, $ROLLOUTS rollouts per round, $PPO_EPOCHS PPO epochs, no pt term",
           "compute budget": "every method $STEPS optimizer steps x $BS sequences (prompt 4 tokens, response <= 16 "
                              "tokens, 7 for a correct one); generation on top: gkd samples 16 of the 32 responses "
                              "of a step on average (lmbda 0.5), minillm samples $ROLLOUTS rollouts per "
                              "$PPO_EPOCHS x $ROLLOUTS / $BS steps (+ one pure-student batch per round for its log), "
                              "seqkd's teacher answers the 12640 training prompts once; wall time per run below",
           "evaluation": "$EVAL_INPUTS of the 200 held-out inputs x $SAMPLES samples (temperature 1) per model and "
                         "seed",
           "seeds": "$SEEDS", "command": "SIZE=$SIZE bash scripts/onpolicy_t5_demo.sh"}, open(sys.argv[1], "w"))
EOF
$H report "${RUNS[@]}" --setup "$OUT/setup.json" --out "$RESULTS" | tail -1 > "$OUT/report_line.json"
log "results in $RESULTS.md and $RESULTS.json"
