"""Distributed set-up: find rank/world/master from whichever launcher started us, then init.

Precedence (first match wins):
  0. GIST_DIST_LAUNCHER=torchrun|openmpi|slurm|pmix|single forces one source (explicit override).
  1. torchrun / deepspeed launcher / by hand: RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE
     (the deepspeed launcher also sets CROSS_RANK and LOCAL_SIZE).
  2. Open MPI (mpirun):             OMPI_COMM_WORLD_RANK, _SIZE, _LOCAL_RANK, _LOCAL_SIZE
  3. Slurm (srun step):             SLURM_PROCID, SLURM_NTASKS, SLURM_LOCALID,
                                    SLURM_STEP_TASKS_PER_NODE + SLURM_NODEID
  4. PMIx (prun, srun --mpi=pmix):  PMIX_RANK, world size from mpi4py
  5. nothing: a single process (rank 0 of 1)
Master address: MASTER_ADDR, else under Slurm the first host of
`scontrol show hostnames $SLURM_JOB_NODELIST`, else under MPI rank 0's address broadcast by mpi4py
(only when the job spans several hosts), else 127.0.0.1. Port: MASTER_PORT, else under Slurm one
derived from the job id and its restart count (the formula of launchers/trainer_env.sh; the
templates export it, or a free port if it is held on the first host), so that jobs sharing a node
and a requeued job each get their own; else 29500.
A single process with no MASTER_PORT takes a free port from the OS: no other rank has to find it, and
two single-process runs on one machine must not both want 29500.
Backend: nccl with CUDA, gloo on CPU. GPU: local rank % the GPUs this process sees, so one GPU per
task (srun --gpus-per-task=1: each task sees one) and all GPUs of the node both work.
"""

from __future__ import annotations

import datetime
import os
import re
import socket
import subprocess
from dataclasses import dataclass

import torch

SOURCES = ("torchrun", "openmpi", "slurm", "pmix", "single")
# Variables worth naming when the environment does not add up.
_WATCHED = (
    "RANK",
    "WORLD_SIZE",
    "LOCAL_RANK",
    "LOCAL_WORLD_SIZE",
    "MASTER_ADDR",
    "MASTER_PORT",
    "GIST_DIST_LAUNCHER",
    "OMPI_COMM_WORLD_",
    "PMIX_RANK",
    "PMIX_LOCAL_",
    "SLURM_PROCID",
    "SLURM_NTASKS",
    "SLURM_LOCALID",
    "SLURM_NODEID",
    "SLURM_STEP_ID",
    "SLURM_STEP_TASKS_PER_NODE",
)


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


def _seen(env) -> str:
    keys = sorted(k for k in env if k.startswith(_WATCHED))
    return ", ".join(f"{k}={env[k]}" for k in keys) or "none"


def _fail(env, why: str):
    raise LaunchError(f"inconsistent launcher environment: {why}; variables seen: {_seen(env)}")


def _int(env, key, required=False):
    if key not in env:
        if required:
            _fail(env, f"{key} is not set")
        return None
    try:
        return int(env[key])
    except ValueError:
        _fail(env, f"{key}={env[key]!r} is not an integer")


def tasks_on_node(tasks_per_node: str, node_id: int) -> int | None:
    """Slurm's compressed list '2(x3),1' -> tasks on node `node_id` (here 2 for 0..2, 1 for 3)."""
    counts = []
    for part in tasks_per_node.split(","):
        m = re.fullmatch(r"(\d+)(?:\(x(\d+)\))?", part.strip())
        if not m:
            return None
        counts += [int(m.group(1))] * int(m.group(2) or 1)
    return counts[node_id] if 0 <= node_id < len(counts) else None


def first_host(nodelist: str) -> str:
    """First host of a Slurm nodelist, via scontrol when present ('gpu[03-04],cpu1' -> 'gpu03')."""
    try:
        out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True, timeout=30)
        if out.returncode == 0 and out.stdout.split():
            return out.stdout.split()[0]
    except (OSError, subprocess.TimeoutExpired):
        pass
    m = re.match(r"([^,\[]+)(?:\[([^\],\-]+))?", nodelist)
    return m.group(1) + (m.group(2) or "")


def _mpi_master(rank: int) -> str:
    from mpi4py import MPI  # only for multi-host MPI jobs without MASTER_ADDR

    addr = None
    if rank == 0:
        try:
            addr = subprocess.run(["hostname", "-I"], capture_output=True, text=True).stdout.split()[0]
        except (OSError, IndexError):
            addr = socket.gethostbyname(socket.gethostname())
    return MPI.COMM_WORLD.bcast(addr, root=0)


def _source(env) -> str:
    forced = env.get("GIST_DIST_LAUNCHER")
    if forced:
        if forced not in SOURCES:
            _fail(env, f"GIST_DIST_LAUNCHER={forced!r} is not one of {', '.join(SOURCES)}")
        return forced
    if "RANK" in env or "WORLD_SIZE" in env:
        return "torchrun"
    if "OMPI_COMM_WORLD_RANK" in env:
        return "openmpi"
    if "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        if "SLURM_STEP_ID" not in env and _int(env, "SLURM_NTASKS") > 1:
            # The batch script itself is one process; its SLURM_NTASKS describes the allocation.
            _fail(
                env,
                f"SLURM_NTASKS={env['SLURM_NTASKS']} but this process is not in a job step "
                "(no SLURM_STEP_ID): start it with srun",
            )
        return "slurm" if "SLURM_STEP_ID" in env else "single"
    if "PMIX_RANK" in env:
        return "pmix"
    return "single"


def _ranks(env, source):
    """(rank, world, local_rank, local_world) as the source reports them (None = not reported)."""
    if source == "torchrun":
        return (
            _int(env, "RANK", True),
            _int(env, "WORLD_SIZE", True),
            _int(env, "LOCAL_RANK"),
            _int(env, "LOCAL_WORLD_SIZE") or _int(env, "LOCAL_SIZE"),
        )
    if source == "openmpi":
        return (
            _int(env, "OMPI_COMM_WORLD_RANK", True),
            _int(env, "OMPI_COMM_WORLD_SIZE", True),
            _int(env, "OMPI_COMM_WORLD_LOCAL_RANK"),
            _int(env, "OMPI_COMM_WORLD_LOCAL_SIZE"),
        )
    if source == "slurm":
        per_node = env.get("SLURM_STEP_TASKS_PER_NODE") or env.get("SLURM_TASKS_PER_NODE") or ""
        return (
            _int(env, "SLURM_PROCID", True),
            _int(env, "SLURM_NTASKS", True),
            _int(env, "SLURM_LOCALID"),
            tasks_on_node(per_node, _int(env, "SLURM_NODEID") or 0),
        )
    if source == "pmix":
        from mpi4py import MPI  # PMIx exports no sizes; MPI asks the PMIx server

        node = MPI.COMM_WORLD.Split_type(MPI.COMM_TYPE_SHARED)  # the ranks sharing this host
        return _int(env, "PMIX_RANK", True), MPI.COMM_WORLD.Get_size(), node.Get_rank(), node.Get_size()
    return 0, 1, 0, 1


def _check_agreement(env, source, rank):
    """PMIx numbers the same processes as mpirun and srun --mpi=pmix: the ranks must match.

    (SLURM_PROCID is not compared with MPI ranks: under mpirun in an allocation it numbers the
    per-node daemons, not the ranks.)"""
    pairs = {"openmpi": "PMIX_RANK", "slurm": "PMIX_RANK", "pmix": "OMPI_COMM_WORLD_RANK"}
    key = pairs.get(source)
    if key in env and _int(env, key) != rank:
        _fail(env, f"{source} rank {rank} disagrees with {key}={env[key]}")


def discover(env=None) -> DistEnv:
    env = dict(os.environ if env is None else env)
    source = _source(env)
    rank, world, local, local_world = _ranks(env, source)
    if world < 1 or not 0 <= rank < world:
        _fail(env, f"rank {rank} is outside a world of {world} ({source})")
    _check_agreement(env, source, rank)
    multi_host = local_world is None or local_world < world  # unknown: assume it may be
    local, local_world = local or 0, local_world or world
    if not 0 <= local < local_world <= world:
        _fail(env, f"local rank {local} of {local_world} does not fit a world of {world} ({source})")
    addr = env.get("MASTER_ADDR")
    if not addr and source == "slurm" and world > 1:
        addr = first_host(env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST") or "")
    if not addr and source in ("openmpi", "pmix") and multi_host:
        addr = _mpi_master(rank)
    port = _int(env, "MASTER_PORT")
    if port is None and world == 1:
        port = _free_port()
    if port is None:
        port = slurm_port(_int(env, "SLURM_JOB_ID"), _int(env, "SLURM_RESTART_COUNT") or 0)
    if source == "torchrun" and "CROSS_RANK" in env:
        source = "deepspeed"
    return DistEnv(rank, world, local, local_world, addr or "127.0.0.1", port, source)


def _free_port() -> int:
    """A port the OS says is free now (a lone process's store binds it a moment later)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def slurm_port(job_id: int | None, restart: int = 0) -> int:
    """10000 + (job id % 5000) * 4 + restart % 4 under Slurm (below Linux's ephemeral ports), else 29500."""
    return 29500 if job_id is None else 10000 + job_id % 5000 * 4 + restart % 4


def local_gpu(local_rank: int) -> int | None:
    """This rank's GPU among those it sees (None without CUDA)."""
    return local_rank % torch.cuda.device_count() if torch.cuda.is_available() else None


def exported(d: DistEnv, gpu: int | None) -> dict[str, str]:
    """What torch and DeepSpeed read. DeepSpeed takes LOCAL_RANK as the index of its GPU (engine,
    zero.Init): it gets the GPU chosen here, which is the local rank whenever every GPU of the node
    is visible."""
    return {
        "RANK": str(d.rank),
        "WORLD_SIZE": str(d.world_size),
        "LOCAL_RANK": str(d.local_rank if gpu is None else gpu),
        "LOCAL_WORLD_SIZE": str(d.local_world_size),
        "MASTER_ADDR": d.master_addr,
        "MASTER_PORT": str(d.master_port),
    }


def skip_shm_op():
    """DeepSpeed's CPU backend JIT-compiles a shared-memory all-reduce op when its process group
    starts (30-50 s with a C++ compiler on a machine's first run; an error without one). The op
    serves only `inference_all_reduce` (tensor-parallel inference), which gist-dist never calls:
    training's collectives go through gloo either way."""
    import importlib

    ds_comm = importlib.import_module("deepspeed.comm.torch")  # the module: deepspeed.comm.torch is torch
    if hasattr(ds_comm, "build_shm_op"):
        ds_comm.build_shm_op = lambda: None


def init(timeout_s: int = 600) -> DistEnv:
    """Export the discovered env (DeepSpeed and torch read it) and start the process group."""
    import deepspeed

    d = discover()
    gpu = local_gpu(d.local_rank)
    os.environ.update(exported(d, gpu))
    if not torch.distributed.is_initialized():
        backend = "nccl" if gpu is not None else "gloo"
        if gpu is not None:
            torch.cuda.set_device(gpu)
        else:
            skip_shm_op()
        deepspeed.init_distributed(
            dist_backend=backend, auto_mpi_discovery=False, timeout=datetime.timedelta(seconds=timeout_s)
        )
        log(
            f"gist-dist: {d.world_size} ranks from {d.source}, master {d.master_addr}:{d.master_port}, "
            f"backend {torch.distributed.get_backend()}"
        )
        # What each rank really got: a thread count or GPU that does not fit the allocation shows here.
        per_rank = all_gather_object((torch.get_num_threads(), os.environ.get("OMP_NUM_THREADS", "unset"), gpu))
        log(
            f"gist-dist: torch threads per rank {[r[0] for r in per_rank]} "
            f"(OMP_NUM_THREADS {', '.join(r[1] for r in per_rank)})"
            + (f", GPU per rank {[r[2] for r in per_rank]}" if gpu is not None else "")
        )
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
        red = {
            "sum": torch.distributed.ReduceOp.SUM,
            "max": torch.distributed.ReduceOp.MAX,
            "min": torch.distributed.ReduceOp.MIN,
        }[op]
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


def shutdown():
    """Leave the process group together, after a barrier. A rank that exits while its gloo group is
    still alive can abort at interpreter exit ("terminate called without an active exception",
    SIGABRT) after its work succeeded: seen once in CI when the peer had already exited."""
    if torch.distributed.is_initialized():
        barrier()
        torch.distributed.destroy_process_group()


def log(*args, **kw):
    if is_main():
        print(*args, **kw, flush=True)


def lost_peer_message(exc: BaseException) -> str | None:
    """One line for a collective that failed because another rank died or stalled, else None.

    gloo reports a dead peer at once (its socket closes) and a stalled one after the collective
    timeout (config `timeout_s`); its messages name the peer's address, not its rank.
    """
    if world() < 2:
        return None
    text = str(exc).splitlines()[0] if str(exc) else ""
    text = re.sub(r"^\[[^\]]*\.(cc|cpp):\d+\]\s*", "", text).split(". This is typically")[0]
    where = f"rank {rank()} of {world()}"
    other = f"rank {1 - rank()}" if world() == 2 else "a peer rank"
    if "timed out" in text.lower() or "timeout" in text.lower():
        return f"{where}: a collective timed out ({text}); {other} stalled or died (limit: timeout_s)"
    if isinstance(exc, torch.distributed.DistError) or "by peer" in text or "NCCL" in text:
        return f"{where}: lost {other} ({text})"
    return None
