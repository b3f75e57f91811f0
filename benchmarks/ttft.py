"""P4: time to first token of gist-cached vs full-prompt-cached (and uncached) SmolLM2, against the FLOPs cut.

    .venv/bin/python benchmarks/ttft.py --data generated -n 8
    .venv/bin/python benchmarks/ttft.py --data ../shared/data/alpaca_dev.json -n 16

SmolLM2-135M-Instruct, fp32, sdpa, torch's default threads. Each prompt's cache is built once;
then rounds of (none, instruction, gist) first-token forwards are timed interleaved, so drift on a
shared machine hits every strategy alike. Prints the median TTFT per strategy and the ratios
measured speed-up / analytic FLOPs ratio (1.0 = time follows FLOPs).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from transformers import AutoModelForCausalLM

from gist_dist.analysis import flops
from gist_dist.analysis.report import measure_peak_gflops
from gist_dist.analysis.strategies import first_token_input, forward_after, strategy_cache
from gist_dist.data import GistTemplate, load_records
from gist_dist.model import resolve_model_path


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default="generated")
    ap.add_argument("-n", type=int, default=8)
    ap.add_argument("--num-gist", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=12)
    ap.add_argument("--warmup", type=int, default=2)
    args = ap.parse_args()
    model = AutoModelForCausalLM.from_pretrained(
        resolve_model_path("smollm2"), dtype=torch.float32, attn_implementation="sdpa"
    ).eval()
    shape = flops.shape_of("smollm2", model.config)
    tok, _ = flops.tokenizer_for("smollm2")
    gist = list(range(shape.vocab - args.num_gist, shape.vocab))  # stand-in ids: same cost as trained ones
    template = GistTemplate(tok, gist, max_length=1 << 30)
    examples = [template.pieces(r)[:2] for r in load_records(args.data, n=args.n)]
    times = {s: [] for s in flops.STRATEGIES}  # per example: median seconds
    for prompt, tail in examples:
        prefixes = {s: strategy_cache(model, prompt, gist, s) for s in flops.STRATEGIES}
        rounds = {s: [] for s in flops.STRATEGIES}
        for r in range(args.warmup + args.rounds):
            for s in flops.STRATEGIES:
                t0 = time.perf_counter()
                forward_after(model, first_token_input(prompt, tail, s), prefixes[s])
                if r >= args.warmup:
                    rounds[s].append(time.perf_counter() - t0)
        for s in flops.STRATEGIES:
            times[s].append(statistics.median(rounds[s]))
    lengths = [(len(p), len(t)) for p, t in examples]
    analytic = flops.dataset_flops(shape, lengths, args.num_gist, "fp32")
    g = analytic["gflops_per_example"]
    ttft = {s: 1e3 * statistics.fmean(times[s]) for s in flops.STRATEGIES}
    peak = measure_peak_gflops()
    print(
        f"P4: SmolLM2-135M fp32 sdpa, {torch.get_num_threads()} threads, {len(examples)} prompts from {args.data}, "
        f"k={args.num_gist}, mean instruction {analytic['mean_prompt_tokens']:.1f} / tail "
        f"{analytic['mean_tail_tokens']:.1f} tokens; {args.rounds} interleaved rounds after {args.warmup} warm-up; "
        f"matmul peak now {peak:.1f} GFLOP/s"
    )
    print(f"{'strategy':<12} {'TTFT ms (mean of medians)':>26} {'GFLOPs':>9} {'GFLOP/s':>9} {'KV bytes/prompt':>16}")
    for s in flops.STRATEGIES:
        print(
            f"{s:<12} {ttft[s]:>26.2f} {g[s]:>9.3f} {g[s] / ttft[s] * 1e3:>9.1f} "
            f"{analytic['kv_bytes_per_prompt'][s]:>16,.0f}"
        )
    for base in ("instruction", "none"):
        speed, cut = ttft[base] / ttft["gist"], g[base] / g["gist"]
        print(
            f"gist vs {base:<11}: TTFT speed-up {speed:.3f}x, FLOPs ratio {cut:.3f}x, "
            f"speed-up / FLOPs ratio {speed / cut:.3f}"
        )


if __name__ == "__main__":
    main()
