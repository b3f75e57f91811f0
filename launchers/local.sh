#!/usr/bin/env bash
# Single machine, N CPU (or GPU) ranks via torchrun, then a short summary of the run.
#   [EVAL=1] launchers/local.sh 2 configs/smollm2.yaml [key=value ...]   (EVAL=1: gist-dist eval before the summary)
set -euo pipefail
cd "$(dirname "$0")/.."
NPROC=${1:?usage: local.sh NPROC CONFIG [key=value ...]}; CONFIG=${2:?usage: local.sh NPROC CONFIG [key=value ...]}
shift 2
VENV=${VENV:-.venv}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
OUT=$("$VENV/bin/python" -m gist_dist.cli resolve-output "$CONFIG" "$@")
"$VENV/bin/torchrun" --standalone --nproc_per_node "$NPROC" "$VENV/bin/gist-dist" train "$CONFIG" "$@"
if [[ "${EVAL:-0}" == 1 ]]; then  # held-out answers (exact match, ROUGE-L, compression) for the summary
  "$VENV/bin/torchrun" --standalone --nproc_per_node "$NPROC" "$VENV/bin/gist-dist" eval "$CONFIG" "$@"
fi
"$VENV/bin/gist-dist" summary "$OUT"
