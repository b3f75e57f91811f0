#!/usr/bin/env bash
# Issue 18, benchmark 1 at one total budget: the joint gist recipe against two-stage recipes that
# spend the same number of steps, all compared with the same controls.
#   stage 1: fine-tune with the full prompt visible (pos_control) for S1 steps;
#   stage 2, S2 steps from stage 1's model: distill-ft (backbone frozen, only the gist row trains, KL to
#            the stage-1 model seeing the prompt) or gist-ft (the whole model fine-tuned under the gist mask);
#   controls: pos_control and neg_control trained S1 + S2 steps (pos_control is stage 1 continued: the lr
#            is constant after warm-up, so that is the run trained to S1 + S2 from the start);
#   neg-ft: the floor given the same curriculum: stage 1, then S2 steps under the neg_control mask;
#   joint: gist mode trained S1 + S2 steps (benchmark 1's recipe), unless JOINT=0.
# Every variant: greedy eval on NUM_EVAL held-out tasks per split, then `gist-dist eval --compare` against
# the S1 + S2 controls (share of the neg -> pos gap, paired bootstrap 95% interval) into OUT/compare-NAME.md;
# gist-ft also against neg-ft as the floor (OUT/compare-gist-ft-vs-neg-ft.md).
#   OUT=runs/bench-two-stage S1=35 S2=35 benchmarks/two_stage.sh [OVERRIDES...]
# What is done is skipped (an eval of the run at that many steps or more), so it can be resumed.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-runs/bench-two-stage}
S1=${S1:-35}
S2=${S2:-35}
TOTAL=$((S1 + S2))
NUM_EVAL=${NUM_EVAL:-200}
DISTILL_LR=${DISTILL_LR:-1e-2}  # one embedding row trains: an embedding-scale lr (as k_sweep.sh)
BIN=.venv/bin
export GIST_DIST_CACHE=${GIST_DIST_CACHE:-$PWD/.cache} HF_HOME=${HF_HOME:-$PWD/.cache/hf}
export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-$PWD/.cache/torch_extensions} HF_HUB_OFFLINE=1 OMP_NUM_THREADS=1
COMMON=(configs/smollm2.yaml data.num_train=4000 data.num_eval=$NUM_EVAL train.lr=2e-4 train.warmup_steps=5
        train.min_lr_ratio=1 mask_prefix=visible "$@")

run() {  # NAME STEPS OVERRIDES...: train OUT/NAME to STEPS (resuming its checkpoint), then evaluate it
  local name=$1 steps=$2; shift 2
  [ -f "$OUT/$name/eval.json" ] && [ "$(cat "$OUT/$name/.steps" 2>/dev/null || echo 0)" -ge "$steps" ] && return 0
  /usr/bin/time -f "train $name to step $steps: %e s wall" $BIN/torchrun --standalone --nproc_per_node 2 \
    $BIN/gist-dist train "${COMMON[@]}" train.max_steps="$steps" "$@" output_dir="$OUT/$name"
  /usr/bin/time -f "eval $name at step $steps: %e s wall" $BIN/torchrun --standalone --nproc_per_node 2 \
    $BIN/gist-dist eval "${COMMON[@]}" train.max_steps="$steps" "$@" output_dir="$OUT/$name"
  echo "$steps" > "$OUT/$name/.steps"
}

run pos_control "$S1" mask=pos_control
[ -d "$OUT/stage1" ] || cp -r "$OUT/pos_control/final" "$OUT/stage1"  # stage 1's model, before pos_control goes on
run pos_control "$TOTAL" mask=pos_control
run neg_control "$TOTAL" mask=neg_control
run distill-ft "$S2" objective=distill train.lr="$DISTILL_LR" model.name="$OUT/stage1"
run gist-ft "$S2" mask=gist model.name="$OUT/stage1"
run neg-ft "$S2" mask=neg_control model.name="$OUT/stage1"
names=(distill-ft gist-ft)
[ "${JOINT:-1}" = 1 ] && { run gist "$TOTAL" mask=gist; names+=(gist); }
for name in "${names[@]}"; do
  echo "== $name vs the controls at $TOTAL steps"
  $BIN/gist-dist eval --compare "$OUT/$name" "$OUT/pos_control" "$OUT/neg_control" --out "$OUT/compare-$name.md"
done
$BIN/gist-dist eval --compare "$OUT/gist-ft" "$OUT/pos_control" "$OUT/neg-ft" --out "$OUT/compare-gist-ft-vs-neg-ft.md"
