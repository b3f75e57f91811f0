#!/usr/bin/env bash
# Submit the sweep as a job array, then the report job that starts once every array task succeeded.
#   VENV=$PWD/.venv CONFIG=configs/smollm2.yaml OUTPUT_DIR=runs/sweep slurm/submit_sweep.sh [key=value ...]
# ARRAY_ARGS: sbatch options for each array task (e.g. "--nodes=1 --ntasks-per-node=8 --gpus-per-node=8").
# Prints the two job ids.
set -euo pipefail
: "${CONFIG:?set CONFIG}" "${OUTPUT_DIR:?set OUTPUT_DIR}"
HERE=$(dirname "$0")
export RUNS=${RUNS:-gist:1 gist:2 gist:5 gist:10 pos_control:1 neg_control:1}
COUNT=$(wc -w <<< "$RUNS")
# shellcheck disable=SC2086  # ARRAY_ARGS is a list of options
ARRAY=$(sbatch --parsable --array="0-$((COUNT - 1))" ${ARRAY_ARGS:-} "$HERE/sweep.sbatch" "$@")
REPORT=$(sbatch --parsable --dependency="afterok:$ARRAY" ${REPORT_SBATCH_ARGS:-} "$HERE/report.sbatch")
echo "$ARRAY $REPORT"
