"""The on-paper scaling tables of docs/scaling.md, derived by the project's own code.

    .venv/bin/python benchmarks/scaling_paper.py [--micro-batch 4] [--seq-len 512] [--mfu 0.4] > table.md

Per-GPU memory: gist_dist.analysis.plan (the `gist-dist plan` numbers). FLOPs: gist_dist.analysis.flops.forward_flops.
Communication: gist_dist.plan.comm_bytes_per_step (ZeRO-3 ring all-gather + reduce-scatter).

A training step (one micro batch per GPU, the same in both modes up to the backward's weight
gradients, which only gist mode computes):
    gist     forward + backward (2 forwards' worth: input and weight gradients) = 3 forwards
    distill  teacher forward + student forward + student backward (input gradients only) = 3 forwards
so FLOPs per step are about equal; what differs is memory (no optimizer state) and gradient traffic.
Time per step = max(compute, communication): ZeRO-3 prefetches the next layer while one computes.
"""

from __future__ import annotations

import argparse

from gist_dist.analysis import plan
from gist_dist.analysis.flops import forward_flops, shape_of

GiB = 2**30
MODELS = ("llama-7b", "llama-13b", "llama-70b")
NODES = (1, 4, 16)
GPUS = 8
# Stated hardware (DGX A100-80GB class): bf16 dense peak, NVLink all-gather bus bandwidth inside a
# node, and one 200 Gb/s HDR NIC per GPU between nodes (NCCL reaches about 20 GB/s on it).
PEAK_TFLOPS = 312.0
INTRA_NODE_GBPS = 200.0
INTER_NODE_GBPS = 20.0


def step(model: str, mode: str, nodes: int, mb: int, seq: int, mfu: float) -> dict:
    shape = shape_of(model)
    setup = plan.Setup(nodes=nodes, gpus_per_node=GPUS, objective=mode, micro_batch=mb, seq_len=seq)
    p = plan.plan(model, setup)
    ckpt = plan.plan(
        model,
        plan.Setup(nodes=nodes, gpus_per_node=GPUS, objective=mode, micro_batch=mb, seq_len=seq, checkpointing=True),
    )
    flops = 3 * mb * forward_flops(shape, seq, 0, logits=seq)
    compute_s = flops / (mfu * PEAK_TFLOPS * 1e12)
    comm = p["comm_bytes_per_step"]["total"]
    bandwidth = INTRA_NODE_GBPS if nodes == 1 else INTER_NODE_GBPS
    comm_s = comm / (bandwidth * 1e9)
    step_s = max(compute_s, comm_s)
    return {
        "mem_gib": p["gpu_total"] / GiB,
        "fits": p["fits"],
        "mem_ckpt_gib": ckpt["gpu_total"] / GiB,
        "fits_ckpt": ckpt["fits"],
        "tflop": flops / 1e12,
        "compute_s": compute_s,
        "comm_gb": comm / 1e9,
        "comm_s": comm_s,
        "step_s": step_s,
        "tokens_per_s": nodes * GPUS * mb * seq / step_s,
        "bound": "comm" if comm_s > compute_s else "compute",
    }


def node_local(model: str, mb: int, seq: int, mfu: float, num_gist: int = 1) -> dict:
    """Distill with the frozen backbone sharded inside each node only (ZeRO++ hpZ / hybrid sharding):
    all-gathers stay on NVLink; between nodes only the k x hidden gist gradient is all-reduced."""
    shape = shape_of(model)
    intra = plan.comm_bytes_per_step(shape, "distill", GPUS, "bf16", 1, num_gist)
    inter = 2 * num_gist * shape.hidden * 4  # fp32 ring all-reduce of the gist gradient, upper bound
    compute_s = 3 * mb * forward_flops(shape, seq, 0, logits=seq) / (mfu * PEAK_TFLOPS * 1e12)
    comm_s = intra["total"] / (INTRA_NODE_GBPS * 1e9) + inter / (INTER_NODE_GBPS * 1e9)
    return {"intra_gb": intra["total"] / 1e9, "inter_bytes": inter, "step_s": max(compute_s, comm_s)}


def tables(mb: int, seq: int, mfu: float) -> str:
    out = [
        f"Micro batch {mb} x {seq} tokens per GPU, bf16, {GPUS} GPUs per node, MFU {mfu:.0%} of "
        f"{PEAK_TFLOPS:g} TFLOP/s; all-gather bandwidth {INTRA_NODE_GBPS:g} GB/s per GPU inside a node, "
        f"{INTER_NODE_GBPS:g} GB/s per GPU across nodes.",
        "",
    ]
    out += [
        "| model | nodes x GPUs | mode | GiB/GPU (ckpt) | fits 80 GiB | TFLOP/step/GPU | compute s | "
        "comm GB/step/GPU | comm s | step s | bound | tokens/s |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for model in MODELS:
        for nodes in NODES:
            for mode in ("finetune", "distill"):
                r = step(model, mode, nodes, mb, seq, mfu)
                fits = "yes" if r["fits"] else ("with ckpt" if r["fits_ckpt"] else "no")
                out.append(
                    f"| {model} | {nodes} x {GPUS} | {mode} | {r['mem_gib']:.1f} ({r['mem_ckpt_gib']:.1f}) | "
                    f"{fits} | {r['tflop']:.1f} | {r['compute_s']:.2f} | {r['comm_gb']:.1f} | "
                    f"{r['comm_s']:.2f} | {r['step_s']:.2f} | {r['bound']} | {r['tokens_per_s']:,.0f} |"
                )
    out += [
        "",
        "Distill with the frozen backbone sharded inside each node only (all-gathers on NVLink, "
        "only the gist gradient crosses nodes):",
        "",
        "| model | all-gather GB/step/GPU (NVLink) | bytes/step/GPU across nodes | step s |",
        "|---|---|---|---|",
    ]
    for model in MODELS:
        r = node_local(model, mb, seq, mfu)
        out.append(f"| {model} | {r['intra_gb']:.1f} | {r['inter_bytes']:,} | {r['step_s']:.2f} |")
    return "\n".join(out)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--micro-batch", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--mfu", type=float, default=0.4, help="assumed model FLOP utilisation")
    args = ap.parse_args(argv)
    if args.micro_batch < 1 or args.seq_len < 1 or not 0 < args.mfu <= 1:
        ap.error("--micro-batch and --seq-len must be >= 1 and --mfu in (0, 1]")
    print(tables(args.micro_batch, args.seq_len, args.mfu))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
