# Sourced by the sbatch templates. run_requeueable CMD...: run one job step so that the preemption
# warning (--signal=B:USR1@120 reaches only this batch shell) is passed on to the trainer, which
# then checkpoints and exits 75; on 75 the job goes back to the queue and resumes from
# OUTPUT_DIR/checkpoints/latest when it starts again.
REQUEUE_EXIT_CODE=75  # gist_dist.checkpoint.REQUEUE_EXIT_CODE

run_requeueable() {
  local metrics="${OUTPUT_DIR:-}/metrics.jsonl" seen=0
  [ -f "$metrics" ] && seen=$(wc -l < "$metrics")
  "$@" &
  local pid=$! rc signalled=0
  # srun passes USR1/TERM on to every task of its step.
  trap 'signalled=1; echo "gist-dist: signal received, forwarding USR1 to the job step" >&2; kill -USR1 $pid' USR1 TERM
  wait "$pid"; rc=$?
  # A trapped signal interrupts `wait` (status > 128) while the step still runs: wait for its real status.
  while [ "$signalled" = 1 ]; do signalled=0; wait "$pid"; rc=$?; done
  trap - USR1 TERM
  # torchrun exits 1 even when its ranks checkpointed and exited 75: then the trainer's "stop"
  # record, written after the checkpoint was published, says the same thing.
  if [ "$rc" != 0 ] && [ -f "$metrics" ] && tail -n +"$((seen + 1))" "$metrics" | grep -q '"event": "stop"'; then
    rc=$REQUEUE_EXIT_CODE
  fi
  if [ "$rc" = "$REQUEUE_EXIT_CODE" ]; then
    echo "gist-dist: checkpoint saved, requeueing job ${SLURM_JOB_ID}" >&2
    scontrol requeue "$SLURM_JOB_ID"  # an array task has its own SLURM_JOB_ID too
  fi
  return "$rc"
}
