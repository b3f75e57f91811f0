#!/usr/bin/env bash
# Open MPI: NP ranks on the hosts of HOSTFILE (default: this machine). Ranks come from
# OMPI_COMM_WORLD_*; on several hosts rank 0's address is broadcast with mpi4py.
#   NP=16 HOSTFILE=hosts launchers/mpirun.sh configs/llama-7b.yaml [key=value ...]
#   MPIRUN_ARGS="--allow-run-as-root" NP=2 launchers/mpirun.sh configs/tiny.yaml
set -euo pipefail
CONFIG=${1:?usage: mpirun.sh CONFIG [key=value ...]}; shift
VENV=${VENV:-$(dirname "$0")/../.venv}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
# shellcheck source=trainer_env.sh
source "$(dirname "$0")/trainer_env.sh"
FORWARD=()  # mpirun passes remote ranks only what it is told to
for var in $(trainer_env); do FORWARD+=(-x "$var"); done
# shellcheck disable=SC2086  # MPIRUN_ARGS is a list of options
exec mpirun -np "${NP:-2}" ${HOSTFILE:+--hostfile "$HOSTFILE"} "${FORWARD[@]}" ${MPIRUN_ARGS:-} \
  "$VENV/bin/gist-dist" train "$CONFIG" "$@"
