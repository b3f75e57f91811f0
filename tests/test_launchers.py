"""Each launcher really starts a 2-rank ZeRO-3 training of the tiny config on this machine."""

from __future__ import annotations

import json
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from conftest import BIN, ROOT, TINY, free_port, run

pytestmark = pytest.mark.slow
SHORT = ["train.max_steps=4", "train.eval_batches=1"]  # launcher tests only need a few real steps


def read_metrics(out: Path) -> tuple[dict, list[dict]]:
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    start = next(r for r in records if r.get("event") == "start")
    return start, [r for r in records if "step" in r]


def assert_trained(out: Path, launcher: str, steps: int) -> list[dict]:
    start, steps_seen = read_metrics(out)
    assert start["world_size"] == 2 and start["launcher"] == launcher
    assert [r["step"] for r in steps_seen] == list(range(1, steps + 1))
    assert len(steps_seen[-1]["rank_tokens_per_s"]) == 2  # both ranks reported
    assert (out / "final" / "model.safetensors").is_file()
    return steps_seen


def test_deepspeed_launcher_trains_tiny_and_loss_falls(tmp_path):
    out = tmp_path / "run"
    # On CPU the launcher finds no GPUs: --num_accelerators says how many ranks to start.
    run(
        [
            BIN / "deepspeed",
            "--num_accelerators",
            "2",
            "--master_port",
            free_port(),
            "--module",
            "gist_dist.cli",
            "train",
            TINY,
            f"output_dir={out}",
        ]
    )
    steps = assert_trained(out, "deepspeed", 20)
    first = sum(r["loss"] for r in steps[:5]) / 5
    last = sum(r["loss"] for r in steps[-5:]) / 5
    assert last < first - 0.5, (first, last)
    start, _ = read_metrics(out)
    assert steps[-1]["eval_loss"] < start["eval_loss_before"]


MPI_AS_ROOT = "--allow-run-as-root --mca btl_tcp_if_include lo"  # root in CI; traffic on loopback only


@pytest.mark.skipif(shutil.which("mpirun") is None, reason="Open MPI's mpirun is not installed (apt openmpi-bin)")
def test_mpirun_launcher_trains_tiny(tmp_path):
    out = tmp_path / "run"
    env = {"NP": "2", "MPIRUN_ARGS": MPI_AS_ROOT, "MASTER_PORT": str(free_port())}
    run([ROOT / "launchers" / "mpirun.sh", TINY, f"output_dir={out}", *SHORT], env=env)
    assert_trained(out, "openmpi", 4)


@pytest.mark.skipif(shutil.which("mpirun") is None, reason="Open MPI's mpirun is not installed (apt openmpi-bin)")
def test_deepspeed_hostfile_with_openmpi_launcher(tmp_path):
    out = tmp_path / "run"
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("localhost slots=2\n")
    env = {
        "HOSTFILE": str(hostfile),
        "LAUNCHER": "openmpi",
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(free_port()),
        "LAUNCHER_ARGS": MPI_AS_ROOT,
    }
    run([ROOT / "launchers" / "deepspeed.sh", TINY, f"output_dir={out}", *SHORT], env=env)
    assert_trained(out, "openmpi", 4)


@pytest.fixture
def sshd_on_loopback(tmp_path):
    """An sshd of our own on 127.0.0.1 with throwaway keys: what pdsh needs to reach `localhost`."""
    sshd = shutil.which("sshd") or "/usr/sbin/sshd"
    if shutil.which("pdsh") is None or not Path(sshd).exists():
        pytest.skip("pdsh and openssh-server are not installed (apt pdsh openssh-server, or `make setup-test`)")
    d = tmp_path / "ssh"
    d.mkdir()
    for key in ("host_key", "client_key"):
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", d / key], check=True)
    (d / "authorized_keys").write_text((d / "client_key.pub").read_text())
    port = free_port()
    (d / "sshd_config").write_text(
        f"Port {port}\nListenAddress 127.0.0.1\nHostKey {d}/host_key\nAuthorizedKeysFile {d}/authorized_keys\n"
        "PasswordAuthentication no\nKbdInteractiveAuthentication no\nPermitRootLogin prohibit-password\n"
        f"PidFile {d}/sshd.pid\nStrictModes no\nUsePAM no\n"
    )
    privsep = Path("/run/sshd")  # sshd refuses to start without its privilege-separation directory
    made_privsep = not privsep.exists()
    if made_privsep:
        privsep.mkdir(mode=0o755)
    proc = subprocess.Popen(
        [sshd, "-D", "-e", "-f", d / "sshd_config"], stdout=subprocess.DEVNULL, stderr=open(d / "sshd.log", "w")
    )
    try:
        ssh_args = (
            f"-i {d}/client_key -o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null "
            "-o BatchMode=yes -o LogLevel=ERROR"
        )
        deadline = time.time() + 30
        while subprocess.run(["ssh", "-p", str(port), *ssh_args.split(), "localhost", "true"]).returncode:
            assert proc.poll() is None and time.time() < deadline, (d / "sshd.log").read_text()
            time.sleep(0.3)
        yield {"SSH_PORT": str(port), "PDSH_SSH_ARGS_APPEND": ssh_args}
    finally:
        proc.terminate()
        proc.wait(timeout=15)
        if made_privsep:
            privsep.rmdir()


def test_deepspeed_hostfile_with_pdsh_launcher(sshd_on_loopback, tmp_path):
    out = tmp_path / "run"
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("localhost slots=2\n")
    env = {
        "HOSTFILE": str(hostfile),
        "LAUNCHER": "pdsh",
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(free_port()),
        **sshd_on_loopback,
    }
    proc = run([ROOT / "launchers" / "deepspeed.sh", TINY, f"output_dir={out}", *SHORT], env=env)
    assert "localhost: gist-dist: 2 ranks from deepspeed" in proc.stdout  # came back through pdsh
    assert_trained(out, "deepspeed", 4)
