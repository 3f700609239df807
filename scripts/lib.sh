# Shell functions shared by the demo scripts; sourced (". scripts/lib.sh") from the repository root, after `cd`.
# Sets PY (${PYTHON:-python}) and exports TOKENIZERS_PARALLELISM=false; train_stage reads $OUT and $PY.

PY=${PYTHON:-python}
export TOKENIZERS_PARALLELISM=false

# tsv_slices DATA WORK TRAIN_ROWS EVAL_FROM EVAL_ROWS: DATA's header + data rows 1..TRAIN_ROWS -> WORK/train.tsv,
# its header + data rows EVAL_FROM..EVAL_FROM+EVAL_ROWS-1 -> WORK/eval.tsv (rows counted after the header).
tsv_slices() {
  local data=$1 work=$2 train_rows=$3 eval_from=$4 eval_rows=$5
  mkdir -p "$work"
  { head -1 "$data"; sed -n "2,$(( train_rows + 1 ))p" "$data"; } > "$work/train.tsv"
  { head -1 "$data"; sed -n "$(( eval_from + 1 )),$(( eval_from + eval_rows ))p" "$data"; } > "$work/eval.tsv"
}

# train_stage NAME THREADS ARG...: $PY launch/train.py ARG... --output_dir $OUT/NAME, output in $OUT/NAME.log,
# with OMP_NUM_THREADS=THREADS (empty: as inherited); skipped when $OUT/NAME/final/config.json exists (delete it to
# redo). Prints the command and the stage's wall time (also written to $OUT/NAME.seconds, which the reports read); on
# failure the log's last 20 lines, and returns 1.
train_stage() {
  local name=$1 threads=$2; shift 2
  if [ -f "$OUT/$name/final/config.json" ]; then echo "== $name: done already ($OUT/$name/final)"; return; fi
  local omp=()
  [ -z "$threads" ] || omp=("OMP_NUM_THREADS=$threads")
  echo "== $name: ${omp[*]}${omp[*]:+ }$PY launch/train.py $* --output_dir $OUT/$name"
  local t0=$SECONDS
  # shellcheck disable=SC2086  # PY may hold options (PYTHON="python -X dev")
  env "${omp[@]}" $PY launch/train.py "$@" --output_dir "$OUT/$name" > "$OUT/$name.log" 2>&1 \
    || { echo "$name failed, see $OUT/$name.log" >&2; tail -20 "$OUT/$name.log" >&2; return 1; }
  echo $(( SECONDS - t0 )) > "$OUT/$name.seconds"
  echo "== $name: $(( SECONDS - t0 )) s"
}
