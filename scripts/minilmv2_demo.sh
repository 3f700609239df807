#!/usr/bin/env bash
# MiniLMv2 end to end on this project's CPU machine (issue 3): distil all-MiniLM-L6-v2 (6L x 384) into a
# 3L x 384 student on the Wikipedia sample (relation loss only; student initialised from teacher layers, and at
# random), then fine-tune on SST-2 with --method sft and the same steps / lr for the teacher, both distilled
# students, and the same 3L x 384 student without distillation (teacher layers copied; random init); prints the
# relation-loss trajectories and the held-out accuracy of each.
#
#   bash scripts/minilmv2_demo.sh                     # measured 41 min on the 2-core CPU machine, nothing else running
#   DISTIL_STEPS=20 RAND_STEPS=20 SFT_STEPS=20 bash scripts/minilmv2_demo.sh      # smoke run
#
# Env: OUT (outputs; run folders are OUT/minilmv2_*), WORK (tmp dir for the SST-2 slices),
#      WIKI (glob of the corpus files), DISTIL_STEPS (200; teacher-layer init), RAND_STEPS (600; random init),
#      DISTIL_BATCH (8), SFT_STEPS (200), SFT_BATCH (32), SFT_LR (2e-4),
#      SST2 (../shared/data/sst2/train.tsv), TRAIN_ROWS (4000), EVAL_FROM (60001), EVAL_ROWS (1000),
#      THREADS (OMP threads per run, 2).
# Data rows are counted after the header: train = rows 1..TRAIN_ROWS, held-out = rows EVAL_FROM.. (+EVAL_ROWS).
# A stage whose folder already has final/config.json (config.json for the shrunk students) is skipped.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib.sh
OUT=${OUT:-outputs}
WORK=${WORK:-${TMPDIR:-/tmp}/minilmv2_demo}
WIKI=${WIKI:-../shared/data/enwiki_2015_sample/wiki_0[0-2]}
SST2=${SST2:-../shared/data/sst2/train.tsv}
DISTIL_STEPS=${DISTIL_STEPS:-200}
RAND_STEPS=${RAND_STEPS:-600}
SFT_STEPS=${SFT_STEPS:-200}
TRAIN_ROWS=${TRAIN_ROWS:-4000}
EVAL_FROM=${EVAL_FROM:-60001}
EVAL_ROWS=${EVAL_ROWS:-1000}
TEACHER=offline:all-minilm-l6-v2
export OMP_NUM_THREADS=${THREADS:-2}
[ -f "$SST2" ] || { echo "missing $SST2 (GLUE SST-2 train.tsv: sentence<TAB>label with a header)" >&2; exit 2; }
mkdir -p "$OUT"
tsv_slices "$SST2" "$WORK" "$TRAIN_ROWS" "$EVAL_FROM" "$EVAL_ROWS"

run() {  # name, then launch/train.py arguments
  local name=$1; shift
  train_stage "$name" "" "$@" --report_to none --disable_tqdm true --overwrite_output_dir true
}

# 1. MiniLMv2: relation distillation of the teacher's last layer into the student's last layer (48 relation heads).
#    Both inits are run: teacher layers [0, 2, 5] (--student.init teacher_layers, possible at the teacher's width)
#    and random init (minilmv2's default: the paper's recipe).
DISTIL=(--method minilmv2 --teacher "$TEACHER" --student.layers 3 --student.hidden 384 --student.heads 12
        --train_file "$WIKI" --max_length 128 --per_device_train_batch_size "${DISTIL_BATCH:-8}" --learning_rate 6e-4
        --weight_decay 0.01 --adam_epsilon 1e-6 --logging_steps 5)
run minilmv2_distil "${DISTIL[@]}" --student.init teacher_layers --max_steps "$DISTIL_STEPS" \
  --warmup_steps $(( DISTIL_STEPS / 10 ))
run minilmv2_distil_randinit "${DISTIL[@]}" --student.init random --max_steps "$RAND_STEPS" \
  --warmup_steps $(( RAND_STEPS / 10 ))

# 2. the same architecture without distillation: teacher layers [0, 2, 5] copied, and random init
[ -f "$OUT/minilmv2_copy3x384/config.json" ] || $PY -m kd_engine.shrink --teacher "$TEACHER" --layers 3 \
  --output_dir "$OUT/minilmv2_copy3x384" --overwrite
[ -f "$OUT/minilmv2_random3x384/config.json" ] || $PY -m kd_engine.shrink --teacher "$TEACHER" --layers 3 --hidden 384 \
  --heads 12 --init random --output_dir "$OUT/minilmv2_random3x384" --overwrite

# 3. SST-2 fine-tuning with a fresh 2-way head, identical settings for every encoder
SFT=(--method sft --num_labels 2 --train_file "$WORK/train.tsv" --eval_file "$WORK/eval.tsv" --text_column sentence
     --label_column label --max_length 64 --per_device_train_batch_size "${SFT_BATCH:-32}" --max_steps "$SFT_STEPS"
     --learning_rate "${SFT_LR:-2e-4}" --warmup_steps $(( SFT_STEPS / 10 )) --weight_decay 0.01 --logging_steps 10)
run minilmv2_sft_teacher "${SFT[@]}" --student "$TEACHER"
run minilmv2_sft_distilled "${SFT[@]}" --student "$OUT/minilmv2_distil/final"
run minilmv2_sft_distilled_randinit "${SFT[@]}" --student "$OUT/minilmv2_distil_randinit/final"
run minilmv2_sft_copy "${SFT[@]}" --student "$OUT/minilmv2_copy3x384"
run minilmv2_sft_random "${SFT[@]}" --student "$OUT/minilmv2_random3x384"

$PY - "$OUT" <<'EOF'
import json, os, sys
out = sys.argv[1]
def records(name):
    if not os.path.exists(f"{out}/{name}/train_log.jsonl"):
        return []
    with open(f"{out}/{name}/train_log.jsonl") as f:
        return [json.loads(line) for line in f if line.strip()]
for run in ("minilmv2_distil", "minilmv2_distil_randinit"):
    loss = [(r["step"], r["loss"]) for r in records(run) if r.get("split") == "train"]
    print(f"{run} relation loss (step: value):", ", ".join(f"{s}: {v:.3f}" for s, v in loss))
print("| encoder | layers x hidden | SST-2 held-out accuracy |\n|---|---|---|")
for name, what, arch in (("minilmv2_sft_teacher", "teacher all-MiniLM-L6-v2", "6 x 384"),
                         ("minilmv2_sft_distilled", "MiniLMv2-distilled, init teacher layers [0,2,5]", "3 x 384"),
                         ("minilmv2_sft_distilled_randinit", "MiniLMv2-distilled, random init", "3 x 384"),
                         ("minilmv2_sft_copy", "teacher layers [0,2,5], no distillation", "3 x 384"),
                         ("minilmv2_sft_random", "random init, no distillation", "3 x 384")):
    ev = [r for r in records(name) if r.get("split") == "eval"]
    print(f"| {what} | {arch} | {ev[-1]['accuracy']:.4f} |" if ev else f"| {what} | {arch} | (no eval) |")
EOF
