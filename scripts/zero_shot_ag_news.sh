#!/usr/bin/env bash
# The best zero-shot AG News recipe measured by benchmarks/zero_shot_quality.py (README "Zero-shot AG News", row
# "prompts": 84.8 % dev accuracy, 3 seeds): embedding teacher all-MiniLM-L6-v2 with 4 templates x class descriptions
# (scripts/configs/zero_shot_ag_news/), label prior calibrated to uniform on the unlabeled text, the 8,000 unlabeled
# AG News texts, a 2-layer student, 1 epoch. Dev accuracy (2,001 rows held out from train_subset10k.tsv,
# --split_seed 0) is on the last line of the output and in OUT/round1/train_log.jsonl.
# ROUNDS=2 adds the self-training round (the student relabels, a fresh 2-layer student learns): measured equal
# (84.8 %), not better. EXTRA=file adds unlabeled text (the 2017 news leads measured 1.4 points worse).
#
#   bash scripts/zero_shot_ag_news.sh                  # ~3 min on 2 quiet CPU cores, + ~2 min labeling the first time
#   (measured: seed 0 gives 0.8481 dev accuracy, the benchmark's prompts-seed0 cell exactly: same distill loss)
#   ROUNDS=2 SEED=1 OUT=runs/zs1 bash scripts/zero_shot_ag_news.sh
#
# Env: OUT (runs/zero_shot_ag_news), ROUNDS (1), SEED (0), EXTRA (none), DATA
#      (../shared/data/ag_news/train_subset10k.tsv), LAUNCHER (python | torchrun | deepspeed), NUM_GPUS (1).
#      Extra arguments go to every launch/train.py call.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-runs/zero_shot_ag_news}
ROUNDS=${ROUNDS:-1}
EXTRA=${EXTRA:-}
SEED=${SEED:-0}
DATA=${DATA:-../shared/data/ag_news/train_subset10k.tsv}
LAUNCHER=${LAUNCHER:-python}
NUM_GPUS=${NUM_GPUS:-1}
CONF=scripts/configs/zero_shot_ag_news
case "$ROUNDS" in 1|2) ;; *) echo "error: ROUNDS must be 1 or 2 (got $ROUNDS)" >&2; exit 2 ;; esac
[ -f "$DATA" ] || { echo "error: AG News data not found: $DATA (set DATA)" >&2; exit 2; }
DS_ACCELERATOR=${DS_ACCELERATOR:-$(python -c 'import torch; print("cuda" if torch.cuda.is_available() else "cpu")')}
export DS_ACCELERATOR
export TOKENIZERS_PARALLELISM=false GLOO_SOCKET_IFNAME=${GLOO_SOCKET_IFNAME:-lo}
[ -z "$EXTRA" ] || [ -f "$EXTRA" ] || { echo "error: EXTRA file not found: $EXTRA" >&2; exit 2; }

launch() {
  case "$LAUNCHER" in
    python) RANK=0 WORLD_SIZE=1 LOCAL_RANK=0 MASTER_ADDR=127.0.0.1 MASTER_PORT=${MASTER_PORT:-29531} \
              python launch/train.py "$@" ;;
    torchrun) torchrun --nproc_per_node "$NUM_GPUS" --master_addr 127.0.0.1 --master_port "${MASTER_PORT:-29531}" \
              launch/train.py "$@" ;;
    deepspeed) deepspeed --num_gpus "$NUM_GPUS" --master_port "${MASTER_PORT:-29531}" launch/train.py "$@" ;;
    *) echo "error: LAUNCHER must be python, torchrun or deepspeed (got $LAUNCHER)" >&2; exit 2 ;;
  esac
}
common=(--method zero_shot --data_file "$DATA" --data_columns text,label --label_column label
        --eval_label_names_file "$(dirname "$DATA")/classes.txt" --eval_split 0.2 --split_seed 0
        --class_names_file "$CONF/classes.txt" ${EXTRA:+--extra_text_files "$EXTRA"} --student.layers 2
        --per_device_train_batch_size 32 --learning_rate 5e-5 --num_train_epochs 1 --seed "$SEED"
        --resume auto --label_cache_dir "$OUT/labels")
launch "${common[@]}" --teacher offline:all-minilm-l6-v2 --hypothesis_templates_file "$CONF/templates.txt" \
  --class_descriptions_file "$CONF/descriptions.tsv" --prior_calibration uniform --output_dir "$OUT/round1" "$@"
if [ "$ROUNDS" = 2 ]; then
  launch "${common[@]}" --teacher "$OUT/round1/final" --temperature 1.0 --student_base offline:all-minilm-l6-v2 \
    --output_dir "$OUT/round2" "$@"
fi
