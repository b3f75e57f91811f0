"""Measured time to first token, per-token decode time and KV bytes per caching strategy.

Plain HF forward passes with `past_key_values`, no `generate`, so every strategy runs the same code:
    none         forward(instruction + tail)                     nothing cached
    instruction  cache = forward(instruction); forward(tail)     P tokens of KV kept per prompt
    gist         cache = forward(instruction + gist), keep only the k gist entries; forward(tail)
The gist prefix keeps its original positions (the tail starts at P + k), which is what the
training mask implies: dropping the prompt's cache entries and continuing with those positions
gives the masked full-sequence logits (DESIGN.md, "mask proof").
The cache is built once per prompt and is not part of the time to first token: that is the point
of caching (the paper's Table 3 measures the same way).
"""
from __future__ import annotations

import statistics
import time
from dataclasses import dataclass

import torch

from .flops import STRATEGIES


@dataclass
class Prefix:
    kv: list  # [(keys, values)] per layer, [B, kv_heads, cached, head_dim]; empty for "none"
    next_position: int

    @property
    def length(self) -> int:
        return self.kv[0][0].shape[2] if self.kv else 0

    def nbytes(self) -> int:
        return sum(k.nbytes + v.nbytes for k, v in self.kv)

    def fresh_cache(self):
        """A new DynamicCache over the stored tensors (forward appends by concatenation, never in place)."""
        from transformers import DynamicCache
        return DynamicCache(ddp_cache_data=self.kv) if self.kv else DynamicCache()


def attention_mask_4d(new: int, past: int, dtype, device="cpu") -> torch.Tensor:
    """[1, 1, new, past+new] float mask: every cached key visible, causal among the new tokens."""
    allowed = torch.ones(new, past + new, dtype=torch.bool, device=device).tril(diagonal=past)
    mask = torch.zeros(1, 1, new, past + new, dtype=dtype, device=device)
    return mask.masked_fill_(~allowed, torch.finfo(dtype).min)


def _dtype(model):
    return next(model.parameters()).dtype


@torch.no_grad()
def forward_new(model, ids: list[int], prefix: Prefix, cache=None, logits_to_keep: int = 1):
    """Forward `ids` after `prefix` (explicit 4D mask: FlopCounterMode on meta weights needs one too)."""
    past = prefix.length if cache is None else cache.get_seq_length()
    cache = prefix.fresh_cache() if cache is None else cache
    start = prefix.next_position + past - prefix.length
    device = next(model.parameters()).device  # "meta" for weightless FLOP counts
    return model(input_ids=torch.tensor([ids], device=device),
                 attention_mask=attention_mask_4d(len(ids), past, _dtype(model), device),
                 position_ids=torch.arange(start, start + len(ids), device=device)[None],
                 past_key_values=cache, use_cache=True, logits_to_keep=logits_to_keep)


@torch.no_grad()
def build_prefix(model, prompt: list[int], gist_ids: list[int], strategy: str) -> Prefix:
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown caching strategy {strategy!r} (known: {', '.join(STRATEGIES)})")
    if strategy == "none":
        return Prefix([], 0)
    ids = prompt + (list(gist_ids) if strategy == "gist" else [])
    out = forward_new(model, ids, Prefix([], 0), logits_to_keep=1)
    keep = len(gist_ids) if strategy == "gist" else len(ids)
    kv = [(layer.keys[:, :, -keep:].clone(), layer.values[:, :, -keep:].clone()) for layer in out.past_key_values.layers]
    return Prefix(kv, len(ids))


def first_token_input(prompt: list[int], tail: list[int], strategy: str) -> list[int]:
    return prompt + tail if strategy == "none" else tail


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def _stats(seconds: list[float]) -> dict:
    q = statistics.quantiles(seconds, n=4) if len(seconds) > 1 else seconds * 3
    return {"median_ms": 1e3 * statistics.median(seconds), "p25_ms": 1e3 * q[0], "p75_ms": 1e3 * q[2],
            "min_ms": 1e3 * min(seconds), "max_ms": 1e3 * max(seconds), "n": len(seconds)}


@torch.no_grad()
def measure_strategy(model, prompt, tail, gist_ids, strategy, repeats=10, warmup=2, decode_tokens=8) -> dict:
    """TTFT (the first-token forward given the strategy's prefix) and greedy per-token decode time."""
    prefix = build_prefix(model, prompt, gist_ids, strategy)
    first = first_token_input(prompt, tail, strategy)
    ttft = [_timed(lambda: forward_new(model, first, prefix)) for _ in range(warmup + repeats)][warmup:]
    out = forward_new(model, first, prefix)
    cache, token = out.past_key_values, int(out.logits[0, -1].argmax())
    decode = []
    for _ in range(warmup + decode_tokens):
        t0 = time.perf_counter()
        out = forward_new(model, [token], prefix, cache=cache)
        decode.append(time.perf_counter() - t0)
        token = int(out.logits[0, -1].argmax())
    return {"ttft": _stats(ttft), "decode_per_token": _stats(decode[warmup:]),
            "first_forward_tokens": len(first), "cached_tokens": prefix.length, "kv_bytes": prefix.nbytes()}


def measure_strategies(model, examples: list[tuple[list[int], list[int]]], gist_ids, repeats=10, warmup=2,
                       decode_tokens=8) -> dict:
    """Per strategy: medians over examples of each example's median TTFT/decode, mean KV bytes."""
    result = {}
    for strategy in STRATEGIES:
        runs = [measure_strategy(model, p, t, gist_ids, strategy, repeats, warmup, decode_tokens) for p, t in examples]
        result[strategy] = {
            "ttft_ms": statistics.median(r["ttft"]["median_ms"] for r in runs),
            "ttft_p25_ms": statistics.median(r["ttft"]["p25_ms"] for r in runs),
            "ttft_p75_ms": statistics.median(r["ttft"]["p75_ms"] for r in runs),
            "decode_ms_per_token": statistics.median(r["decode_per_token"]["median_ms"] for r in runs),
            "kv_bytes_per_prompt": sum(r["kv_bytes"] for r in runs) / len(runs),
            "examples": runs,
        }
    result["settings"] = {"repeats": repeats, "warmup": warmup, "decode_tokens": decode_tokens,
                          "threads": torch.get_num_threads(), "dtype": str(_dtype(model)).replace("torch.", "")}
    return result


def latency_for(model: str, num_gist: int, *, data: str = "", n: int = 4, prompt_tokens: int = 0,
                tail_tokens: int = 3, repeats: int = 10, warmup: int = 2, decode_tokens: int = 8) -> dict:
    """`gist-dist flops --latency`: load the model (sdpa attention, fp32 on CPU) and time each strategy
    on the first `n` records of `data`, or on one synthetic prompt of the given lengths."""
    from transformers import AutoModelForCausalLM

    from .config import ConfigError
    from .flops import model_shape_path, shape_of, tokenizer_for
    from .model import is_shape_file, llama_config_from_shape, local_device, resolve_dtype

    shape = shape_of(model)
    if shape.params() > 2e9:
        raise ConfigError(f"--latency runs the model on this machine; {model} has {shape.params() / 1e9:.1f} B params")
    path = model_shape_path(model)
    dtype = resolve_dtype("auto")
    if is_shape_file(path):  # random weights: timing depends on shapes only
        torch.manual_seed(0)
        net = AutoModelForCausalLM.from_config(llama_config_from_shape(path), dtype=dtype, attn_implementation="sdpa")
    else:
        net = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation="sdpa")
    net = net.to(local_device()).eval()
    tok, tok_name = tokenizer_for(model)
    gist = [tok.convert_tokens_to_ids(f"<GIST_{i}>") for i in range(num_gist)]
    if tok.unk_token_id in gist or None in gist:  # a base model: stand-in ids cost the same
        gist = list(range(shape.vocab - num_gist, shape.vocab))
    if data:
        from .data import GistTemplate, load_records
        template = GistTemplate(tok, gist, max_length=1 << 30)
        examples = [template.pieces(r)[:2] for r in load_records(data, n=n)]
    else:
        examples = [(list(range(100, 100 + prompt_tokens)), list(range(200, 200 + tail_tokens)))]
    result = measure_strategies(net, examples, gist, repeats, warmup, decode_tokens)
    result["settings"].update(model=model, tokenizer=tok_name, data=data or "synthetic", num_gist=num_gist,
                              mean_prompt_tokens=sum(len(p) for p, _ in examples) / len(examples))
    return result


def format_latency(result: dict) -> str:
    s = result["settings"]
    lines = [f"latency on this machine ({s['threads']} threads, {s['dtype']}, {s['repeats']} repeats after "
             f"{s['warmup']} warm-up, median [p25-p75]; {s['data']}, mean instruction {s['mean_prompt_tokens']:.1f} tokens)",
             f"{'strategy':<12} {'TTFT ms':>22} {'decode ms/token':>16} {'KV bytes/prompt':>16}"]
    for name in STRATEGIES:
        r = result[name]
        ttft = f"{r['ttft_ms']:.2f} [{r['ttft_p25_ms']:.2f}-{r['ttft_p75_ms']:.2f}]"
        lines.append(f"{name:<12} {ttft:>22} {r['decode_ms_per_token']:>16.2f} {r['kv_bytes_per_prompt']:>16,.0f}")
    return "\n".join(lines)
