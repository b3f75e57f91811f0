#!/usr/bin/env bash
# Issue 18's benchmark 1 with its curve: gist vs pos_control vs neg_control on the generated tasks
# (seen and unseen families), same recipe and budget, and the share of the neg -> pos exact-match gap
# (paired bootstrap 95% interval) after each budget in STEPS. The lr is constant after warm-up
# (train.min_lr_ratio=1), so continuing a run from its last checkpoint to the next budget is the
# same run as one trained to that budget from the start; each budget's eval is kept under
# OUT/at-STEP/MODE (eval.json + eval_outputs.jsonl, what `eval --compare` reads).
#   OUT=runs/bench-curve STEPS="35 70 105" benchmarks/gap_curve.sh [OVERRIDES...]
# Defaults: configs/smollm2.yaml (SmolLM2-135M-Instruct, k=1, packed rows, 2 ranks ZeRO-3),
# mask_prefix=visible, lr 2e-4, 4,000 train records, NUM_EVAL=200 held-out tasks per split.
# Finished budgets are skipped, so it can be resumed. GIST_VARIANTS="NAME:OVERRIDE[,OVERRIDE] ..." then
# trains each named gist variant to the last budget and compares it with that budget's controls
# (OUT/compare-NAME.md): the controls are trained once and reused while the gist recipe is varied.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-runs/bench-curve}
STEPS=${STEPS:-35 70 105}
NUM_EVAL=${NUM_EVAL:-200}
BIN=.venv/bin
export GIST_DIST_CACHE=${GIST_DIST_CACHE:-$PWD/.cache} HF_HOME=${HF_HOME:-$PWD/.cache/hf}
export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-$PWD/.cache/torch_extensions} HF_HUB_OFFLINE=1 OMP_NUM_THREADS=1
COMMON=(configs/smollm2.yaml data.num_train=4000 data.num_eval=$NUM_EVAL train.lr=2e-4 train.warmup_steps=5
        train.min_lr_ratio=1 mask_prefix=visible "$@")
for steps in $STEPS; do
  for mode in pos_control gist neg_control; do
    snap=$OUT/at-$steps/$mode
    [ -f "$snap/eval.json" ] && continue
    dir=$OUT/$mode
    /usr/bin/time -f "train $mode to step $steps: %e s wall" $BIN/torchrun --standalone --nproc_per_node 2 \
      $BIN/gist-dist train "${COMMON[@]}" mask=$mode train.max_steps=$steps output_dir=$dir
    /usr/bin/time -f "eval $mode at step $steps: %e s wall" $BIN/torchrun --standalone --nproc_per_node 2 \
      $BIN/gist-dist eval "${COMMON[@]}" mask=$mode train.max_steps=$steps output_dir=$dir
    mkdir -p "$snap"
    cp "$dir/eval.json" "$dir/eval_outputs.jsonl" "$snap/"
  done
  echo "== after $steps steps"
  $BIN/gist-dist eval --compare "$OUT/at-$steps/gist" "$OUT/at-$steps/pos_control" "$OUT/at-$steps/neg_control" \
    --out "$OUT/compare-$steps.md"
done
last=${STEPS##* }
for spec in ${GIST_VARIANTS:-}; do
  name=${spec%%:*}
  IFS=, read -r -a extra <<< "${spec#*:}"
  dir=$OUT/$name
  if [ ! -f "$dir/eval.json" ]; then
    /usr/bin/time -f "train $name to step $last: %e s wall" $BIN/torchrun --standalone --nproc_per_node 2 \
      $BIN/gist-dist train "${COMMON[@]}" mask=gist train.max_steps=$last "${extra[@]}" output_dir=$dir
    /usr/bin/time -f "eval $name at step $last: %e s wall" $BIN/torchrun --standalone --nproc_per_node 2 \
      $BIN/gist-dist eval "${COMMON[@]}" mask=gist train.max_steps=$last "${extra[@]}" output_dir=$dir
  fi
  echo "== $name after $last steps"
  $BIN/gist-dist eval --compare "$dir" "$OUT/at-$last/pos_control" "$OUT/at-$last/neg_control" --out "$OUT/compare-$name.md"
done
