#!/usr/bin/env bash
# torchrun on several nodes, c10d rendezvous: run the same command on every node.
#   NNODES=2 NPROC_PER_NODE=8 RDZV_ENDPOINT=node01:29400 launchers/torchrun.sh configs/llama-7b.yaml [key=value ...]
# Ranks are numbered by the rendezvous (nodes sorted by address); the endpoint host runs its store.
# RDZV_ENDPOINT default: MASTER_ADDR, else the first host of the Slurm allocation, else 127.0.0.1;
#   the port MASTER_PORT, else one derived from the Slurm job id and restart count (launchers/trainer_env.sh).
# RDZV_ID default: the Slurm job id and restart count. OMP_NUM_THREADS default: the task's CPUs
#   (SLURM_CPUS_PER_TASK, else 1) divided among NPROC_PER_NODE ranks.
# LOCAL_ADDR: this node's address for the others, when its hostname does not resolve to it.
# RDZV_CONF: e.g. is_host=1 on the endpoint host when RDZV_ENDPOINT is an address of a secondary
#   NIC (torchrun then cannot tell that it should run the rendezvous store itself).
# Preemption: SIGTERM or SIGUSR1 to torchrun (Slurm signals every process of the step) makes each
# rank checkpoint after its current step; torchrun waits SHUTDOWN_TIMEOUT s (default 110, under
# Slurm's 120 s warning; slurm/env.sh sets it from the warning's lead time) for that. torchrun
# itself then exits 1, not 75: the trainer's "stop" record in OUTPUT_DIR/metrics.jsonl is what
# tells a script to requeue (slurm/requeue.sh does).
set -euo pipefail
CONFIG=${1:?usage: torchrun.sh CONFIG [key=value ...]}; shift
VENV=${VENV:-$(dirname "$0")/../.venv}
NPROC_PER_NODE=${NPROC_PER_NODE:-1}
# shellcheck source=trainer_env.sh
source "$(dirname "$0")/trainer_env.sh"
OMP_NUM_THREADS=${OMP_NUM_THREADS:-$(threads_per_rank "$NPROC_PER_NODE")}
export OMP_NUM_THREADS
RDZV_ENDPOINT=${RDZV_ENDPOINT:-$(job_master_addr 127.0.0.1):$(job_port)}
RDZV_ID=${RDZV_ID:-${SLURM_JOB_ID:+$SLURM_JOB_ID-${SLURM_RESTART_COUNT:-0}}}
exec "$VENV/bin/torchrun" --nnodes "${NNODES:-1}" --nproc_per_node "$NPROC_PER_NODE" \
  --signals_to_handle SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1 --shutdown_timeout "${SHUTDOWN_TIMEOUT:-110}" \
  --rdzv_backend c10d --rdzv_endpoint "$RDZV_ENDPOINT" --rdzv_id "${RDZV_ID:-gist-dist}" \
  ${LOCAL_ADDR:+--local_addr "$LOCAL_ADDR"} ${RDZV_CONF:+--rdzv_conf "$RDZV_CONF"} \
  "$VENV/bin/gist-dist" train "$CONFIG" "$@"
