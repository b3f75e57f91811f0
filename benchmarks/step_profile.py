"""Where a training step goes, and its MFU: SmolLM2 gist training, packed, 2 ranks, ZeRO-3.

    torchrun --standalone --nproc_per_node 2 benchmarks/step_profile.py configs/smollm2.yaml \
        data.packing=true data.max_length=256 [key=value ...]

One Trainer; rounds alternate the optimizer kernel (torch AdamW fused=True, what the trainer
uses, vs the default foreach) so both are measured under the same load. Per step it times the
phases the engine runs (forward, backward, optimizer step: ZeRO-3's parameter all-gathers run
inside forward and backward, its gradient reduce-scatter inside backward) and, with
torch.profiler, the CPU time spent in the collective calls themselves (c10d all-gather /
reduce-scatter). MFU = achieved model FLOP/s / peak: model FLOPs per token as the report counts
them (3 x forward, analysis/report.py, LM head on every position), and with the LM head counted on
the scored (answer) positions only, which is all the logit-light loss computes; peak = a fp32 matmul
run on every rank at once in this
same process (the ranks share the host's cores, so the host's peak is the sum over ranks).
Prints medians over rounds per variant, and the fused / foreach step-time ratio.
"""

import statistics
import sys
import time
from collections import defaultdict

import torch
from torch.profiler import ProfilerActivity, profile

from gist_dist import dist
from gist_dist.analysis.flops import forward_flops, shape_of
from gist_dist.config import load_config
from gist_dist.methods.base import label_tokens
from gist_dist.trainer import Trainer

ROUNDS, WARMUP = 6, 2
COLLECTIVES = {"c10d::_allgather_base_": "all-gather calls", "c10d::_reduce_scatter_base_": "reduce-scatter calls"}


def matmul_peak_gflops(n: int = 1024, repeats: int = 5) -> float:
    """This rank's fp32 matmul GFLOP/s while every rank runs one (they share the host)."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    dist.barrier()
    best = 0.0
    for _ in range(repeats):
        t = time.perf_counter()
        for _ in range(4):
            a @ b
        best = max(best, 4 * 2 * n**3 / (time.perf_counter() - t) / 1e9)
    dist.barrier()
    return best


def timed(phases: dict, name: str, fn):
    """fn, with its wall time added to phases[name] (the engine's own methods, wrapped per instance)."""

    def wrapper(*args, **kwargs):
        t = time.perf_counter()
        out = fn(*args, **kwargs)
        phases[name] += time.perf_counter() - t
        return out

    return wrapper


def set_fused(engine, fused: bool):
    for group in engine.optimizer.optimizer.param_groups:  # DeepSpeed's wrapper -> the torch AdamW
        group["fused"], group["foreach"] = fused, not fused


def main():
    args = sys.argv[1:] or ["configs/smollm2.yaml", "data.packing=true", "data.max_length=256"]
    cfg = load_config(args[0], ["output_dir=runs/step_profile", "data.num_train=400", *args[1:]])
    trainer = Trainer(cfg)
    engine, phases = trainer.engine, defaultdict(float)
    engine.forward = timed(phases, "forward", engine.forward)
    engine.backward = timed(phases, "backward", engine.backward)
    engine.step = timed(phases, "optimizer step", engine.step)
    shape, world = shape_of(cfg.model.name), dist.world()
    peaks = [matmul_peak_gflops()]
    results = {True: defaultdict(list), False: defaultdict(list)}
    for i in range(WARMUP + ROUNDS):
        for fused in (True, False) if i % 2 == 0 else (False, True):
            set_fused(engine, fused)
            phases.clear()
            dist.barrier()
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                record = trainer.train_step()
            if i < WARMUP:
                continue
            r = results[fused]
            r["step"].append(record["step_time_s"])
            for name, seconds in phases.items():
                r[name].append(seconds)
            events = {e.key: e.self_cpu_time_total / 1e6 for e in prof.key_averages()}
            for key, name in COLLECTIVES.items():
                r[name].append(events.get(key, 0.0))
            r["tokens"].append(record["tokens"])
    peaks.append(matmul_peak_gflops())
    peak_host = sum(dist.all_gather_object(max(peaks)))
    rows = trainer.train_examples  # attention is per example inside a packed row: credit its length
    mean_example = sum(len(r["input_ids"]) for r in rows) / sum(len(r.get("lengths") or [1]) for r in rows)
    seq = max(1, round(mean_example))
    per_token = 3 * forward_flops(shape, seq, 0, logits=seq) / seq
    # the trainer runs the LM head only on scored rows (logit-light loss): FLOPs it really needs
    scored = sum(label_tokens(r) for r in rows) / sum(len(r["input_ids"]) for r in rows)
    per_token_scored = 3 * forward_flops(shape, seq, 0, logits=scored * seq) / seq
    medians = {}
    for fused, r in results.items():
        med = {k: statistics.median(v) for k, v in r.items()}
        medians[fused] = med
        achieved = med["tokens"] / med["step"] * per_token / 1e9
        needed = med["tokens"] / med["step"] * per_token_scored / 1e9
        dist.log(
            f"optimizer {'fused' if fused else 'foreach'}: step {med['step']:.2f} s for {med['tokens']:.0f} real "
            f"tokens (all ranks), {med['tokens'] / med['step']:.1f} tokens/s, "
            f"{achieved:.2f} GFLOP/s of {peak_host:.2f} peak = MFU {achieved / peak_host:.1%} (report's count: "
            f"LM head on every position); LM head on the scored {scored:.0%} only: {needed:.2f} GFLOP/s = "
            f"MFU {needed / peak_host:.1%}"
        )
        for name in ("forward", "backward", "optimizer step", *COLLECTIVES.values()):
            inside = " (inside forward/backward)" if name in COLLECTIVES.values() else ""
            dist.log(f"    {name:22s} {med[name]:6.2f} s  {med[name] / med['step']:6.1%}{inside}")
        rest = med["step"] - med["forward"] - med["backward"] - med["optimizer step"]
        dist.log(f"    {'other (collate, sync)':22s} {rest:6.2f} s  {rest / med['step']:6.1%}")
    dist.log(
        f"world={world} rounds={ROUNDS} mean example {mean_example:.1f} tokens, model FLOPs/token "
        f"{per_token / 1e9:.3f} GFLOP; step time fused / foreach = {medians[True]['step'] / medians[False]['step']:.2f}"
    )


if __name__ == "__main__":
    main()
