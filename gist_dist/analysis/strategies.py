"""Caching strategies the FLOPs and latency reports compare, one prompt at a time:

none         nothing cached: the first forward reads instruction + tail
instruction  a plain prompt cache: every instruction token's KV kept
gist         instruction + gist run once, only the k gist entries kept
"""

from __future__ import annotations

import torch

from ..inference.causal import GistKVCache, build_cache, empty_layers
from ..inference.decoding import cache_kwarg, device_dtype

STRATEGIES = ("none", "instruction", "gist")


def strategy_cache(model, prompt: list[int], gist_ids: list[int], strategy: str, prefix: int = 0) -> GistKVCache:
    """One prompt's cache under a caching strategy; `prefix`: the prompt's first tokens the gist strategy
    also keeps (mask_prefix=visible; shared by every prompt, so not counted in its bytes)."""
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown caching strategy {strategy!r} (known: {', '.join(STRATEGIES)})")
    if strategy == "instruction":
        return build_cache(model, [prompt], [], "pos_control")
    if strategy == "gist":
        return build_cache(model, [list(prompt) + list(gist_ids)], gist_ids, "gist", prefix=prefix)
    zeros = torch.zeros(1, dtype=torch.long)
    return GistKVCache(
        empty_layers(model, 1), empty_layers(model, 1), torch.zeros(1, 0, dtype=torch.long), zeros, zeros
    )


def first_token_input(prompt: list[int], tail: list[int], strategy: str) -> list[int]:
    return prompt + tail if strategy == "none" else tail


def attention_mask_4d(new: int, past: int, dtype, device="cpu") -> torch.Tensor:
    """[1, 1, new, past+new] float mask: every cached key visible, causal among the new tokens."""
    allowed = torch.ones(new, past + new, dtype=torch.bool, device=device).tril(diagonal=past)
    mask = torch.zeros(1, 1, new, past + new, dtype=dtype, device=device)
    return mask.masked_fill_(~allowed, torch.finfo(dtype).min)


@torch.no_grad()
def forward_after(model, ids: list[int], prefix: GistKVCache, cache=None, logits_to_keep: int = 1):
    """One forward of `ids` after a one-prompt cache (or after `cache`, the DynamicCache it grew into),
    positions resuming where the prefix ended; explicit 4D mask (FlopCounterMode on meta weights needs one)."""
    cache = prefix.dynamic_cache() if cache is None else cache
    past = cache.get_seq_length()
    start = int(prefix.next_position[0]) + past - prefix.length
    device, dtype = device_dtype(model)  # device "meta" for weightless FLOP counts
    return model(
        input_ids=torch.tensor([ids], device=device),
        attention_mask=attention_mask_4d(len(ids), past, dtype, device),
        position_ids=torch.arange(start, start + len(ids), device=device)[None],
        **{cache_kwarg(model): cache},
        use_cache=True,
        logits_to_keep=logits_to_keep,
    )
