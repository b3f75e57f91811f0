"""P3: analytic inference FLOPs vs torch's FlopCounterMode, per caching strategy, on real prompt lengths.

    .venv/bin/python benchmarks/flops_check.py --data generated -n 8
    .venv/bin/python benchmarks/flops_check.py --data ../shared/data/alpaca_dev.json -n 8

tiny and smollm2 run real forward passes (real weights for SmolLM2); the LLaMA shapes run on the
meta device (no weights). The encoder-decoder shapes (t5-tiny with random weights, flan-t5-xxl on the
meta device) are checked per T5 strategy (none, gist, no_prompt; flops.py).
Prints analytic/measured per strategy (1.0000 = exact) and, for LLaMA-7B
with k=1 on the data's full length distribution, the FLOPs cut the paper reports as 915 -> 552.
"""

from __future__ import annotations

import argparse

from gist_dist.analysis import flops
from gist_dist.data import GistTemplate, load_records

PAPER = {"none": 915.0, "gist": 552.0}  # Mu et al. 2023, Table 3, LLaMA-7B, Human split, GFLOPs


def tokens_for(shape, gflops: float, past: int) -> int:
    """Smallest number of new tokens whose first-token forward costs at least `gflops`."""
    n = 1
    while flops.forward_flops(shape, n, past) / 1e9 < gflops:
        n += 1
    return n


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default="generated")
    ap.add_argument("-n", type=int, default=8, help="records to run forward passes on")
    ap.add_argument("--num-gist", type=int, default=1)
    args = ap.parse_args()
    tok, _ = flops.tokenizer_for("smollm2")
    lengths = flops.prompt_lengths(load_records(args.data, n=args.n), tok)
    print(f"P3: {len(lengths)} prompts from {args.data} (SmolLM2 tokenizer), k={args.num_gist}")
    print(f"{'model':<10} {'weights':<12} " + " ".join(f"{s + ' analytic/measured':>30}" for s in flops.STRATEGIES))
    for model, meta in (
        ("tiny", False),
        ("smollm2", False),
        ("llama-7b", True),
        ("llama-13b", True),
        ("llama-70b", True),
    ):
        check = flops.check_against_counter(model, lengths, args.num_gist, meta=meta)
        print(
            f"{model:<10} {check['weights']:<12} "
            + " ".join(f"{check[s]['analytic'] / check[s]['measured']:>30.6f}" for s in flops.STRATEGIES)
        )

    print(
        f"{'model':<12} {'weights':<12} "
        + " ".join(f"{s + ' analytic/measured':>30}" for s in flops.SEQ2SEQ_STRATEGIES)
    )
    for model, meta in (("t5-tiny", False), ("flan-t5-xxl", True)):
        check = flops.check_against_counter(model, lengths, args.num_gist, meta=meta)
        print(
            f"{model:<12} {check['weights']:<12} "
            + " ".join(f"{check[s]['analytic'] / check[s]['measured']:>30.6f}" for s in flops.SEQ2SEQ_STRATEGIES)
        )

    shape = flops.shape_of("llama-7b")
    pieces = [GistTemplate(tok, [], 1 << 30).pieces(r) for r in load_records(args.data)]
    for label, lens in (
        ("first-token forward (tail = input + 'Output:')", [(len(p), len(t)) for p, t, _ in pieces]),
        (
            "teacher-forced forward (tail also holds the reference output)",
            [(len(p), len(t) + len(o)) for p, t, o in pieces],
        ),
    ):
        r = flops.dataset_flops(shape, lens, 1)
        g = r["gflops_per_example"]
        print(
            f"LLaMA-7B, k=1, {len(lens)} prompts of {args.data}, {label}: none {g['none']:.1f} GFLOPs, "
            f"gist {g['gist']:.1f} GFLOPs, cut {r['reduction_vs_none']['gist']:.1%} "
            f"(mean instruction {r['mean_prompt_tokens']:.1f}, tail {r['mean_tail_tokens']:.1f} tokens)"
        )
    total, kept = tokens_for(shape, PAPER["none"], 0), tokens_for(shape, PAPER["gist"], 1)
    r = flops.dataset_flops(shape, [(total - kept, kept)], 1)
    print(
        f"paper 915 -> 552 GFLOPs (-{1 - PAPER['gist'] / PAPER['none']:.1%}) read through this formula: a "
        f"{total}-token forward, {kept} tokens left after caching, so ~{total - kept} instruction tokens; "
        f"instruction {total - kept} + tail {kept}: none {r['gflops_per_example']['none']:.1f}, "
        f"gist {r['gflops_per_example']['gist']:.1f} GFLOPs, cut {r['reduction_vs_none']['gist']:.1%}"
    )


if __name__ == "__main__":
    main()
