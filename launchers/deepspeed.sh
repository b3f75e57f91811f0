#!/usr/bin/env bash
# The deepspeed launcher over a hostfile ("node01 slots=8" per line), pdsh or openmpi underneath.
#   HOSTFILE=hostfile launchers/deepspeed.sh configs/llama-7b.yaml [key=value ...]           # pdsh + ssh
#   HOSTFILE=hostfile LAUNCHER=openmpi launchers/deepspeed.sh configs/llama-7b.yaml [...]   # mpirun
# pdsh needs passwordless ssh to every host (SSH_PORT if not 22; PDSH_SSH_ARGS_APPEND for more ssh
# options); openmpi needs mpirun (and ssh beyond one host). LAUNCHER_ARGS go to pdsh/mpirun as
# they are (e.g. "--allow-run-as-root" for mpirun as root).
set -euo pipefail
CONFIG=${1:?usage: deepspeed.sh CONFIG [key=value ...]}; shift
HOSTFILE=${HOSTFILE:?set HOSTFILE (lines like: node01 slots=8)}
VENV=${VENV:-$(dirname "$0")/../.venv}
# shellcheck source=trainer_env.sh
source "$(dirname "$0")/trainer_env.sh"
# Master: MASTER_ADDR, else the first host of a Slurm allocation, else this host's first address;
# port: MASTER_PORT, else derived from the Slurm job id (29500 outside Slurm).
MASTER_ADDR=$(job_master_addr "$(hostname -I | cut -d' ' -f1)") MASTER_PORT=$(job_port)
export MASTER_ADDR MASTER_PORT OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
# The launcher exports to remote ranks what DS_ENV_FILE lists: the variables the trainer reads.
DS_ENV_FILE=$(mktemp)
export DS_ENV_FILE
trap 'rm -f "$DS_ENV_FILE"' EXIT
for var in $(trainer_env); do echo "$var=${!var}"; done > "$DS_ENV_FILE"
# --force_multi: use the hostfile's launcher even when it lists one host; --no_ssh_check: pdsh and
# mpirun name an unreachable host themselves.
"$VENV/bin/deepspeed" --hostfile "$HOSTFILE" --launcher "${LAUNCHER:-pdsh}" --force_multi --no_ssh_check \
  ${SSH_PORT:+--ssh_port "$SSH_PORT"} --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT" \
  --launcher_args "${LAUNCHER_ARGS:-}" --module gist_dist.cli train "$CONFIG" "$@"
