#!/usr/bin/env bash
# The main job on its embedded default: set up, fetch the demo corpus, distil SmolLM2-135M into a 10-layer student.
# Extra arguments override the config, e.g.  bash scripts/demo.sh --max_steps 20 --overwrite_output_dir
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
read -r TRAIN EVAL < <(python -m kd_engine.demo_data | paste -sd' ')
exec python launch/train.py --config scripts/configs/demo_kd_smollm2.yaml --train_file "$TRAIN" --eval_file "$EVAL" "$@"
