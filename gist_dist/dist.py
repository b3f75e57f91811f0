"""Distributed set-up: find rank/world/master from whichever launcher started us, then init.

Precedence (first match wins; explicit RANK/WORLD_SIZE/MASTER_ADDR/MASTER_PORT always win):
  1. torchrun / deepspeed launcher: RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE
  2. Open MPI (mpirun):             OMPI_COMM_WORLD_RANK, _SIZE, _LOCAL_RANK, _LOCAL_SIZE
  3. Slurm (srun):                  SLURM_PROCID, SLURM_NTASKS, SLURM_LOCALID, SLURM_NTASKS_PER_NODE
  4. PMIx (srun --mpi=pmix, prun):  PMIX_RANK, size via mpi4py
  5. nothing: a single process (rank 0 of 1)
Master address: MASTER_ADDR, else the first host of `scontrol show hostnames $SLURM_JOB_NODELIST`,
else rank 0's address sent over MPI, else 127.0.0.1. Port: MASTER_PORT, else 29500 (+ job id % 1000
under Slurm so concurrent jobs on one node do not collide).
Backend: nccl with CUDA, gloo on CPU.
"""
from __future__ import annotations

import datetime
import os
import socket
import subprocess
from dataclasses import dataclass

import torch


class LaunchError(RuntimeError):
    """Inconsistent launcher environment (one line naming the variables seen)."""


@dataclass
class DistEnv:
    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    master_addr: str
    master_port: int
    source: str


def _int(env, key):
    try:
        return int(env[key])
    except (KeyError, ValueError):
        return None


def _slurm_master(env) -> str | None:
    nodelist = env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST")
    if not nodelist:
        return None
    try:
        out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True, timeout=30)
        hosts = out.stdout.split()
        if hosts:
            return hosts[0]
    except (OSError, subprocess.TimeoutExpired):
        pass
    return nodelist.split(",")[0].split("[")[0]


def _mpi_master(rank: int) -> str:
    from mpi4py import MPI  # only when launched by MPI without MASTER_ADDR

    addr = None
    if rank == 0:
        try:
            addr = subprocess.run(["hostname", "-I"], capture_output=True, text=True).stdout.split()[0]
        except (OSError, IndexError):
            addr = socket.gethostbyname(socket.gethostname())
    return MPI.COMM_WORLD.bcast(addr, root=0)


def discover(env=None) -> DistEnv:
    env = dict(os.environ if env is None else env)
    seen = sorted(k for k in env if k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "PMIX_RANK") or
                  k.startswith(("OMPI_COMM_WORLD_", "SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID")))
    if "RANK" in env or "WORLD_SIZE" in env:
        rank, world, source = _int(env, "RANK"), _int(env, "WORLD_SIZE"), "torchrun"
        local, local_world = _int(env, "LOCAL_RANK"), _int(env, "LOCAL_WORLD_SIZE")
    elif "OMPI_COMM_WORLD_RANK" in env:
        rank, world, source = _int(env, "OMPI_COMM_WORLD_RANK"), _int(env, "OMPI_COMM_WORLD_SIZE"), "openmpi"
        local, local_world = _int(env, "OMPI_COMM_WORLD_LOCAL_RANK"), _int(env, "OMPI_COMM_WORLD_LOCAL_SIZE")
    elif "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        rank, world, source = _int(env, "SLURM_PROCID"), _int(env, "SLURM_NTASKS"), "slurm"
        local = _int(env, "SLURM_LOCALID")
        per_node = env.get("SLURM_TASKS_PER_NODE", env.get("SLURM_NTASKS_PER_NODE", ""))
        local_world = _int({"x": per_node.split("(")[0].split(",")[0]}, "x")
    elif "PMIX_RANK" in env:
        from mpi4py import MPI

        rank, world, source = _int(env, "PMIX_RANK"), MPI.COMM_WORLD.Get_size(), "pmix"
        local, local_world = _int(env, "PMIX_LOCAL_RANK"), _int(env, "PMIX_LOCAL_SIZE")
    else:
        rank, world, local, local_world, source = 0, 1, 0, 1, "single"
    if rank is None or world is None or not (0 <= rank < world):
        raise LaunchError(f"inconsistent launcher environment ({source}): rank={rank} world_size={world}; "
                          f"variables seen: {', '.join(seen) or 'none'}")
    local = 0 if local is None else local
    local_world = local_world or 1
    addr = env.get("MASTER_ADDR")
    if not addr and source == "slurm" and world > 1:
        addr = _slurm_master(env)
    if not addr and source in ("openmpi", "pmix") and world > 1 and local_world < world:
        addr = _mpi_master(rank)
    addr = addr or "127.0.0.1"
    port = _int(env, "MASTER_PORT")
    if port is None:
        port = 29500 + (_int(env, "SLURM_JOB_ID") or 0) % 1000
    return DistEnv(rank, world, local, local_world, addr, port, source)


def init(timeout_s: int = 600) -> DistEnv:
    """Export the discovered env (DeepSpeed and torch read it) and start the process group."""
    import deepspeed

    d = discover()
    os.environ.update(RANK=str(d.rank), WORLD_SIZE=str(d.world_size), LOCAL_RANK=str(d.local_rank),
                      LOCAL_WORLD_SIZE=str(d.local_world_size), MASTER_ADDR=d.master_addr,
                      MASTER_PORT=str(d.master_port))
    if not torch.distributed.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if torch.cuda.is_available():
            torch.cuda.set_device(d.local_rank)
        deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False,
                                   timeout=datetime.timedelta(seconds=timeout_s))
    return d


def rank() -> int:
    return torch.distributed.get_rank() if torch.distributed.is_initialized() else 0


def world() -> int:
    return torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1


def is_main() -> bool:
    return rank() == 0


def all_reduce(values: list[float], op: str = "sum") -> list[float]:
    """All-reduce a few scalars across ranks (sum, max or min)."""
    t = torch.tensor(values, dtype=torch.float64)
    if world() > 1:
        red = {"sum": torch.distributed.ReduceOp.SUM, "max": torch.distributed.ReduceOp.MAX,
               "min": torch.distributed.ReduceOp.MIN}[op]
        if torch.cuda.is_available():
            t = t.cuda()
        torch.distributed.all_reduce(t, op=red)
    return t.cpu().tolist()


def all_gather_object(obj) -> list:
    if world() == 1:
        return [obj]
    out = [None] * world()
    torch.distributed.all_gather_object(out, obj)
    return out


def barrier():
    if world() > 1:
        torch.distributed.barrier()


def log(*args, **kw):
    if is_main():
        print(*args, **kw, flush=True)
