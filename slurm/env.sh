# Sourced by every sbatch template after the site's SETUP hook (and REPO/VENV): the conventions a
# real site needs, each overridable by setting the variable before submitting (or in SETUP).
#   SRUN            srun with the job's --cpus-per-task (since Slurm 22.05 srun no longer inherits
#                   it; SRUN_CPUS_PER_TASK is exported too) and SRUN_ARGS, e.g. "--mpi=pmix".
#   OMP_NUM_THREADS the task's CPUs / RANKS_PER_TASK (1, or torchrun's ranks per node), at least 1.
#   MASTER_ADDR     the first host of the allocation.
#   MASTER_PORT     from the job id and restart count (launchers/trainer_env.sh: job_port); if
#                   that port is held on this host (the first of the allocation, where rank 0
#                   listens), one the OS says is free. Not checked when MASTER_ADDR or MASTER_PORT is set.
#   SHUTDOWN_TIMEOUT how long torchrun waits for its ranks' checkpoint: the preemption warning's
#                   lead time (from SBATCH_SIGNAL, e.g. B:USR1@600; default 120 s) minus 10 s.
# shellcheck source=../launchers/trainer_env.sh
source "$REPO/launchers/trainer_env.sh"
# sbatch --export=NONE leaves SLURM_EXPORT_ENV=NONE to every srun as well: the job steps should see
# the environment that SETUP built.
export SLURM_EXPORT_ENV=ALL
SRUN=(srun)
if [ -n "${SLURM_CPUS_PER_TASK:-}" ]; then
  export SRUN_CPUS_PER_TASK=${SRUN_CPUS_PER_TASK:-$SLURM_CPUS_PER_TASK}
  SRUN+=(--cpus-per-task="$SRUN_CPUS_PER_TASK")
fi
read -ra SRUN_EXTRA <<< "${SRUN_ARGS:-}"
SRUN+=("${SRUN_EXTRA[@]}")
OMP_NUM_THREADS=${OMP_NUM_THREADS:-$(threads_per_rank "${RANKS_PER_TASK:-1}")}
MASTER_GIVEN=${MASTER_ADDR:-}${MASTER_PORT:-}
MASTER_ADDR=$(job_master_addr localhost) MASTER_PORT=$(job_port) PORT_NOTE=""
if [ -z "$MASTER_GIVEN" ]; then  # ours to choose: checked here, on the master's host
  JOB_PORT=$MASTER_PORT
  MASTER_PORT=$(port_here "$VENV/bin/python" "$JOB_PORT") || exit 1
  [ "$MASTER_PORT" = "$JOB_PORT" ] || PORT_NOTE=" (the job's port $JOB_PORT is held on this host)"
fi
export OMP_NUM_THREADS MASTER_ADDR MASTER_PORT
STOP_LEAD_S=${SBATCH_SIGNAL:-}; STOP_LEAD_S=${STOP_LEAD_S##*@}
[[ $STOP_LEAD_S =~ ^[0-9]+$ ]] || STOP_LEAD_S=120
export SHUTDOWN_TIMEOUT=${SHUTDOWN_TIMEOUT:-$((STOP_LEAD_S > 20 ? STOP_LEAD_S - 10 : STOP_LEAD_S / 2))}
echo "gist-dist: job ${SLURM_JOB_ID:-?} on ${SLURM_JOB_NODELIST:-?} (restart ${SLURM_RESTART_COUNT:-0}):" \
  "master $MASTER_ADDR:$MASTER_PORT$PORT_NOTE, OMP_NUM_THREADS=$OMP_NUM_THREADS, ${SRUN[*]}," \
  "preemption warning ${STOP_LEAD_S} s ahead (torchrun waits ${SHUTDOWN_TIMEOUT} s)"
