#!/usr/bin/env bash
# Issue 18's benchmarks 3 and 5 in one run, so every variant is compared with the same controls:
# pos_control and neg_control trained once (k=1), then gist with k = each of KS, then distill
# (frozen backbone, only the gist embedding trains, gist-mask student, KL to the full prompt), all
# with benchmark 1's recipe and budget. Per variant: eval on NUM_EVAL held-out tasks per split and
# `gist-dist eval --compare` (share of the neg -> pos gap, paired bootstrap 95% interval); at the
# end `gist-dist report` over the gist runs (report.md with compression per k, rouge_vs_gist.png).
#   OUT=runs/bench-k STEPS=35 KS="1 2 5 10" DISTILL_LR=1e-2 benchmarks/k_sweep.sh [OVERRIDES...]
# Finished variants (eval.json present) are skipped, so it can be resumed; DISTILL=0 skips distill.
# DISTILL_FT=1 adds distill-ft: the same distillation with the fine-tuned pos_control model as the frozen
# backbone and teacher (its final/ folder as model.name), so the student's ceiling is the pos_control bound.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-runs/bench-k}
STEPS=${STEPS:-35}
KS=${KS:-1 2 5 10}
NUM_EVAL=${NUM_EVAL:-200}
DISTILL_LR=${DISTILL_LR:-1e-2}  # one embedding row trains: an embedding-scale lr (compress uses 2e-2)
BIN=.venv/bin
export GIST_DIST_CACHE=${GIST_DIST_CACHE:-$PWD/.cache} HF_HOME=${HF_HOME:-$PWD/.cache/hf}
export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-$PWD/.cache/torch_extensions} HF_HUB_OFFLINE=1 OMP_NUM_THREADS=1
COMMON=(configs/smollm2.yaml data.num_train=4000 data.num_eval=$NUM_EVAL train.lr=2e-4 train.warmup_steps=5
        train.min_lr_ratio=1 mask_prefix=visible train.max_steps=$STEPS "$@")

variant() {  # NAME OVERRIDES...: train then evaluate OUT/NAME, unless its eval is already there
  local name=$1; shift
  [ -f "$OUT/$name/eval.json" ] && return 0
  /usr/bin/time -f "train $name: %e s wall" $BIN/torchrun --standalone --nproc_per_node 2 \
    $BIN/gist-dist train "${COMMON[@]}" "$@" output_dir="$OUT/$name"
  /usr/bin/time -f "eval $name: %e s wall" $BIN/torchrun --standalone --nproc_per_node 2 \
    $BIN/gist-dist eval "${COMMON[@]}" "$@" output_dir="$OUT/$name"
}

variant pos_control mask=pos_control
variant neg_control mask=neg_control
names=()
for k in $KS; do variant "gist-k$k" mask=gist num_gist="$k"; names+=("gist-k$k"); done
[ "${DISTILL:-1}" = 1 ] && { variant distill objective=distill train.lr="$DISTILL_LR"; names+=(distill); }
[ "${DISTILL_FT:-0}" = 1 ] && { variant distill-ft objective=distill train.lr="$DISTILL_LR" model.name="$OUT/pos_control/final"
                               names+=(distill-ft); }
for name in "${names[@]}"; do
  echo "== $name vs the controls"
  $BIN/gist-dist eval --compare "$OUT/$name" "$OUT/pos_control" "$OUT/neg_control" --out "$OUT/compare-$name.md"
done
gist_runs=()
for k in $KS; do gist_runs+=("$OUT/gist-k$k"); done
$BIN/gist-dist report "${gist_runs[@]}" --out "$OUT/report"
