# Sourced by the multi-host launchers: the variables the trainer reads, which mpirun and pdsh do
# not pass to remote ranks by themselves. Prints the names that are set.
trainer_env() {
  local var
  for var in OMP_NUM_THREADS MASTER_ADDR MASTER_PORT GIST_DIST_CACHE HF_HOME HF_HUB_OFFLINE TORCH_EXTENSIONS_DIR \
             GLOO_SOCKET_IFNAME NCCL_SOCKET_IFNAME CUDA_VISIBLE_DEVICES GIST_DIST_LAUNCHER; do
    [ -n "${!var:-}" ] && echo "$var"
  done
  return 0
}
