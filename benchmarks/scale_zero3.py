"""Scale proof for ZeRO-3: per-rank memory, build time, step time and bytes communicated per step.

    .venv/bin/python benchmarks/scale_zero3.py configs/scale.yaml [key=value ...] [--nproc 2]

The driver checks free memory, launches `torchrun --nproc_per_node N` on this same file with
--worker, samples every rank's RSS from /proc while it runs, then writes OUTPUT_DIR/scale.json
and prints a Markdown table. Each worker wraps the torch.distributed collectives with a byte
counter, marks training-step boundaries at the Trainer's own seam (each `train_step()`), and runs
the real trainer (gist_dist.trainer.Trainer) unchanged. With --ds-comms-logger, DeepSpeed's own comms
logger is switched on too and its per-step totals are recorded next to ours (it makes every op
blocking, so that run's step times are not the headline numbers).

Predictions come from the project's planner (gist_dist.analysis.plan: model states, gathered working set,
activations, ring all-gather/reduce-scatter volume) for N CPU ranks in fp32, plus:
    shard per rank   = sum over parameters of ceil(numel / N) * 4 bytes   (DeepSpeed pads to N;
                       exact sizes from a meta-device build of the shape)
    peak RSS / rank  = planner total + runtime baseline (measured: imports + tokenizer, no model)
    distill step     = all-gather of every weight for the teacher forward, the student forward and
                       the student backward, less the input embedding the backward skips:
                       3 * model bytes - embedding bytes (logical size; a ring moves (N-1)/N of it
                       per rank); reduce-scatter only of the k x hidden gist gradient.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import socket
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
GB = 1e9


# ---------------------------------------------------------------- worker: count bytes, then train
COLLECTIVES = (
    "all_gather_into_tensor",
    "_all_gather_base",
    "all_gather",
    "reduce_scatter_tensor",
    "_reduce_scatter_base",
    "reduce_scatter",
    "all_reduce",
    "broadcast",
    "all_to_all_single",
)


def message_bytes(args, kwargs) -> int:
    """The whole (logical) message: all-gather output, reduce-scatter input, all-reduce tensor.
    That is the largest tensor argument, a list of tensors counting as their sum."""
    import torch

    sizes = [0]
    for v in (*args, *kwargs.values()):
        if isinstance(v, torch.Tensor):
            sizes.append(v.numel() * v.element_size())
        elif isinstance(v, (list, tuple)) and v and all(isinstance(x, torch.Tensor) for x in v):
            sizes.append(sum(x.numel() * x.element_size() for x in v))
    return max(sizes)


class CommCounter:
    """Bytes per collective, split into phases: setup, each training step, eval, other."""

    def __init__(self):
        self.phase, self.inside = "setup", False
        self.phases = defaultdict(lambda: defaultdict(lambda: [0, 0]))  # phase -> op -> [calls, bytes]
        self.steps, self.ds_steps, self.step_ops, self.ds_mark = [], [], None, None

    def install(self):
        import torch.distributed as td
        import torch.distributed.distributed_c10d as c10d

        for name in COLLECTIVES:  # before deepspeed.comm caches function objects at init
            original = getattr(c10d, name, None)
            if original is not None:
                wrapped = self._wrap(name, original)
                setattr(c10d, name, wrapped)
                if getattr(td, name, None) is original:
                    setattr(td, name, wrapped)

    def _wrap(self, name, fn):
        def counted(*args, **kwargs):
            if self.inside:  # one logical op calling another (all_gather_object -> all_gather)
                return fn(*args, **kwargs)
            self.record(name, message_bytes(args, kwargs))
            self.inside = True
            try:
                return fn(*args, **kwargs)
            finally:
                self.inside = False

        return counted

    def record(self, name, nbytes):
        for ops in (self.phases[self.phase], self.step_ops):
            if ops is not None:
                ops[name][0] += 1
                ops[name][1] += nbytes

    def step_begins(self):
        self.phase, self.step_ops, self.ds_mark = "step", defaultdict(lambda: [0, 0]), ds_logged()

    def step_ends(self):
        self.steps.append({op: {"calls": c, "bytes": b} for op, (c, b) in self.step_ops.items()})
        now = ds_logged()
        self.ds_steps.append({op: now[op] - self.ds_mark.get(op, 0) for op in now})
        self.phase, self.step_ops = "other", None

    def as_dict(self) -> dict:
        return {
            "phases": {
                p: {op: {"calls": c, "bytes": b} for op, (c, b) in ops.items()} for p, ops in self.phases.items()
            },
            "steps": self.steps,
            "deepspeed_comms_logger_steps": self.ds_steps,
        }


def ds_logged() -> dict:
    """DeepSpeed comms logger totals so far: op -> sum(count * its msg_size); empty when off."""
    from deepspeed.comm.comm import comms_logger

    if not comms_logger.enabled:
        return {}
    return {op: sum(v[0] * size for size, v in sizes.items()) for op, sizes in comms_logger.comms_dict.items()}


def count_phases(trainer, counter: CommCounter):
    """Mark the Trainer's own seams: each train_step() is one step, evaluate() is eval."""
    train_step, evaluate = trainer.train_step, trainer.evaluate

    def counted_step():
        counter.step_begins()
        try:
            return train_step()
        finally:
            counter.step_ends()

    def counted_eval():
        counter.phase = "eval"
        try:
            return evaluate()
        finally:
            counter.phase = "other"

    trainer.train_step, trainer.evaluate = counted_step, counted_eval


def with_comms_logger(config_path: str, overrides: list[str], out_dir: Path) -> list[str]:
    """A copy of the run's DeepSpeed JSON with the comms logger on, as a zero.json override."""
    from gist_dist.config import load_config

    cfg = load_config(config_path, overrides)
    src = Path(cfg.zero.json) if Path(cfg.zero.json).exists() else ROOT / cfg.zero.json
    ds = json.loads(src.read_text())
    ds["comms_logger"] = {"enabled": True, "prof_all": True, "verbose": False}
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"ds_comms_logger_rank{os.environ.get('RANK', '0')}.json"
    path.write_text(json.dumps(ds))
    return [*overrides, f"zero.json={path}"]


def worker(config_path: str, overrides: list[str], ds_comms_logger: bool) -> int:
    from gist_dist import cli
    from gist_dist.config import ConfigError, load_config
    from gist_dist.trainer import Trainer

    try:
        out = Path(load_config(config_path, overrides).output_dir)
        if ds_comms_logger:
            overrides = with_comms_logger(config_path, overrides, out)
        cfg = load_config(config_path, overrides)
    except ConfigError as e:
        print(f"scale_zero3: config error: {e}", file=sys.stderr)
        return 2
    cli._env_defaults()
    counter = CommCounter()
    counter.install()  # before deepspeed.comm caches function objects at init
    trainer = Trainer(cfg)  # set-up traffic (zero.Init, resume) counts as "setup"
    count_phases(trainer, counter)
    trainer.train()
    code = 0
    rank = int(os.environ.get("RANK", "0"))
    result = {
        "rank": rank,
        "ru_maxrss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GB,
        **counter.as_dict(),
    }
    (out / f"comm_rank{rank}.json").write_text(json.dumps(result, indent=1))
    return code


# ---------------------------------------------------------------- driver: predict, launch, sample
def meta_model(cfg, vocab_min: int):
    """The shape built on the meta device: exact parameter sizes, no memory."""
    import torch
    from transformers import AutoModelForCausalLM

    from gist_dist.model import config_from_shape, is_shape_file, resolve_model_path

    path = resolve_model_path(cfg.model.name)
    if not is_shape_file(path):
        raise SystemExit(f"scale_zero3: model.name must be a shape file (configs/models/*.yaml), got {cfg.model.name}")
    config = config_from_shape(path, vocab_min)
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config, dtype=torch.float32), config


def runtime_baseline_gb() -> float:
    """Peak RSS of a process that imported the stack and loaded the tokenizer, before any model."""
    code = (
        "import resource, torch, deepspeed, transformers; from gist_dist import trainer; "
        "from gist_dist.config import ModelConfig; from gist_dist.model import load_tokenizer; "
        "load_tokenizer(ModelConfig(tokenizer='smollm2')); "
        "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    return int(out.stdout.split()[-1]) * 1024 / GB


def predict(cfg, world: int, baseline_gb: float) -> dict:
    """The project's planner (gist_dist.analysis.plan) for this run on `world` CPU ranks in fp32, plus the
    exact padded shard and the measured runtime baseline (a CPU rank's analogue of the CUDA context)."""
    from gist_dist.analysis import plan
    from gist_dist.analysis.flops import shape_of
    from gist_dist.model import load_tokenizer

    tok_size = len(load_tokenizer(cfg.model))
    model, config = meta_model(cfg, tok_size)
    shape = shape_of(cfg.model.name, config=config)  # vocab = max(shape, tokenizer), as load_model does
    setup = plan.Setup(
        nodes=1,
        gpus_per_node=world,
        objective="distill",
        dtype="fp32",
        num_gist=cfg.num_gist,
        micro_batch=cfg.train.micro_batch_size,
        seq_len=cfg.data.max_length,
    ).validate()
    states, act = plan.model_states(shape, setup), plan.activations(shape, setup)
    in_ram = states["gpu_total"] + act
    if cfg.zero.offload_param == "nvme":  # shards live on disk; RAM holds the swap buffers instead
        in_ram += swap_buffer_bytes(cfg, shape.hidden) - states["gpu"]["parameters"]
    comm = plan.comm_bytes_per_step(shape, "distill", world, "fp32", 1, cfg.num_gist)
    elem, ring = 4, (world - 1) / world
    params = shape.params()
    # The student's backward does not need the input embedding (its output needs no grad) unless it
    # is tied to the LM head; the planner counts 3 full gathers, this refines it by that one matrix.
    embedding = 0 if shape.tied else shape.vocab * shape.hidden * elem
    return {
        "params": params,
        "meta_params": sum(p.numel() for p in model.parameters()),
        "model_bytes": params * elem,
        "vocab": shape.vocab,
        "layers": shape.layers,
        "hidden": shape.hidden,
        "tokenizer_size": tok_size,
        "shard_bytes_per_rank": sum(math.ceil(p.numel() / world) for p in model.parameters()) * elem,
        "planner_gpu_bytes": {**states["gpu"], "activations": act},
        "planner_total_gb": in_ram / GB,
        "runtime_baseline_gb": baseline_gb,
        "peak_rss_gb_per_rank": baseline_gb + in_ram / GB,
        "planner_allgather_wire_bytes_per_rank": comm["all_gather"],
        "planner_reduce_scatter_wire_bytes_per_rank": comm["reduce_scatter"],
        "distill_allgather_bytes_per_step": 3 * params * elem - embedding,
        "distill_allgather_wire_bytes_per_rank": (3 * params * elem - embedding) * ring,
        "distill_reduce_scatter_bytes_per_step": cfg.num_gist * shape.hidden * elem,
    }


def swap_buffer_bytes(cfg, hidden: int) -> int:
    """ZeRO-Infinity's pinned read buffers for nvme-offloaded parameters: count x size x 4 bytes."""
    import torch

    from gist_dist.zero import deepspeed_config

    offload = deepspeed_config(cfg, hidden, torch.float32)["zero_optimization"]["offload_param"]
    return int(offload.get("buffer_count", 5) * offload.get("buffer_size", 1e8)) * 4


def mem_available_gb() -> float:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024 / GB
    return 0.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_and_sample(args, nproc: int, every_s: float) -> dict:
    """Run the workers under torchrun; sample each rank's RSS (by RANK) and the host's free memory."""
    cmd = [
        BIN / "torchrun",
        "--nproc_per_node",
        str(nproc),
        "--master_addr",
        "127.0.0.1",
        "--master_port",
        str(free_port()),
        __file__,
        "--worker",
        args.config,
        *args.overrides,
    ]
    if args.ds_comms_logger:
        cmd.append("--ds-comms-logger")
    env = {**os.environ, "OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 1) // nproc))}
    started = time.time()
    proc = subprocess.Popen([str(c) for c in cmd], cwd=ROOT, env=env)
    peak, timeline, min_avail, last = defaultdict(float), [], mem_available_gb(), 0.0
    while proc.poll() is None:
        rss = {}
        for child in psutil.Process(proc.pid).children(recursive=True):
            try:
                rank = child.environ().get("RANK")  # torchrun's own command line has --worker too
                if rank is not None and "--worker" in child.cmdline():
                    rss[int(rank)] = child.memory_info().rss / GB
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                pass
        for rank, value in rss.items():
            peak[rank] = max(peak[rank], value)
        min_avail = min(min_avail, mem_available_gb())
        now = time.time() - started
        if rss and now - last >= 10 * every_s:
            timeline.append({"t_s": round(now, 1), "rank_rss_gb": [round(rss[r], 3) for r in sorted(rss)]})
            last = now
        time.sleep(every_s)
    return {
        "returncode": proc.returncode,
        "wall_s": time.time() - started,
        "sampled_peak_rss_gb": [peak[r] for r in sorted(peak)],
        "min_mem_available_gb": min_avail,
        "rss_timeline": timeline,
    }


def checkpoint_bytes(directory: Path) -> int:
    """Bytes on disk of the published checkpoint (distill leaves the frozen backbone out)."""
    latest = directory / "latest"
    if not latest.is_file():
        return 0
    return sum(f.stat().st_size for f in (directory / latest.read_text().strip()).rglob("*") if f.is_file())


def summarize(out: Path, nproc: int, prediction: dict, sampled: dict) -> dict:
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    start = next(r for r in records if r.get("event") == "start")
    steps = [r for r in records if "step" in r and "step_time_s" in r]
    comm = [json.loads((out / f"comm_rank{r}.json").read_text()) for r in range(nproc)]
    per_step = [[{op: v["bytes"] for op, v in step.items()} for step in c["steps"]] for c in comm]
    held = start["rank_param_bytes"]
    measured = {
        "build_s": start["build_s"],
        "model_param_bytes": start["model_param_bytes"],
        "rank_param_bytes": held,
        "rank_param_fraction": [b / start["model_param_bytes"] for b in held],
        "step_time_s": [s["step_time_s"] for s in steps],
        "loss": [s["loss"] for s in steps],
        "rank_peak_rss_gb": steps[-1]["rank_peak_mem_gb"] if steps else None,
        "rank_peak_rss_gb_at_exit": [c["ru_maxrss_gb"] for c in comm],
        "rank_comm_bytes_per_step": per_step,
        "rank_ds_comms_logger_bytes_per_step": [c["deepspeed_comms_logger_steps"] for c in comm],
        "rank_comm_phases": [c["phases"] for c in comm],
        **sampled,
        "checkpoint_bytes": checkpoint_bytes(out / "checkpoints"),
    }
    peak = max(measured["rank_peak_rss_gb_at_exit"])
    return {
        "world_size": nproc,
        "prediction": prediction,
        "measured": measured,
        "checks": {
            "peak_over_model_bytes": peak * GB / prediction["model_bytes"],
            "peak_over_prediction": peak / prediction["peak_rss_gb_per_rank"],
        },
    }


def table(result: dict) -> str:
    p, m = result["prediction"], result["measured"]
    gathers = [sum(b for op, b in step.items() if "gather" in op) for step in m["rank_comm_bytes_per_step"][0]]
    n = result["world_size"]
    rows = [
        (
            f"parameters (vocab {p['vocab']})",
            f"{p['params']:,} = {p['model_bytes'] / GB:.2f} GB fp32",
            f"{m['model_param_bytes'] / GB:.2f} GB built",
        ),
        (
            "parameter bytes held per rank",
            f"{p['shard_bytes_per_rank'] / GB:.3f} GB",
            " / ".join(f"{b / GB:.3f} GB ({f:.1%})" for b, f in zip(m["rank_param_bytes"], m["rank_param_fraction"])),
        ),
        (
            "peak RSS per rank (ru_maxrss)",
            f"{p['peak_rss_gb_per_rank']:.2f} GB (planner {p['planner_total_gb']:.2f}"
            f" + baseline {p['runtime_baseline_gb']:.2f})",
            " / ".join(f"{g:.2f} GB" for g in m["rank_peak_rss_gb_at_exit"]),
        ),
        ("peak RSS per rank (sampled /proc)", "", " / ".join(f"{g:.2f} GB" for g in m["sampled_peak_rss_gb"])),
        (
            "peak RSS per rank by the last step (ru_maxrss)",
            "",
            " / ".join(f"{g:.2f} GB" for g in m["rank_peak_rss_gb"] or []),
        ),
        ("lowest MemAvailable on the host", "", f"{m['min_mem_available_gb']:.1f} GB"),
        ("build (zero.Init + init weights)", "", f"{m['build_s']:.0f} s"),
        ("step time", "", " / ".join(f"{t:.1f} s" for t in m["step_time_s"])),
        (
            "all-gather per step, rank 0 (logical)",
            f"{p['distill_allgather_bytes_per_step'] / GB:.2f} GB",
            " / ".join(f"{g / GB:.2f} GB" for g in gathers),
        ),
        (
            "all-gather per step, rank 0 (ring, sent)",
            f"{p['distill_allgather_wire_bytes_per_rank'] / GB:.2f} GB "
            f"(planner {p['planner_allgather_wire_bytes_per_rank'] / GB:.2f})",
            " / ".join(f"{g * (n - 1) / n / GB:.2f} GB" for g in gathers),
        ),
        (
            "reduce-scatter per step, rank 0 (logical; gist gradient only)",
            f"{p['planner_reduce_scatter_wire_bytes_per_rank'] * n / (n - 1):,.0f} B (planner)",
            " / ".join(f"{step.get('reduce_scatter_tensor', 0):,} B" for step in m["rank_comm_bytes_per_step"][0]),
        ),
        ("checkpoint on disk (both ranks)", "", f"{m['checkpoint_bytes'] / 1e6:,.1f} MB"),
    ]
    lines = ["| quantity | predicted | measured |", "|---|---|---|"]
    lines += [f"| {a} | {b} | {c} |" for a, b, c in rows]
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("config")
    ap.add_argument("overrides", nargs="*", help="key=value overrides of the run config")
    ap.add_argument("--nproc", type=int, default=2)
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--ds-comms-logger", action="store_true", help="also record DeepSpeed's comms logger")
    ap.add_argument("--sample-every", type=float, default=0.5, help="seconds between RSS samples")
    ap.add_argument("--headroom-gb", type=float, default=2.0, help="free memory to leave for others")
    args = ap.parse_args(argv)
    if args.worker:
        return worker(args.config, args.overrides, args.ds_comms_logger)

    from gist_dist.config import ConfigError, load_config

    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as e:
        print(f"scale_zero3: config error: {e}", file=sys.stderr)
        return 2
    prediction = predict(cfg, args.nproc, runtime_baseline_gb())
    need = args.nproc * prediction["peak_rss_gb_per_rank"] + args.headroom_gb
    if mem_available_gb() < need:
        print(
            f"scale_zero3: needs about {need:.1f} GB free (predicted {prediction['peak_rss_gb_per_rank']:.1f} GB "
            f"x {args.nproc} ranks + {args.headroom_gb} GB headroom), {mem_available_gb():.1f} GB available; "
            "wait for other jobs or lower --headroom-gb",
            file=sys.stderr,
        )
        return 1
    sampled = launch_and_sample(args, args.nproc, args.sample_every)
    if sampled["returncode"] != 0:
        print(f"scale_zero3: training exited {sampled['returncode']}", file=sys.stderr)
        return 1
    out = Path(cfg.output_dir) if Path(cfg.output_dir).is_absolute() else ROOT / cfg.output_dir
    result = summarize(out, args.nproc, prediction, sampled)
    (out / "scale.json").write_text(json.dumps(result, indent=1))
    print(table(result))
    print(f"\nwritten: {out / 'scale.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
