"""Where a run's metrics go: metrics.jsonl always, TensorBoard / W&B (offline) when asked, and the
progress a person watches. Rank 0 only; every backend gets the same scalars.

    log.backends=[jsonl,tensorboard]   # OUTPUT_DIR/tensorboard/ (tensorboard --logdir OUTPUT_DIR)
    log.backends=jsonl,wandb           # OUTPUT_DIR/wandb/, offline (wandb sync it later)
    log.progress=auto|bar|lines        # auto: tqdm on a terminal, one plain line per train.log_every
                                       # steps otherwise (Slurm output files stay readable)
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

from .config import ConfigError, RunConfig


def scalars(record: dict) -> dict[str, float]:
    """The numeric entries of a step record (lists of per-rank values become rank{i}/name)."""
    out = {}
    for key, value in record.items():
        if isinstance(value, bool) or key == "step":
            continue
        if isinstance(value, (int, float)):
            out[key] = float(value)
        elif isinstance(value, list) and key.startswith("rank_"):
            for i, v in enumerate(value):
                if isinstance(v, (int, float)):
                    out[f"rank{i}/{key[len('rank_') :]}"] = float(v)
    return out


_PACKAGES = {"tensorboard": ("torch.utils.tensorboard", "tensorboard"), "wandb": ("wandb", "wandb")}


def check_backends(backends: list[str]):
    """Fail with one line, before anything is written, when a chosen backend is not installed."""
    import importlib

    for name in backends:
        if name in _PACKAGES:
            module, package = _PACKAGES[name]
            try:
                importlib.import_module(module)
            except ImportError:
                raise ConfigError(
                    f"log.backends has {name} but the {package} package is not installed (pip install {package})"
                ) from None


class _TensorBoard:
    def __init__(self, out: Path, cfg: RunConfig):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(out / "tensorboard"))
        self.writer.add_text("config", "```\n" + json.dumps(_config_dict(cfg), indent=2) + "\n```")

    def log(self, step: int, values: dict):
        for name, value in values.items():
            self.writer.add_scalar(name, value, step)
        self.writer.flush()  # a preempted job keeps every step it logged

    def close(self):
        self.writer.close()


class _WandbOffline:
    def __init__(self, out: Path, cfg: RunConfig):
        import wandb

        os.environ.setdefault("WANDB_MODE", "offline")  # compute nodes rarely reach the internet
        self.run = wandb.init(dir=str(out), config=_config_dict(cfg), name=out.name, resume="allow")

    def log(self, step: int, values: dict):
        self.run.log(values, step=step)

    def close(self):
        self.run.finish()


def _config_dict(cfg: RunConfig) -> dict:
    from .config import to_dict

    return to_dict(cfg)


class MetricsLog:
    """Call `record(...)` on every rank; only rank 0 writes."""

    def __init__(self, cfg: RunConfig, main: bool, fresh: bool):
        self.out = Path(cfg.output_dir)
        self.main = main
        self.path = self.out / "metrics.jsonl"
        self.sinks = []
        if not main:
            return
        if fresh:
            self.path.unlink(missing_ok=True)  # a fresh run in a reused directory starts a fresh log
        backends = {"tensorboard": _TensorBoard, "wandb": _WandbOffline}
        self.sinks = [backends[name](self.out, cfg) for name in cfg.log.backends if name in backends]

    def record(self, record: dict):
        if not self.main:
            return
        with self.path.open("a") as fh:
            fh.write(json.dumps(record) + "\n")
        if "step" in record:
            values = scalars(record)
            for sink in self.sinks:
                sink.log(record["step"], values)

    def close(self):
        for sink in self.sinks:
            sink.close()


class Progress:
    """A tqdm bar on a terminal; in a non-interactive log, one plain line every `every` steps."""

    def __init__(self, total: int, initial: int, every: int, main: bool, desc: str, mode: str = "auto"):
        self.total, self.every, self.main, self.desc = total, every, main, desc
        self.initial, self.started = initial, time.perf_counter()
        self.bar = None
        use_bar = mode == "bar" or (mode == "auto" and sys.stderr.isatty())
        if main and use_bar:
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=initial, desc=desc)

    def update(self, step: int, loss: float, tokens_per_s: float, step_time: float):
        if not self.main:
            return
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(loss=f"{loss:.4f}")
        elif step % self.every == 0 or step == self.total:
            left = (time.perf_counter() - self.started) / max(1, step - self.initial) * (self.total - step)
            print(
                f"{self.desc} step {step}/{self.total} loss {loss:.4f} tokens/s {tokens_per_s:.1f} "
                f"step_time {step_time:.2f}s eta {left / 60:.1f} min",
                file=sys.stderr,
                flush=True,
            )

    def close(self):
        if self.bar is not None:
            self.bar.close()
