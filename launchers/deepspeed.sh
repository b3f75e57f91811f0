#!/usr/bin/env bash
# The deepspeed launcher over a hostfile ("node01 slots=8" per line), pdsh or openmpi underneath.
#   HOSTFILE=hostfile launchers/deepspeed.sh configs/llama-7b.yaml [key=value ...]           # pdsh + ssh
#   HOSTFILE=hostfile LAUNCHER=openmpi launchers/deepspeed.sh configs/llama-7b.yaml [...]   # mpirun
# pdsh needs passwordless ssh to every host; openmpi needs mpirun (and ssh beyond one host).
# LAUNCHER_ARGS go to pdsh/mpirun as they are (e.g. "--allow-run-as-root" for mpirun as root).
set -euo pipefail
CONFIG=${1:?usage: deepspeed.sh CONFIG [key=value ...]}; shift
HOSTFILE=${HOSTFILE:?set HOSTFILE (lines like: node01 slots=8)}
LAUNCHER=${LAUNCHER:-pdsh}
VENV=${VENV:-$(dirname "$0")/../.venv}
MASTER_ADDR=${MASTER_ADDR:-$(hostname -I | cut -d' ' -f1)}
MASTER_PORT=${MASTER_PORT:-29500}
LAUNCHER_ARGS=${LAUNCHER_ARGS:-}
EXTRA=()
if [ "$LAUNCHER" = openmpi ]; then
  # mpirun starts the ranks itself (no per-node deepspeed.launcher): hand them the master.
  LAUNCHER_ARGS="$LAUNCHER_ARGS -x MASTER_ADDR=$MASTER_ADDR -x MASTER_PORT=$MASTER_PORT"
  EXTRA+=(--no_ssh_check)
fi
# --force_multi: use the hostfile's launcher even when it lists a single host.
exec "$VENV/bin/deepspeed" --hostfile "$HOSTFILE" --launcher "$LAUNCHER" --force_multi "${EXTRA[@]}" \
  --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT" --launcher_args "$LAUNCHER_ARGS" \
  --module gist_dist.cli train "$CONFIG" "$@"
