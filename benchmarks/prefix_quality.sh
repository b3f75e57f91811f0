#!/usr/bin/env bash
# mask_prefix hidden vs visible on the generated tasks, same recipe and budget:
# the demo's config (SmolLM2-135M-Instruct, packed rows, 2 ranks, ZeRO-3) trained STEPS steps in
# gist and neg_control under each prefix rule, and pos_control once (the prefix rule does not touch
# it); every run evaluated greedily on NUM_EVAL held-out tasks of seen and of unseen families; then
# each gist variant's share of the neg -> pos gap with paired bootstrap 95% intervals (eval --compare).
#   OUT=runs/bench-prefix STEPS=60 benchmarks/prefix_quality.sh
# Runs with eval.json are skipped, so it can be resumed.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-runs/bench-prefix}
STEPS=${STEPS:-60}
NUM_EVAL=${NUM_EVAL:-64}
BIN=.venv/bin
export GIST_DIST_CACHE=${GIST_DIST_CACHE:-$PWD/.cache} HF_HOME=${HF_HOME:-$PWD/.cache/hf}
export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-$PWD/.cache/torch_extensions} HF_HUB_OFFLINE=1 OMP_NUM_THREADS=1
COMMON=(configs/smollm2.yaml data.num_train=2000 data.num_eval=$NUM_EVAL train.max_steps=$STEPS)
run() {  # name, overrides...
  local name=$1; shift
  local dir=$OUT/$name
  [ -f "$dir/eval.json" ] && return
  rm -rf "$dir"
  /usr/bin/time -f "train $name: %e s wall" $BIN/torchrun --standalone --nproc_per_node 2 $BIN/gist-dist train \
    "${COMMON[@]}" "$@" output_dir=$dir
  /usr/bin/time -f "eval $name: %e s wall" $BIN/torchrun --standalone --nproc_per_node 2 $BIN/gist-dist eval \
    "${COMMON[@]}" "$@" output_dir=$dir
}
run pos_control mask=pos_control
for prefix in hidden visible; do
  run gist-$prefix mask=gist mask_prefix=$prefix
  run neg_control-$prefix mask=neg_control mask_prefix=$prefix
done
for prefix in hidden visible; do
  echo "== mask_prefix=$prefix"
  $BIN/gist-dist eval --compare "$OUT/gist-$prefix" "$OUT/pos_control" "$OUT/neg_control-$prefix" \
    --out "$OUT/compare-$prefix.md"
done
