#!/usr/bin/env bash
# Submit the sweep as a job array, then the report job that starts once every array task succeeded.
#   VENV=$PWD/.venv CONFIG=configs/smollm2.yaml OUTPUT_DIR=runs/sweep slurm/submit_sweep.sh [key=value ...]
# ARRAY_ARGS: sbatch options for each array task (e.g. "--nodes=1 --ntasks-per-node=8 --gpus-per-node=8").
# REPORT_SBATCH_ARGS: sbatch options for the report job. SBATCH_SIGNAL (e.g. B:USR1@600): the array
#   tasks' preemption warning lead time (default 120 s).
# Prints the two job ids.
set -euo pipefail
: "${CONFIG:?set CONFIG}" "${OUTPUT_DIR:?set OUTPUT_DIR}"
HERE=$(dirname "$0")
export RUNS=${RUNS:-gist:1 gist:2 gist:5 gist:10 pos_control:1 neg_control:1}
COUNT=$(wc -w <<< "$RUNS")
# shellcheck disable=SC2086  # ARRAY_ARGS is a list of options
ARRAY=$(sbatch --parsable --array="0-$((COUNT - 1))" ${ARRAY_ARGS:-} "$HERE/sweep.sbatch" "$@")
# The report waits for every task; if one fails it is cancelled (--kill-on-invalid-dep), not left
# pending. It takes no preemption warning (SBATCH_SIGNAL is for the array).
# shellcheck disable=SC2086  # REPORT_SBATCH_ARGS is a list of options
REPORT=$(env -u SBATCH_SIGNAL sbatch --parsable --dependency="afterok:$ARRAY" --kill-on-invalid-dep=yes \
  ${REPORT_SBATCH_ARGS:-} "$HERE/report.sbatch")
echo "$ARRAY $REPORT"
