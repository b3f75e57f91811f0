#!/usr/bin/env bash
# Gist vs controls on real instructions: train SmolLM2-135M-Instruct briefly in gist, pos_control and
# neg_control modes on Alpaca (train file), evaluate each on the dev file, then the share of the gap.
#   DATA=../shared/data OUT=runs/bench-controls benchmarks/eval_controls.sh
# Runs that already have final/ (trained) or eval.json (evaluated) are skipped, so it can be resumed;
# TRAIN_ONLY=1 and MODES="pos_control" train some modes only (e.g. two at once on a busy machine).
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=${DATA:-../shared/data}
OUT=${OUT:-runs/bench-controls}
STEPS=${STEPS:-12}
NPROC=${NPROC:-2}            # eval ranks
TRAIN_NPROC=${TRAIN_NPROC:-1}  # 2 ZeRO-3 ranks of SmolLM2 need ~9 GB; one process about half
MICRO_BATCH=${MICRO_BATCH:-8}  # per training rank: global batch 8 either way
NUM_DEV=${NUM_DEV:-100}
MODES=${MODES:-gist pos_control neg_control}
PORT=${PORT:-29500}  # a different one per concurrent invocation
BIN=.venv/bin
export GIST_DIST_CACHE=${GIST_DIST_CACHE:-$PWD/.cache} HF_HOME=${HF_HOME:-$PWD/.cache/hf}
export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-$PWD/.cache/torch_extensions} HF_HUB_OFFLINE=1
COMMON=(configs/smollm2.yaml "data.train=$DATA/alpaca_train.json" "data.eval=$DATA/alpaca_dev.json"
        data.num_train=0 data.max_length=256 data.packing=false train.max_steps=$STEPS train.lr=1e-4 train.warmup_steps=2
        "data.eval_splits=dev:$DATA/alpaca_dev.json" data.num_eval=$NUM_DEV eval_max_new_tokens=32 eval_batch_size=8)
for mode in $MODES; do
  dir=$OUT/$mode
  if [ ! -d "$dir/final" ]; then
    /usr/bin/time -f "train $mode: %e s wall" $BIN/torchrun --nproc_per_node "$TRAIN_NPROC" --master_port "$PORT" \
      $BIN/gist-dist train "${COMMON[@]}" train.micro_batch_size=$MICRO_BATCH mask=$mode output_dir=$dir
  fi
done
[ "${TRAIN_ONLY:-0}" = 1 ] && exit 0
for mode in gist pos_control neg_control; do
  dir=$OUT/$mode
  if [ ! -f "$dir/eval.json" ]; then
    /usr/bin/time -f "eval $mode: %e s wall" $BIN/torchrun --nproc_per_node "$NPROC" --master_port "$PORT" $BIN/gist-dist eval \
      "${COMMON[@]}" mask=$mode output_dir=$dir
  fi
done
$BIN/gist-dist eval --compare "$OUT/gist" "$OUT/pos_control" "$OUT/neg_control" --out "$OUT/controls.md"
