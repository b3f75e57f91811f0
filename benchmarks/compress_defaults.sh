#!/usr/bin/env bash
# `gist-dist compress` as a new user runs it: no --config, no knobs, 8 tokens, self-sampled training
# queries, on two prompts of different kinds: the library help desk (benchmarks/data/system_prompt.txt,
# rules and facts) and an invoice-extraction prompt (extraction_prompt.txt, a strict JSON format).
# Only the evaluation is given: held-out user messages the run never trains on and task checks written
# from each prompt's rules. Prints each run's verdict line and wall time; fidelity.json has the rest.
#   benchmarks/compress_defaults.sh [OUT_DIR] [library|extraction ...]
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-runs/compress-defaults}; shift || true
D=benchmarks/data
mkdir -p "$OUT"
tail -n 20 "$D/support_queries.txt" > "$OUT/library_heldout.txt"
declare -A PROMPT=([library]=$D/system_prompt.txt [extraction]=$D/extraction_prompt.txt)
declare -A HELD=([library]=$OUT/library_heldout.txt [extraction]=$D/extraction_heldout.txt)
declare -A CHECKS=([library]=$D/system_prompt_checks.jsonl [extraction]=$D/extraction_checks.jsonl)
NAMES=("$@")
[ ${#NAMES[@]} -gt 0 ] || NAMES=(library extraction)
for n in "${NAMES[@]}"; do
  start=$(date +%s)
  .venv/bin/torchrun --standalone --nproc_per_node 2 .venv/bin/gist-dist compress --prompt-file "${PROMPT[$n]}" \
    --num-gist 8 --heldout-queries "${HELD[$n]}" --checks "${CHECKS[$n]}" output_dir="$OUT/$n" > "$OUT/$n.log" 2>&1
  echo "$n: $(grep '^compress: fidelity' "$OUT/$n.log")"
  grep '^compress: WARNING' "$OUT/$n.log" || true
  echo "$n: wall $(( $(date +%s) - start )) s"
done
