"""Shared test helpers: run the real CLI under real launchers, on CPU ranks with gloo."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from filelock import FileLock

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
os.environ.setdefault("GIST_DIST_CACHE", str(ROOT / ".cache"))
os.environ.setdefault("HF_HOME", str(ROOT / ".cache" / "hf"))
os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(ROOT / ".cache" / "torch_extensions"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
TINY = str(ROOT / "configs" / "tiny.yaml")
T5 = str(ROOT / "configs" / "t5-tiny.yaml")
T5_STEPS, T5_SAVE_EVERY = 8, 4
T5_GIST_ARGS = [f"train.max_steps={T5_STEPS}", f"train.save_every={T5_SAVE_EVERY}"]
T5_DISTILL_ARGS = ["objective=distill", "num_gist=2", "train.lr=0.01", *T5_GIST_ARGS]


def pytest_configure(config):
    config.addinivalue_line(
        "markers",
        "gpu: needs a CUDA device; skipped with the reason where none is "
        "(CI), run on a lent GPU by benchmarks/gpu_check.sh",
    )


# Under pytest-xdist (`make test`: 2 workers, --dist loadfile --no-loadscope-reorder) each file runs
# whole on one worker, so its module fixtures (the Slurm cluster, trained runs) are built once; two
# Slurm test clusters at once would each number jobs from 1 and derive the same master ports. Files
# go out in this order, the longest first, so both workers end together: test_slurm, then the files
# sharing tiny_gist_run (one trains it while the other worker runs test_slurm), then the rest.
LONGEST_FIRST = (
    "test_slurm",
    "tiny_gist_run",
    "test_faults",
    "test_resume",
    "test_gpu_check",
    "test_deepspeed_config",
    "test_distill",
    "test_seq2seq_train",
    "test_launchers",
    "test_activation_checkpointing",
    "test_seq2seq_inference",
    "test_packing_zero3",
    "test_gist_kv",
)


def pytest_collection_modifyitems(config, items):
    sharing = {item.module.__name__ for item in items if "tiny_gist_run" in getattr(item, "fixturenames", ())}
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}

    def place(item):
        name = item.module.__name__
        return rank.get("tiny_gist_run" if name in sharing else name, len(rank))

    items.sort(key=place)  # stable: file order otherwise


# Ports for the tests' jobs: below Linux's ephemeral range (32768+), where the other xdist worker's
# gloo connections take their local ports and could grab one between our check and the job's bind,
# and above the Slurm job ports (10000-29999, launchers/trainer_env.sh). Each worker its own slice.
_WORKER = int(os.environ.get("PYTEST_XDIST_WORKER", "gw0")[2:])
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
_PORTS = iter(range(30000 + _WORKER, 32768, _WORKERS))


def free_port() -> int:
    """The next port of this worker's slice that nothing holds (nor keeps in TIME_WAIT) now."""
    for port in _PORTS:
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
                return port
            except OSError:
                continue
    raise RuntimeError("the tests' port range 30000-32767 is used up")


# `make test-fast`: unit tests only. Every process the tests launch goes through run(), which skips there.
FAST = os.environ.get("GIST_DIST_TEST_FAST") == "1"


def run(cmd: list[str], timeout: int = 600, env: dict | None = None, check: bool = True, cwd=ROOT):
    """Run a command; on failure show its output so the test report says why."""
    if FAST:
        pytest.skip("launches processes (make test runs it)")
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    proc = subprocess.run([str(c) for c in cmd], cwd=cwd, env=full_env, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(
            f"{' '.join(map(str, cmd))} exited {proc.returncode}\n--- stdout\n"
            f"{proc.stdout[-4000:]}\n--- stderr\n{proc.stderr[-8000:]}"
        )
    return proc


def torchrun(args: list[str], nproc: int = 2, **kw):
    return run(
        [
            BIN / "torchrun",
            "--nproc_per_node",
            str(nproc),
            "--master_addr",
            "127.0.0.1",
            "--master_port",
            str(free_port()),
            BIN / "gist-dist",
            *args,
        ],
        **kw,
    )


def gist_dist(args: list[str], **kw):
    return run([BIN / "gist-dist", *args], **kw)


def shared_run(tmp_path_factory, name: str, train) -> Path:
    """A run that train(out) makes once per `make test`: the xdist workers share it (the first to ask
    trains it; one that asks meanwhile waits on the lock). A failed training is tried again by the
    next test that asks, so each reports why."""
    root = tmp_path_factory.getbasetemp()
    root = root.parent if os.environ.get("PYTEST_XDIST_WORKER") else root  # the workers' common folder
    out, done = root / name, root / f"{name}.done"
    with FileLock(root / f"{name}.lock"):
        if not done.exists():
            shutil.rmtree(out, ignore_errors=True)
            out.mkdir()
            train(out)
            done.touch()
    return out


def copy_of(run: Path, dest: Path) -> Path:
    """A run to write into (eval, report): a shared run is only read, since another worker may be
    copying or reading it at the same time. Without its checkpoints (eval reads the exported model)."""
    shutil.copytree(run, dest, ignore=shutil.ignore_patterns("checkpoints"))
    return dest


def _train_tiny_gist(out: Path):
    # its own, empty extensions folder: test_train_zero3 checks that the run compiled no DeepSpeed op
    extensions = out.with_name(out.name + "_ext")
    torchrun(["train", TINY, f"output_dir={out}"], env={"TORCH_EXTENSIONS_DIR": str(extensions)})


@pytest.fixture(scope="session")
def tiny_gist_run(tmp_path_factory) -> Path:
    """One 2-rank ZeRO-3 gist-mode training of the tiny config, shared by several tests."""
    return shared_run(tmp_path_factory, "tiny_gist", _train_tiny_gist)


def _t5_run(tmp_path_factory, name: str, args: list[str]) -> Path:
    return shared_run(tmp_path_factory, name, lambda out: torchrun(["train", T5, f"output_dir={out}", *args]))


@pytest.fixture(scope="session")
def t5_gist_run(tmp_path_factory) -> Path:
    """A 2-rank ZeRO-3 gist fine-tune of the tiny T5 (checkpoints at T5_SAVE_EVERY and the end),
    shared by the T5 training and inference tests."""
    return _t5_run(tmp_path_factory, "t5_gist", T5_GIST_ARGS)


@pytest.fixture(scope="session")
def t5_distill_run(tmp_path_factory) -> Path:
    """A 2-rank ZeRO-3 distillation of 2 gist rows into the frozen tiny T5, checkpointed likewise."""
    return _t5_run(tmp_path_factory, "t5_distill", T5_DISTILL_ARGS)
