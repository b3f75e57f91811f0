"""Measured time to first token, per-token decode time and KV bytes per caching strategy.

Plain HF forward passes over a KV cache, no `generate`, so every strategy runs the same code:
    none         forward(instruction + tail)                     nothing cached
    instruction  cache = forward(instruction); forward(tail)     P tokens of KV kept per prompt
    gist         cache = forward(instruction + gist), keep only the k gist entries; forward(tail)
The gist prefix keeps its original positions (the tail starts at P + k), which is what the
training mask implies: dropping the prompt's cache entries and continuing with those positions
gives the masked full-sequence logits (tests/test_gist_kv_cache.py).
The cache is built once per prompt and is not part of the time to first token: that is the point
of caching (the paper's Table 3 measures the same way).
"""

from __future__ import annotations

import statistics
import time

import torch

from ..inference.decoding import returned_cache
from .strategies import STRATEGIES, first_token_input, forward_after, strategy_cache


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def _stats(seconds: list[float]) -> dict:
    q = statistics.quantiles(seconds, n=4) if len(seconds) > 1 else seconds * 3
    return {
        "median_ms": 1e3 * statistics.median(seconds),
        "p25_ms": 1e3 * q[0],
        "p75_ms": 1e3 * q[2],
        "min_ms": 1e3 * min(seconds),
        "max_ms": 1e3 * max(seconds),
        "n": len(seconds),
    }


@torch.no_grad()
def measure_strategy(
    model, prompt, tail, gist_ids, strategy, repeats=10, warmup=2, decode_tokens=8, visible_prefix=0
) -> dict:
    """TTFT (the first-token forward given the strategy's prefix) and greedy per-token decode time.
    `visible_prefix`: the prompt's first tokens the gist strategy keeps too (mask_prefix=visible)."""
    prefix = strategy_cache(model, prompt, gist_ids, strategy, visible_prefix)
    first = first_token_input(prompt, tail, strategy)
    ttft = [_timed(lambda: forward_after(model, first, prefix)) for _ in range(warmup + repeats)][warmup:]
    out = forward_after(model, first, prefix)
    cache, token = returned_cache(out), int(out.logits[0, -1].argmax())
    decode = []
    for _ in range(warmup + decode_tokens):
        t0 = time.perf_counter()
        out = forward_after(model, [token], prefix, cache=cache)
        decode.append(time.perf_counter() - t0)
        token = int(out.logits[0, -1].argmax())
    return {
        "ttft": _stats(ttft),
        "decode_per_token": _stats(decode[warmup:]),
        "first_forward_tokens": len(first),
        "cached_tokens": prefix.length,
        "kv_bytes": prefix.nbytes()[0],
        "kv_bytes_shared": prefix.shared_nbytes(),
    }


def measure_strategies(
    model, examples: list[tuple[list[int], list[int]]], gist_ids, repeats=10, warmup=2, decode_tokens=8, prefix=0
) -> dict:
    """Per strategy: medians over examples of each example's median TTFT/decode, mean KV bytes (a
    visible prefix's entries, kept once per model, under kv_bytes_shared)."""
    result = {}
    for strategy in STRATEGIES:
        runs = [
            measure_strategy(model, p, t, gist_ids, strategy, repeats, warmup, decode_tokens, prefix)
            for p, t in examples
        ]
        result[strategy] = {
            "ttft_ms": statistics.median(r["ttft"]["median_ms"] for r in runs),
            "ttft_p25_ms": statistics.median(r["ttft"]["p25_ms"] for r in runs),
            "ttft_p75_ms": statistics.median(r["ttft"]["p75_ms"] for r in runs),
            "decode_ms_per_token": statistics.median(r["decode_per_token"]["median_ms"] for r in runs),
            "kv_bytes_per_prompt": sum(r["kv_bytes"] for r in runs) / len(runs),
            "kv_bytes_shared": runs[0]["kv_bytes_shared"],
            "examples": runs,
        }
    result["settings"] = {
        "repeats": repeats,
        "warmup": warmup,
        "decode_tokens": decode_tokens,
        "threads": torch.get_num_threads(),
        "dtype": str(next(model.parameters()).dtype).replace("torch.", ""),
    }
    return result


def latency_for(
    model, num_gist, *, data="", n=4, prompt_tokens=0, tail_tokens=3, repeats=10, warmup=2, decode_tokens=8, prefix=0
):
    """`gist-dist flops --latency`: load the model (sdpa attention, fp32 on CPU) and time each strategy
    on the first `n` records of `data`, or on one synthetic prompt of the given lengths; `prefix`: the
    prompts' first tokens the gist strategy keeps visible (mask_prefix=visible)."""
    from transformers import AutoModelForCausalLM

    from ..config import ConfigError
    from ..model import config_from_shape, is_shape_file, local_device, resolve_dtype
    from .flops import model_shape_path, shape_of, tokenizer_for

    shape = shape_of(model)
    if shape.params() > 2e9:
        raise ConfigError(f"--latency runs the model on this machine; {model} has {shape.params() / 1e9:.1f} B params")
    path = model_shape_path(model)
    dtype = resolve_dtype("auto")
    if is_shape_file(path):  # random weights: timing depends on shapes only
        torch.manual_seed(0)
        net = AutoModelForCausalLM.from_config(config_from_shape(path), dtype=dtype, attn_implementation="sdpa")
    else:
        net = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation="sdpa")
    net = net.to(local_device()).eval()
    tok, tok_name = tokenizer_for(model)
    gist = [tok.convert_tokens_to_ids(f"<GIST_{i}>") for i in range(num_gist)]
    if tok.unk_token_id in gist or None in gist:  # a base model: stand-in ids cost the same
        gist = list(range(shape.vocab - num_gist, shape.vocab))
    if data:
        from ..data import GistTemplate, load_records

        template = GistTemplate(tok, gist, max_length=1 << 30)
        examples = [template.pieces(r)[:2] for r in load_records(data, n=n)]
    else:
        examples = [(list(range(100, 100 + prompt_tokens)), list(range(200, 200 + tail_tokens)))]
    result = measure_strategies(net, examples, gist, repeats, warmup, decode_tokens, prefix)
    result["settings"].update(
        model=model,
        tokenizer=tok_name,
        data=data or "synthetic",
        num_gist=num_gist,
        prefix_tokens=prefix,
        mean_prompt_tokens=sum(len(p) for p, _ in examples) / len(examples),
    )
    return result


def format_latency(result: dict) -> str:
    s = result["settings"]
    lines = [
        f"latency on this machine ({s['threads']} threads, {s['dtype']}, {s['repeats']} repeats after "
        f"{s['warmup']} warm-up, median [p25-p75]; {s['data']}, mean instruction {s['mean_prompt_tokens']:.1f} tokens)",
        f"{'strategy':<12} {'TTFT ms':>22} {'decode ms/token':>16} {'KV bytes/prompt':>16}",
    ]
    for name in STRATEGIES:
        r = result[name]
        ttft = f"{r['ttft_ms']:.2f} [{r['ttft_p25_ms']:.2f}-{r['ttft_p75_ms']:.2f}]"
        lines.append(f"{name:<12} {ttft:>22} {r['decode_ms_per_token']:>16.2f} {r['kv_bytes_per_prompt']:>16,.0f}")
    if s.get("prefix_tokens"):
        lines.append(
            f"gist also reads the {s['prefix_tokens']}-token visible prefix, "
            f"{result['gist']['kv_bytes_shared']:,} bytes kept once for every prompt"
        )
    return "\n".join(lines)
