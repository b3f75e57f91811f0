# Sourced by the sbatch templates. The preemption warning (--signal=B:USR1@LEAD) reaches only the
# batch shell; these pass it on to the job step and requeue the job when the step has stopped for it.
#   run_requeueable CMD...  a training step: USR1 goes on to the trainer, which checkpoints and exits
#                           75 (or, under torchrun, which exits 1, leaves its "stop" record); then the
#                           job goes back to the queue and resumes from OUTPUT_DIR/checkpoints/latest.
#   run_restartable CMD...  a step that simply starts over (eval): on the warning it is stopped
#                           (SIGTERM) and the job requeued.
# OUTPUT_DIR: where the trainer writes metrics.jsonl (run_requeueable reads its stop record there).
REQUEUE_EXIT_CODE=75  # gist_dist.checkpoint.REQUEUE_EXIT_CODE

_run_step() {
  local forward=$1 metrics="${OUTPUT_DIR:-}/metrics.jsonl" seen=0; shift
  [ -f "$metrics" ] && seen=$(wc -l < "$metrics")
  "$@" &
  local pid=$! rc signalled=0 warned=0
  # srun passes the signal on to every task of its step.
  trap 'signalled=1 warned=1; echo "gist-dist: signal received, sending $forward to the job step" >&2; kill -"$forward" $pid' USR1 TERM
  wait "$pid"; rc=$?
  # A trapped signal interrupts `wait` (status > 128) while the step still runs: wait for its real status.
  while [ "$signalled" = 1 ]; do signalled=0; wait "$pid"; rc=$?; done
  trap - USR1 TERM
  # The trainer's "stop" record is written after its checkpoint was published: whoever signalled the
  # step (this shell, Slurm, a SIGTERM to torchrun or srun itself), the run can resume from it.
  if [ "$rc" != 0 ] && [ -f "$metrics" ] && tail -n +"$((seen + 1))" "$metrics" | grep -q '"event": "stop"'; then
    rc=$REQUEUE_EXIT_CODE
  fi
  if [ "$forward" = TERM ] && [ "$warned" = 1 ]; then rc=$REQUEUE_EXIT_CODE; fi
  if [ "$rc" = "$REQUEUE_EXIT_CODE" ]; then
    echo "gist-dist: step stopped for preemption, requeueing job ${SLURM_JOB_ID}" >&2
    scontrol requeue "$SLURM_JOB_ID"  # an array task has its own SLURM_JOB_ID too
  fi
  return "$rc"
}

run_requeueable() { _run_step USR1 "$@"; }
run_restartable() { _run_step TERM "$@"; }
