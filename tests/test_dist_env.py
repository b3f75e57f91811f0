"""discover(env): rank/world/master from each launcher's variables, and one-line errors when they clash."""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from gist_dist import dist
from gist_dist.dist import LaunchError, discover, first_host, tasks_on_node

ROOT = Path(__file__).resolve().parent.parent
TORCHRUN = {
    "RANK": "3",
    "WORLD_SIZE": "4",
    "LOCAL_RANK": "1",
    "LOCAL_WORLD_SIZE": "2",
    "MASTER_ADDR": "10.0.0.1",
    "MASTER_PORT": "29400",
}
OPENMPI = {
    "OMPI_COMM_WORLD_RANK": "2",
    "OMPI_COMM_WORLD_SIZE": "4",
    "OMPI_COMM_WORLD_LOCAL_RANK": "0",
    "OMPI_COMM_WORLD_LOCAL_SIZE": "2",
    "PMIX_RANK": "2",
    "MASTER_ADDR": "node1",
}
SLURM_STEP = {
    "SLURM_PROCID": "5",
    "SLURM_NTASKS": "6",
    "SLURM_LOCALID": "1",
    "SLURM_NODEID": "2",
    "SLURM_STEP_ID": "0",
    "SLURM_STEP_TASKS_PER_NODE": "2(x3)",
    "SLURM_JOB_ID": "1234",
    "SLURM_JOB_NODELIST": "gpu[07-09]",
}


def test_nothing_set_is_one_process_on_loopback():
    d = discover({})
    assert (d.rank, d.world_size, d.local_rank, d.local_world_size, d.source) == (0, 1, 0, 1, "single")
    assert d.master_addr == "127.0.0.1"


def test_two_single_process_runs_get_ports_of_their_own():
    """Two single-process runs on one machine must not both want one fixed port (29500 before): the
    second's store would fail with EADDRINUSE. Each takes a port the OS has free."""
    first = discover({})
    with socket.socket() as store:
        store.bind((first.master_addr, first.master_port))
        store.listen()
        second = discover({})
        assert second.master_port != first.master_port
        with socket.socket() as other:
            other.bind((second.master_addr, second.master_port))


def test_torchrun_variables():
    d = discover(TORCHRUN)
    assert (d.rank, d.world_size, d.local_rank, d.local_world_size) == (3, 4, 1, 2)
    assert (d.master_addr, d.master_port, d.source) == ("10.0.0.1", 29400, "torchrun")


def test_deepspeed_launcher_is_named():
    d = discover({**TORCHRUN, "CROSS_RANK": "1", "CROSS_SIZE": "2"})
    assert d.source == "deepspeed" and d.rank == 3


def test_openmpi_variables():
    d = discover(OPENMPI)
    assert (d.rank, d.world_size, d.local_rank, d.local_world_size, d.master_addr) == (2, 4, 0, 2, "node1")
    assert d.source == "openmpi"


def test_slurm_step_reads_tasks_per_node_and_job_port():
    d = discover({**SLURM_STEP, "MASTER_ADDR": "gpu07"})
    assert (d.rank, d.world_size, d.local_rank, d.local_world_size) == (5, 6, 1, 2)
    # The port launchers/trainer_env.sh derives (and the templates export): job id and restart count.
    assert (d.master_port, d.source) == (10000 + 1234 * 4, "slurm")
    assert discover({**SLURM_STEP, "SLURM_RESTART_COUNT": "1"}).master_port == 10000 + 1234 * 4 + 1


def test_slurm_port_is_the_one_the_shell_launchers_derive():
    env = {"PATH": "/usr/bin:/bin", "SLURM_JOB_ID": "98765", "SLURM_RESTART_COUNT": "2"}
    shell = subprocess.run(
        ["bash", "-c", "source launchers/trainer_env.sh; job_port"],
        env=env,
        text=True,
        capture_output=True,
        check=True,
        cwd=ROOT,
    ).stdout.strip()
    assert int(shell) == dist.slurm_port(98765, 2) == 10000 + 98765 % 5000 * 4 + 2


@pytest.mark.parametrize(
    "gpus, local_rank, gpu",
    [
        (8, 3, 3),  # every GPU of the node visible
        (1, 3, 0),  # srun --gpus-per-task=1
        (4, 6, 2),
    ],
)  # 8 ranks sharing 4 GPUs
def test_local_gpu_is_local_rank_modulo_visible_gpus(monkeypatch, gpus, local_rank, gpu):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: gpus)
    d = discover({**TORCHRUN, "LOCAL_RANK": str(local_rank), "LOCAL_WORLD_SIZE": "8", "WORLD_SIZE": "8"})
    assert dist.local_gpu(d.local_rank) == gpu
    # DeepSpeed binds the GPU LOCAL_RANK names: it is exported as the same GPU.
    assert dist.exported(d, dist.local_gpu(d.local_rank))["LOCAL_RANK"] == str(gpu)


def test_no_gpu_exports_the_local_rank(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    d = discover(TORCHRUN)
    assert dist.local_gpu(d.local_rank) is None and dist.exported(d, None)["LOCAL_RANK"] == "1"


def test_slurm_master_is_first_host_of_nodelist():
    # Without scontrol on PATH the nodelist is expanded by hand; with it, scontrol answers.
    assert discover(SLURM_STEP).master_addr == "gpu07"


def test_torchrun_inside_slurm_wins_over_slurm():
    # One srun task per node running torchrun: torchrun's RANK, not the node's SLURM_PROCID.
    d = discover({**SLURM_STEP, **TORCHRUN})
    assert (d.source, d.rank, d.world_size) == ("torchrun", 3, 4)


def test_openmpi_inside_slurm_wins_over_slurm():
    d = discover({**SLURM_STEP, **OPENMPI})
    assert (d.source, d.rank) == ("openmpi", 2)


def test_explicit_launcher_override_wins():
    d = discover({**TORCHRUN, **SLURM_STEP, "GIST_DIST_LAUNCHER": "slurm"})
    assert (d.source, d.rank, d.world_size) == ("slurm", 5, 6)
    # Explicit MASTER_ADDR / MASTER_PORT win over what the launcher would derive.
    assert (d.master_addr, d.master_port) == ("10.0.0.1", 29400)


def test_batch_script_with_one_task_is_single():
    d = discover({"SLURM_PROCID": "0", "SLURM_NTASKS": "1", "SLURM_JOB_NODELIST": "n1"})
    assert (d.source, d.world_size) == ("single", 1)


def test_tasks_per_node_expansion():
    assert [tasks_on_node("2(x3),1", i) for i in range(5)] == [2, 2, 2, 1, None]
    assert tasks_on_node("garbage", 0) is None


def test_first_host_without_scontrol(monkeypatch):
    monkeypatch.setenv("PATH", "/nonexistent")
    assert first_host("gpu[03-04,9],cpu1") == "gpu03"
    assert first_host("login2,gpu[1-2]") == "login2"


@pytest.mark.parametrize(
    "env, named",
    [
        ({"RANK": "4", "WORLD_SIZE": "4"}, "RANK=4"),  # rank out of range
        ({"WORLD_SIZE": "2"}, "WORLD_SIZE=2"),  # RANK missing
        ({"RANK": "x", "WORLD_SIZE": "2"}, "RANK='x'"),  # not a number
        ({**TORCHRUN, "LOCAL_RANK": "2"}, "LOCAL_RANK=2"),  # local rank >= local size
        ({**TORCHRUN, "LOCAL_WORLD_SIZE": "8"}, "LOCAL_WORLD_SIZE=8"),  # more local than total
        ({**OPENMPI, "PMIX_RANK": "1"}, "PMIX_RANK=1"),  # MPI runtimes disagree
        ({**SLURM_STEP, "PMIX_RANK": "0"}, "SLURM_PROCID=5"),  # srun --mpi=pmix disagree
        ({"SLURM_PROCID": "0", "SLURM_NTASKS": "2"}, "SLURM_NTASKS=2"),  # batch script, no srun
        ({**SLURM_STEP, "SLURM_NTASKS": "5"}, "SLURM_NTASKS=5"),  # procid >= ntasks
        ({**TORCHRUN, "MASTER_PORT": "http"}, "MASTER_PORT='http'"),
        ({"GIST_DIST_LAUNCHER": "lsf"}, "GIST_DIST_LAUNCHER=lsf"),
    ],
)
def test_inconsistent_env_is_one_line_naming_the_variables(env, named):
    with pytest.raises(LaunchError) as err:
        discover(env)
    message = str(err.value)
    assert "\n" not in message
    assert named in message and "variables seen:" in message


@pytest.mark.slow
def test_cli_reports_launch_error_in_one_line_and_exits_nonzero(tmp_path):
    """The real console script: a bad environment fails before anything is built or written."""
    out = tmp_path / "run"
    env = {"PATH": "/usr/bin:/bin", "RANK": "2", "WORLD_SIZE": "2", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "gist_dist.cli", "train", "configs/tiny.yaml", f"output_dir={out}"],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
    )
    assert proc.returncode == 1
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert lines[-1].startswith("gist-dist: error: inconsistent launcher environment")
    assert "RANK=2" in lines[-1] and "WORLD_SIZE=2" in lines[-1]
    assert not out.exists()
