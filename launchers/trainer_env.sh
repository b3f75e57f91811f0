# Sourced by the launchers and the Slurm templates (slurm/env.sh): where the ranks meet, and the
# variables the trainer reads, which mpirun and pdsh do not pass to remote ranks by themselves.

# job_master_addr: MASTER_ADDR if set, else the first host of the Slurm allocation, else $1 (a
# fallback: this host's address for the launchers outside Slurm).
job_master_addr() {
  if [ -n "${MASTER_ADDR:-}" ]; then echo "$MASTER_ADDR"
  elif [ -n "${SLURM_JOB_NODELIST:-}" ]; then scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1
  else echo "$1"; fi
}

# job_port: MASTER_PORT if set, else a port from the Slurm job id and its restart count, so that
# jobs sharing a node, and a requeued job whose previous run's sockets are still closing, each get
# their own (10000-29999, below Linux's ephemeral range); outside Slurm 29500.
# gist_dist/dist.py derives the same port when a process finds no MASTER_PORT.
job_port() {
  if [ -n "${MASTER_PORT:-}" ]; then echo "$MASTER_PORT"
  elif [ -n "${SLURM_JOB_ID:-}" ]; then echo $((10000 + SLURM_JOB_ID % 5000 * 4 + ${SLURM_RESTART_COUNT:-0} % 4))
  else echo 29500; fi
}

# port_here PYTHON PORT: PORT if this host can bind it now, else one the OS says is free. For the
# Slurm batch shell, which runs on the allocation's first host, where rank 0's store will listen:
# a job-derived port may be held there by another process (a job whose id derives the same port, or
# anything else: nothing reserves 10000-29999, and some sites' ephemeral range covers it), and the
# job would fail at its first rendezvous.
port_here() {
  "$1" - "$2" <<'PY'
import socket, sys
with socket.socket() as s:
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as torch's store binds: TIME_WAIT is no hold
    try:
        s.bind(("", int(sys.argv[1])))
    except OSError:
        s.bind(("", 0))
    print(s.getsockname()[1])
PY
}

# threads_per_rank N: OMP_NUM_THREADS for N ranks sharing this task's CPUs (Slurm's
# --cpus-per-task, else 1), at least 1.
threads_per_rank() {
  local cpus=${SLURM_CPUS_PER_TASK:-1}
  echo $((cpus / $1 > 0 ? cpus / $1 : 1))
}

# trainer_env: the names of the variables the trainer reads that are set here.
trainer_env() {
  local var
  for var in OMP_NUM_THREADS MASTER_ADDR MASTER_PORT GIST_DIST_CACHE HF_HOME HF_HUB_OFFLINE TORCH_EXTENSIONS_DIR \
             GLOO_SOCKET_IFNAME NCCL_SOCKET_IFNAME CUDA_VISIBLE_DEVICES GIST_DIST_LAUNCHER; do
    [ -n "${!var:-}" ] && echo "$var"
  done
  return 0
}
