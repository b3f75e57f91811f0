#!/usr/bin/env bash
# torchrun on several nodes, c10d rendezvous: run the same command on every node.
#   NNODES=2 NPROC_PER_NODE=8 RDZV_ENDPOINT=node01:29400 launchers/torchrun.sh configs/llama-7b.yaml [key=value ...]
# Ranks are numbered by the rendezvous (nodes sorted by address); the endpoint host runs its store.
# LOCAL_ADDR: this node's address for the others, when its hostname does not resolve to it.
# RDZV_CONF: e.g. is_host=1 on the endpoint host when RDZV_ENDPOINT is an address of a secondary
#   NIC (torchrun then cannot tell that it should run the rendezvous store itself).
# Preemption: SIGTERM or SIGUSR1 to torchrun (Slurm signals every process of the step) makes each
# rank checkpoint after its current step; torchrun waits SHUTDOWN_TIMEOUT s (default 110, under
# Slurm's 120 s warning) for that. torchrun itself then exits 1, not 75: the trainer's "stop"
# record in OUTPUT_DIR/metrics.jsonl is what tells a script to requeue (slurm/requeue.sh does).
set -euo pipefail
CONFIG=${1:?usage: torchrun.sh CONFIG [key=value ...]}; shift
VENV=${VENV:-$(dirname "$0")/../.venv}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
exec "$VENV/bin/torchrun" --nnodes "${NNODES:-1}" --nproc_per_node "${NPROC_PER_NODE:-1}" \
  --signals_to_handle SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1 --shutdown_timeout "${SHUTDOWN_TIMEOUT:-110}" \
  --rdzv_backend c10d --rdzv_endpoint "${RDZV_ENDPOINT:-127.0.0.1:29400}" --rdzv_id "${RDZV_ID:-gist-dist}" \
  ${LOCAL_ADDR:+--local_addr "$LOCAL_ADDR"} ${RDZV_CONF:+--rdzv_conf "$RDZV_CONF"} \
  "$VENV/bin/gist-dist" train "$CONFIG" "$@"
