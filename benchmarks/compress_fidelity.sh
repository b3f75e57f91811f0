#!/usr/bin/env bash
# Compress fidelity (benchmark 4): compress a 480-token system prompt into 8 gist tokens on SmolLM2-135M-Instruct
# (2 CPU ranks, ZeRO-3, frozen backbone), then measure KL and greedy next-token agreement with the
# full-prompt teacher on held-out queries, against a no-prompt baseline (written to fidelity.json).
#   [EXTRA_QUERIES=FILE] benchmarks/compress_fidelity.sh [OUT_DIR] [key=value ...]
# The last 20 of benchmarks/data/support_queries.txt are held out, the first 60 train; EXTRA_QUERIES
# (e.g. benchmarks/data/support_queries_more.txt) adds training queries, the held-out 20 unchanged.
# key=value overrides come last, so e.g. num_gist=16 replaces the 8 tokens; fidelity.json gives each
# figure a 95% bootstrap interval over the held-out queries.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-runs/compress-fidelity}; shift || true
Q=benchmarks/data/support_queries.txt
mkdir -p "$OUT/queries"
head -n 60 "$Q" | cat - ${EXTRA_QUERIES:-/dev/null} > "$OUT/queries/train.txt"
tail -n 20 "$Q" > "$OUT/queries/heldout.txt"
.venv/bin/torchrun --standalone --nproc_per_node 2 .venv/bin/gist-dist compress \
  --prompt-file benchmarks/data/system_prompt.txt --queries "$OUT/queries/train.txt" --heldout-queries "$OUT/queries/heldout.txt" \
  --num-gist 8 --answer-tokens 32 --config configs/smollm2.yaml \
  output_dir="$OUT" data.packing=false train.micro_batch_size=4 train.max_steps=200 train.lr=0.02 train.warmup_steps=10 train.eval_batches=2 "$@"
cat "$OUT/fidelity.json"
