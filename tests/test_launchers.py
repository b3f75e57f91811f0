"""Each launcher really starts a 2-rank ZeRO-3 training of the tiny config on this machine."""
from __future__ import annotations

import json
import shutil
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
    run([BIN / "deepspeed", "--num_accelerators", "2", "--master_port", free_port(), "--module", "gist_dist.cli",
         "train", TINY, f"output_dir={out}"])
    steps = assert_trained(out, "deepspeed", 20)
    first = sum(r["loss"] for r in steps[:5]) / 5
    last = sum(r["loss"] for r in steps[-5:]) / 5
    assert last < first - 0.5, (first, last)
    start, _ = read_metrics(out)
    assert steps[-1]["eval_loss"] < start["eval_loss_before"]


def test_local_launcher_used_by_make_demo(tmp_path):
    out = tmp_path / "run"
    proc = run([ROOT / "launchers" / "local.sh", "2", TINY, f"output_dir={out}", *SHORT])
    assert_trained(out, "torchrun", 4)
    assert str(out) in proc.stdout  # the summary printed after training names the run


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
    env = {"HOSTFILE": str(hostfile), "LAUNCHER": "openmpi", "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(free_port()), "LAUNCHER_ARGS": MPI_AS_ROOT}
    run([ROOT / "launchers" / "deepspeed.sh", TINY, f"output_dir={out}", *SHORT], env=env)
    assert_trained(out, "openmpi", 4)
