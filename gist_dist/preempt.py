"""Preemption: a stop signal that every rank agrees on, and the exit code that asks for a requeue.

Slurm (`--signal=B:USR1@LEAD`), torchrun and the deepspeed launcher deliver SIGUSR1 or SIGTERM to
the trainer; it finishes the current step, saves a checkpoint, writes the "stop" record to
metrics.jsonl and exits with REQUEUE_EXIT_CODE (slurm/requeue.sh requeues on either).
"""

from __future__ import annotations

import signal

from . import dist

REQUEUE_EXIT_CODE = 75  # EX_TEMPFAIL: "try again", Slurm scripts requeue on it


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
