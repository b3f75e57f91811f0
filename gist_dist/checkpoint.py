"""Checkpoints through DeepSpeed's own (sharded) checkpointing, plus the loader position and RNG.

Atomic publication: every rank writes under a temporary tag; after a barrier rank 0 renames it
to its final tag and only then rewrites the `latest` pointer (write-then-rename). A crash during
a save leaves `latest` on the previous complete checkpoint.
"""
from __future__ import annotations

import os
import random
import shutil
import signal
from pathlib import Path

import numpy as np
import torch

from . import dist

REQUEUE_EXIT_CODE = 75  # EX_TEMPFAIL: "try again", Slurm scripts requeue on it


def rng_state() -> dict:
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}


def set_rng_state(state: dict):
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])


class Checkpointer:
    def __init__(self, directory: Path, keep: int):
        self.dir = Path(directory)
        self.keep = keep

    def latest_tag(self) -> str | None:
        pointer = self.dir / "latest"
        if not pointer.is_file():
            return None
        tag = pointer.read_text().strip()
        return tag if (self.dir / tag).is_dir() else None

    def save(self, engine, batches, step: int):
        tag, tmp_tag = f"step{step:08d}", f"tmp-step{step:08d}"
        if dist.is_main():
            shutil.rmtree(self.dir / tmp_tag, ignore_errors=True)
        dist.barrier()
        client = {"step": step, "loader": batches.state_dict(), f"rng_rank{dist.rank()}": rng_state()}
        engine.save_checkpoint(str(self.dir), tag=tmp_tag, client_state=client, save_latest=False)
        dist.barrier()  # every rank has finished writing its shards
        if dist.is_main():
            shutil.rmtree(self.dir / tag, ignore_errors=True)
            os.replace(self.dir / tmp_tag, self.dir / tag)
            tmp_pointer = self.dir / "latest.tmp"
            tmp_pointer.write_text(tag)
            os.replace(tmp_pointer, self.dir / "latest")
            self._prune(tag)
        dist.barrier()

    def _prune(self, newest: str):
        tags = sorted(p.name for p in self.dir.glob("step*") if p.is_dir())
        for old in tags[: max(0, len(tags) - self.keep)]:
            if old != newest:
                shutil.rmtree(self.dir / old, ignore_errors=True)
        for stale in self.dir.glob("tmp-step*"):
            shutil.rmtree(stale, ignore_errors=True)

    def resume(self, engine, batches) -> int:
        """Load the latest complete checkpoint if there is one; returns the step to continue from."""
        tag = self.latest_tag()
        if tag is None:
            return 0
        _, client = engine.load_checkpoint(str(self.dir), tag=tag)
        if client is None:
            raise RuntimeError(f"{self.dir / tag}: checkpoint could not be loaded")
        batches.load_state_dict(client["loader"])
        rng = client.get(f"rng_rank{dist.rank()}")
        if rng is not None:
            set_rng_state(rng)
        dist.log(f"gist-dist: resumed from {self.dir / tag} at step {client['step']}")
        return int(client["step"])


class StopSignal:
    """SIGTERM/SIGUSR1 set a flag; ranks agree (all-reduce max) to stop after the current step."""

    def __init__(self):
        self.flag = False
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(sig, self._handler)

    def _handler(self, signum, frame):
        self.flag = True

    def agreed(self) -> bool:
        return dist.all_reduce([float(self.flag)], op="max")[0] > 0
