"""Whole training runs compared in one sitting (each a real `gist-dist train` under torchrun):

  plain    DeepSpeed ZeRO-3 with its default settings (configs/zero3_plain.json), 2 ranks
  tuned    gist-dist's ZeRO-3 (configs/zero3.json: buckets/prefetch/persistence sized from the model), 2 ranks
  single   the tuned config on 1 rank (the per-rank memory a replicated model needs)
  distill  the tuned config, 2 ranks, objective=distill (P2: frozen backbone, KL to the full-prompt teacher)

    python benchmarks/zero3_runs.py --data ../shared/data/alpaca_train.json [--steps 6] \
        [--runs plain,tuned,single,distill]

Same model (SmolLM2-135M-Instruct), micro batch 4 x up to 128 tokens per rank, fp32 on CPU.
Throughput and step time skip step 1 (warm-up); memory is each rank's peak RSS.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent

RUNS = {
    "plain": (2, ["zero.json=configs/zero3_plain.json"]),
    "tuned": (2, []),
    "single": (1, []),
    "distill": (2, ["objective=distill"]),
}


def launch(name, nproc, extra, args, out):
    cmd = [
        BIN / "torchrun",
        "--standalone",
        "--nproc_per_node",
        str(nproc),
        BIN / "gist-dist",
        "train",
        "configs/smollm2.yaml",
        f"output_dir={out}",
        f"data.train={args.data}",
        f"data.eval={args.data}",
        "data.max_length=128",
        "data.packing=false",
        "train.micro_batch_size=4",
        f"train.max_steps={args.steps}",
        "train.eval_batches=1",
        "data.num_train=400",
        "data.num_eval=16",
        "train.verify_frozen=false",
        *extra,
    ]
    print(f"[{name}] {' '.join(map(str, cmd))}", flush=True)
    subprocess.run(
        cmd,
        cwd=ROOT,
        check=True,
        env={**os.environ, "OMP_NUM_THREADS": str(max(1, 2 // nproc))},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "step" in r][1:]
    return {
        "ranks": nproc,
        "step_s": statistics.median(r["step_time_s"] for r in steps),
        "tokens_per_s": statistics.median(r["tokens_per_s"] for r in steps),
        "peak_gb_per_rank": max(max(r["rank_peak_mem_gb"]) for r in steps),
    }


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--data", default="generated")
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--runs", default="plain,tuned,single,distill")
    args = p.parse_args()
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.runs.split(","):
            nproc, extra = RUNS[name]
            results[name] = launch(name, nproc, extra, args, Path(tmp) / name)
            print(f"[{name}] {results[name]}", flush=True)
    print("\n| run | ranks | median step s | tokens/s (all ranks) | peak GB per rank |\n|---|---|---|---|---|")
    for name, r in results.items():
        print(f"| {name} | {r['ranks']} | {r['step_s']:.2f} | {r['tokens_per_s']:.1f} | {r['peak_gb_per_rank']:.2f} |")
    if {"plain", "tuned"} <= results.keys():
        print(
            f"\ntuned / plain throughput: {results['tuned']['tokens_per_s'] / results['plain']['tokens_per_s']:.2f}x "
            "(target >= 1.2)"
        )
        print(
            f"tuned / plain peak memory per rank: "
            f"{results['tuned']['peak_gb_per_rank'] / results['plain']['peak_gb_per_rank']:.2f}"
        )
    if {"single", "tuned"} <= results.keys():
        print(
            f"tuned 2-rank / 1-rank peak memory per rank: "
            f"{results['tuned']['peak_gb_per_rank'] / results['single']['peak_gb_per_rank']:.2f} (target <= 0.6)"
        )
    if {"distill", "tuned"} <= results.keys():
        print(
            f"P2 distill / plain training step time: {results['distill']['step_s'] / results['tuned']['step_s']:.2f} "
            "(target <= 1.5)"
        )


if __name__ == "__main__":
    main()
