"""Faults on real 2-rank ZeRO-3 runs: a rank dying mid-save, preemption signals, a rank killed
or stalled mid-training. Nothing is mocked: processes are really killed, stopped and signalled.

Ranks are started either by torchrun or, like `srun` does, as two plain processes with
RANK/WORLD_SIZE set (then each rank's own exit code is what the scheduler sees).
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest

from conftest import BIN, ROOT, TINY, free_port, torchrun

pytestmark = pytest.mark.slow  # every test launches ranks

STEPS, SAVE_EVERY = 8, 4
ARGS = [f"train.max_steps={STEPS}", f"train.save_every={SAVE_EVERY}"]
REQUEUE_EXIT_CODE = 75


def losses(out: Path) -> dict[int, float]:
    return {
        r["step"]: r["loss"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "loss" in r
    }


def launch_ranks(out: Path, args: list[str], world: int = 2) -> list[subprocess.Popen]:
    """One plain `gist-dist train` process per rank, as srun starts them; logs in out.rankN.*."""
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "WORLD_SIZE": str(world),
        "LOCAL_WORLD_SIZE": str(world),
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(free_port()),
    }
    procs = []
    for rank in range(world):
        log = out.parent / f"{out.name}.rank{rank}"
        procs.append(
            subprocess.Popen(
                [BIN / "gist-dist", "train", TINY, f"output_dir={out}", *args],
                cwd=ROOT,
                env={**env, "RANK": str(rank), "LOCAL_RANK": str(rank)},
                stdout=open(f"{log}.out", "w"),
                stderr=open(f"{log}.err", "w"),
            )
        )
    return procs


def wait_for_step(out: Path, step: int, procs, timeout: float = 300):
    """Block until metrics.jsonl has logged `step` (fail if a process ends first)."""
    metrics, deadline = out / "metrics.jsonl", time.time() + timeout
    while not (metrics.is_file() and step in losses(out)):
        assert all(p.poll() is None for p in procs), "a rank ended before the fault was injected"
        assert time.time() < deadline, f"step {step} not reached"
        time.sleep(0.05)


def stderr_of(out: Path, rank: int) -> str:
    return Path(f"{out.parent / out.name}.rank{rank}.err").read_text()


def assert_latest_is_complete(ckpt: Path, world: int = 2):
    """`latest`, if present, names a checkpoint with every rank's files."""
    if not (ckpt / "latest").exists():
        return
    folder = ckpt / (ckpt / "latest").read_text().strip()
    assert (folder / "trainer_state.json").is_file()
    for rank in range(world):
        assert (folder / f"rng_rank{rank}.json").is_file()
        for kind in ("model", "optim"):
            assert (folder / f"zero_pp_rank_{rank}_mp_rank_00_{kind}_states.pt").stat().st_size > 0


@pytest.fixture(scope="module")
def crashed_in_save(tmp_path_factory) -> tuple[Path, dict]:
    """Rank 1 dies after writing its shards of the step-8 checkpoint, before publication."""
    out = tmp_path_factory.mktemp("crash_in_save")
    proc = torchrun(
        ["train", TINY, f"output_dir={out}", *ARGS],
        check=False,
        env={"GIST_DIST_FAULT": f"die_in_save:rank1:step{STEPS}"},
    )
    assert proc.returncode != 0
    assert "fault injected: die_in_save on rank 1" in proc.stderr
    return out, losses(out)  # every step was logged before the crash: the uninterrupted reference


def test_crash_during_save_keeps_previous_checkpoint(crashed_in_save):
    out, reference = crashed_in_save
    assert sorted(reference) == list(range(1, STEPS + 1))
    ckpt = out / "checkpoints"
    assert (ckpt / "latest").read_text() == f"step{SAVE_EVERY:08d}"
    assert (ckpt / f"tmp-step{STEPS:08d}").is_dir() and not (ckpt / f"step{STEPS:08d}").exists()
    assert_latest_is_complete(ckpt)
    # The previous checkpoint loads and training continues exactly as it went before the crash.
    proc = torchrun(["train", TINY, f"output_dir={out}", *ARGS])
    assert f"at step {SAVE_EVERY}" in proc.stdout
    resumed = losses(out)  # the re-run steps overwrite the crashed run's entries
    assert resumed == reference
    assert (ckpt / "latest").read_text() == f"step{STEPS:08d}"
    assert not list(ckpt.glob("tmp-step*"))  # the stale partial save is cleaned up


def test_preemption_signal_saves_requeues_and_resumes_exactly(crashed_in_save, tmp_path):
    _, reference = crashed_in_save
    out = tmp_path / "preempted"
    procs = launch_ranks(out, ARGS)
    wait_for_step(out, 1, procs)
    procs[1].send_signal(signal.SIGTERM)  # one rank hears it; the all-reduce makes all stop
    codes = [p.wait(timeout=300) for p in procs]
    assert codes == [REQUEUE_EXIT_CODE] * 2, (codes, stderr_of(out, 0)[-2000:])
    ckpt = out / "checkpoints"
    stopped_at = json.loads((ckpt / (ckpt / "latest").read_text() / "trainer_state.json").read_text())["step"]
    assert 1 <= stopped_at < STEPS
    assert_latest_is_complete(ckpt)
    stops = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if '"stop"' in line]
    assert stops == [{"event": "stop", "after_step": stopped_at, "checkpoint": f"step{stopped_at:08d}"}]
    torchrun(["train", TINY, f"output_dir={out}", *ARGS])
    assert losses(out) == reference  # steps before and after the preemption, bit for bit


def test_killed_rank_under_torchrun(tmp_path):
    out = tmp_path / "killed"
    port = free_port()
    proc = subprocess.Popen(
        [
            BIN / "torchrun",
            "--nproc_per_node",
            "2",
            "--master_addr",
            "127.0.0.1",
            "--master_port",
            str(port),
            BIN / "gist-dist",
            "train",
            TINY,
            f"output_dir={out}",
            "train.max_steps=500",
            "train.save_every=1",
            "timeout_s=30",
        ],
        cwd=ROOT,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    wait_for_step(out, 3, [proc])
    children = Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()
    rank1 = [
        int(c) for c in children if b"RANK=1\0" in Path(f"/proc/{c}/environ").read_bytes().replace(b"LOCAL_RANK", b"L")
    ]
    assert len(rank1) == 1
    os.kill(rank1[0], signal.SIGKILL)
    t0 = time.time()
    _, stderr = proc.communicate(timeout=120)
    assert time.time() - t0 < 60
    assert proc.returncode != 0
    assert re.search(r"rank\s*:\s*1\b", stderr) and "Signal 9" in stderr, stderr[-3000:]
    assert_latest_is_complete(out / "checkpoints")


@pytest.mark.parametrize("fault", ["kill", "stop"])
def test_survivor_exits_alone_naming_lost_rank_or_timeout(fault, tmp_path):
    """No launcher to tear the job down: the survivor itself must notice and exit."""
    out = tmp_path / fault
    procs = launch_ranks(out, ["train.max_steps=500", "train.save_every=1", "timeout_s=20"])
    try:
        wait_for_step(out, 2, procs)
        os.kill(procs[1].pid, signal.SIGKILL if fault == "kill" else signal.SIGSTOP)
        t0 = time.time()
        code = procs[0].wait(timeout=120)
        assert time.time() - t0 < 60
    finally:
        procs[1].kill()  # a stopped process still takes SIGKILL
        procs[1].wait()
    assert code != 0
    lines = [line for line in stderr_of(out, 0).splitlines() if "gist-dist: error:" in line]
    assert len(lines) == 1, stderr_of(out, 0)[-3000:]
    expected = "lost rank 1" if fault == "kill" else "timed out"
    assert expected in lines[0] and "Traceback" not in stderr_of(out, 0)
    assert_latest_is_complete(out / "checkpoints")
