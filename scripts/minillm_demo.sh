#!/usr/bin/env bash
# Issue 6's real run (CPU-sized): MiniLLM vs SFT vs word-level KD on ANLI prompts, SmolLM2-135M-Instruct teacher.
#   1. ANLI R1+R2 dev+test -> instruction prompts (teacher's chat template) with label-word answers (scripts/anli_prompts.py); HELDOUT prompts
#      (seeded shuffle) are held out, the rest is the training pool.
#   2. student_init: SmolLM2 shrunk to LAYERS layers (teacher layers copied) + INIT_STEPS of --method sft on the
#      prompt/answer pairs (loss on the answer only, --target_column answer).
#   3. From student_init, STEPS steps each of --method minillm (pretraining batch from the Wikipedia sample),
#      --method kd (alpha 0.5, temperature 1, same prompt/answer data), --method sft (continued), --method seqkd
#      (teacher responses sampled once at temperature 1 for the STEPS x BS training prompts it trains on, cached: MiniLLM's
#      SeqKD baseline), seqkd_greedy (the same with greedy teacher responses: Kim & Rush's mode approximation,
#      kd_engine's default) and --method gkd (beta 0.5, lmbda 0.5), same lr.
#   4. benchmarks/minillm_compare.py: teacher, student_init and the six students on the held-out prompts
#      -> benchmarks/results/minillm_compare.{json,md}.
#
#   bash scripts/minillm_demo.sh            # 2-core CPU machine: student_init + 5 methods + comparison 22 min
#                                           # (student_init 2 min), seqkd_greedy added afterwards in 5.4 min
#
# Env: OUT (outputs/minillm_demo), TEACHER (offline:smollm2-135m), LAYERS (10), HELDOUT (64), INIT_STEPS (40),
#      STEPS (24), LR (3e-5, the compared methods), INIT_LR (2e-4), BS (8), PROMPT_LEN (128),
#      NEW_TOKENS (8: minillm rollouts and the eval samples), ROLLOUTS (8), PPO_EPOCHS (2),
#      PT (../shared/data/enwiki_2015_sample/wiki_00), PT_LINES (2000), PARALLEL (1: the methods side by side, 1 thread each),
#      EVAL_PROMPTS (32 of the held-out prompts are evaluated), FORMAT (chat | cue, see below).
# A stage whose OUT/<name>/final/config.json exists is skipped (delete it to redo).
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib.sh
OUT=${OUT:-outputs/minillm_demo}
TEACHER=${TEACHER:-offline:smollm2-135m}
LAYERS=${LAYERS:-10}
HELDOUT=${HELDOUT:-64}
INIT_STEPS=${INIT_STEPS:-40}
STEPS=${STEPS:-24}
LR=${LR:-3e-5}
INIT_LR=${INIT_LR:-2e-4}
BS=${BS:-8}
PROMPT_LEN=${PROMPT_LEN:-128}
NEW_TOKENS=${NEW_TOKENS:-8}
ROLLOUTS=${ROLLOUTS:-8}
PPO_EPOCHS=${PPO_EPOCHS:-2}
PT=${PT:-../shared/data/enwiki_2015_sample/wiki_00}
PARALLEL=${PARALLEL:-1}
EVAL_PROMPTS=${EVAL_PROMPTS:-32}
ANLI=${ANLI:-../shared/data/anli}
for f in "$ANLI"/R1/dev.jsonl "$ANLI"/R1/test.jsonl "$ANLI"/R2/dev.jsonl "$ANLI"/R2/test.jsonl "$PT"; do
  [ -f "$f" ] || { echo "missing $f (see ../shared/data/README.md)" >&2; exit 2; }
done
mkdir -p "$OUT/data"
# FORMAT=chat (default): the prompt is the user turn of the teacher's chat template (SmolLM2-135M-Instruct answers
# label words only there); FORMAT=cue: plain text ending with "\nAnswer:"
FORMAT=${FORMAT:-chat}
case "$FORMAT" in
  chat) FORMAT_ARGS=(--chat_template "$TEACHER" --answer_cue '\nAnswer with one word.') ;;
  cue) FORMAT_ARGS=(--answer_cue '\nAnswer:') ;;
  *) echo "FORMAT must be chat or cue" >&2; exit 2 ;;
esac
D=$OUT/data
$PY scripts/anli_prompts.py "$ANLI"/R1/dev.jsonl "$ANLI"/R1/test.jsonl "$ANLI"/R2/dev.jsonl "$ANLI"/R2/test.jsonl \
  --out "$D/anli_r12_all.jsonl" "${FORMAT_ARGS[@]}"
$PY - "$D" "$HELDOUT" <<'EOF'
import json, random, sys
d, n = sys.argv[1], int(sys.argv[2])
rows = open(f"{d}/anli_r12_all.jsonl", encoding="utf-8").read().splitlines()
random.Random(0).shuffle(rows)
open(f"{d}/heldout.jsonl", "w", encoding="utf-8").write("\n".join(rows[:n]) + "\n")
open(f"{d}/train.jsonl", "w", encoding="utf-8").write("\n".join(rows[n:]) + "\n")
print(f"{len(rows) - n} training prompts, {n} held-out prompts")
EOF

# pretraining corpus for minillm's pt term: paragraphs of the Wikipedia sample (its files have no extension and
# WikiExtractor <doc> tags, so the first PT_LINES text paragraphs of $PT go to a .txt file)
PT_LINES=${PT_LINES:-2000}
awk -v n="$PT_LINES" '!/^<\/?doc/ && NF { print; if (++k >= n) exit }' "$PT" > "$D/pt.txt"

COMMON=(--train_file "$D/train.jsonl" --text_column text --target_column answer --max_length "$PROMPT_LEN"
        --per_device_train_batch_size "$BS" --logging_steps 5 --report_to none --disable_tqdm true
        --overwrite_output_dir true --lr_scheduler_type constant)

train() {  # name, threads, then method arguments
  local name=$1 threads=$2; shift 2
  train_stage "$name" "$threads" "$@" "${COMMON[@]}"
}

# 2. student_init: 10 of the teacher's 30 layers, then a brief sft on the prompt/answer pairs
train student_init 2 --method sft --teacher "$TEACHER" --student.layers "$LAYERS" --max_steps "$INIT_STEPS" \
  --warmup_steps $(( INIT_STEPS / 10 )) --learning_rate "$INIT_LR"
S=$OUT/student_init/final

# 3. the six methods from student_init, same steps and lr; meanwhile (PARALLEL=1) the teacher and student_init
#    rows of the comparison are computed
RES=${RES:-benchmarks/results/minillm_compare}
compare() {  # OUT_PREFIX THREADS NAME=PATH ... ; rows already in OUT_PREFIX.json / cmp_*.json (same settings) are kept
  local out=$1 threads=$2; shift 2
  local from=(); for f in "$OUT"/cmp_*.json; do [ -f "$f" ] && from+=(--reuse_from "$f"); done
  OMP_NUM_THREADS=$threads $PY benchmarks/minillm_compare.py --teacher "$TEACHER" --prompts "$D/heldout.jsonl" \
    --max_prompts "$EVAL_PROMPTS" --max_prompt_length "$PROMPT_LEN" --max_new_tokens "$NEW_TOKENS" \
    --answer_max_tokens 6 --samples 1 --batch_size 8 --reuse "${from[@]}" --out "$out" "${@/#/--model=}"
}
RUNS=(
  "minillm --method minillm --teacher $TEACHER --student $S --max_steps $STEPS --learning_rate $LR
   --max_prompt_length $PROMPT_LEN --max_new_tokens $NEW_TOKENS --num_rollouts $ROLLOUTS --ppo_epochs $PPO_EPOCHS
   --teacher_mixed_alpha 0.2 --pt_file $D/pt.txt --pt_max_length $PROMPT_LEN --kd_ratio 0.5"
  "kd --method kd --teacher $TEACHER --student $S --max_steps $STEPS --learning_rate $LR --alpha 0.5 --temperature 1"
  "sft --method sft --student $S --max_steps $STEPS --learning_rate $LR"
  "seqkd --method seqkd --teacher $TEACHER --student $S --max_steps $STEPS --learning_rate $LR
   --max_prompt_length $PROMPT_LEN --max_new_tokens $NEW_TOKENS --seqkd_do_sample true --seqkd_batch_size $BS
   --max_train_samples $(( STEPS * BS ))"
  "seqkd_greedy --method seqkd --teacher $TEACHER --student $S --max_steps $STEPS --learning_rate $LR
   --max_prompt_length $PROMPT_LEN --max_new_tokens $NEW_TOKENS --seqkd_batch_size $BS
   --max_train_samples $(( STEPS * BS ))"
  "gkd --method gkd --teacher $TEACHER --student $S --max_steps $STEPS --learning_rate $LR
   --max_prompt_length $PROMPT_LEN --max_new_tokens $NEW_TOKENS --beta 0.5 --lmbda 0.5"
)
t0=$SECONDS
if [ "$PARALLEL" = 1 ]; then
  pids=()
  for r in "${RUNS[@]}"; do
    # shellcheck disable=SC2086
    set -- $r; name=$1; shift
    # each student is evaluated as soon as it is trained (its row goes to $OUT/cmp_<name>.json)
    { train "$name" 1 "$@" && while [ ! -f "$OUT/cmp_init.json" ]; do sleep 10; done \
        && compare "$OUT/cmp_$name" 1 "$name=$OUT/$name/final" > "$OUT/cmp_$name.log" 2>&1; } & pids+=($!)
  done
  compare "$OUT/cmp_init" 1 student_init="$S" > "$OUT/cmp_init.log" 2>&1 & pids+=($!)
  for p in "${pids[@]}"; do wait "$p"; done
else
  for r in "${RUNS[@]}"; do
    # shellcheck disable=SC2086
    set -- $r; name=$1; shift
    train "$name" 2 "$@"
  done
fi

# 4. held-out comparison: teacher, student_init and the six students
echo "== compare -> $RES.{json,md}"
compare "$RES" 2 student_init="$S" minillm="$OUT/minillm/final" kd="$OUT/kd/final" sft="$OUT/sft/final" \
  seqkd="$OUT/seqkd/final" seqkd_greedy="$OUT/seqkd_greedy/final" gkd="$OUT/gkd/final" \
  > "$OUT/compare.log" 2>&1 || { echo "compare failed, see $OUT/compare.log" >&2; tail -20 "$OUT/compare.log" >&2; exit 1; }
echo "== stages 3-4: $(( SECONDS - t0 )) s"
cat "$RES.md"
