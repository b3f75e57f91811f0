"""Shared test helpers: run the real CLI under real launchers, on CPU ranks with gloo."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

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
    config.addinivalue_line("markers", "gpu: needs a CUDA device; skipped with the reason where none is "
                            "(CI), run on a lent GPU by benchmarks/gpu_check.sh")


# The longest groups (about 1-3 min each on the 2-core box, run one at a time), started first so both
# workers end together.
LONGEST_FIRST = ("tiny_gist_run", "test_slurm", "test_faults", "test_resume", "test_gpu_check", "test_distill",
                 "test_seq2seq_train", "test_launchers", "test_checkpointing", "test_seq2seq_inference")


def pytest_collection_modifyitems(config, items):
    """Under pytest-xdist (`make test` runs 2 workers with --dist loadgroup): each file runs whole on
    one worker, so its module fixtures (the Slurm cluster, trained runs) are built once, and the files
    sharing the session's tiny_gist_run run on one worker, so it is trained once."""
    sharing = {item.module.__name__ for item in items if "tiny_gist_run" in getattr(item, "fixturenames", ())}
    group = {}
    for item in items:
        name = item.module.__name__
        group[item] = "tiny_gist_run" if name in sharing else name
        item.add_marker(pytest.mark.xdist_group(group[item]))
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(group[item], len(rank)))  # stable: file order otherwise


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


def run(cmd: list[str], timeout: int = 600, env: dict | None = None, check: bool = True, cwd=ROOT):
    """Run a command; on failure show its output so the test report says why."""
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    proc = subprocess.run([str(c) for c in cmd], cwd=cwd, env=full_env, capture_output=True, text=True,
                          timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(map(str, cmd))} exited {proc.returncode}\n--- stdout\n"
                             f"{proc.stdout[-4000:]}\n--- stderr\n{proc.stderr[-8000:]}")
    return proc


def torchrun(args: list[str], nproc: int = 2, **kw):
    return run([BIN / "torchrun", "--nproc_per_node", str(nproc), "--master_addr", "127.0.0.1",
                "--master_port", str(free_port()), BIN / "gist-dist", *args], **kw)


def gist_dist(args: list[str], **kw):
    return run([BIN / "gist-dist", *args], **kw)


@pytest.fixture(scope="session")
def tiny_gist_run(tmp_path_factory) -> Path:
    """One 2-rank ZeRO-3 gist-mode training of the tiny config, shared by several tests."""
    out = tmp_path_factory.mktemp("tiny_gist")
    # its own, empty extensions folder: test_train_zero3 checks that the run compiled no DeepSpeed op
    extensions = out.with_name(out.name + "_ext")
    torchrun(["train", TINY, f"output_dir={out}"], env={"TORCH_EXTENSIONS_DIR": str(extensions)})
    return out


def _t5_run(tmp_path_factory, name: str, args: list[str]) -> Path:
    out = tmp_path_factory.mktemp(name)
    torchrun(["train", T5, f"output_dir={out}", *args])
    return out


@pytest.fixture(scope="session")
def t5_gist_run(tmp_path_factory) -> Path:
    """A 2-rank ZeRO-3 gist fine-tune of the tiny T5 (checkpoints at T5_SAVE_EVERY and the end),
    shared by the T5 training and inference tests."""
    return _t5_run(tmp_path_factory, "t5_gist", T5_GIST_ARGS)


@pytest.fixture(scope="session")
def t5_distill_run(tmp_path_factory) -> Path:
    """A 2-rank ZeRO-3 distillation of 2 gist rows into the frozen tiny T5, checkpointed likewise."""
    return _t5_run(tmp_path_factory, "t5_distill", T5_DISTILL_ARGS)
