"""Decoding helpers shared by the causal and the seq2seq decoders."""

from __future__ import annotations

import inspect

import torch

from ..data import pad_batch


def device_dtype(model) -> tuple[torch.device, torch.dtype]:
    """Where the model's weights live and in which dtype (device "meta" for weightless FLOP counts)."""
    p = next(model.parameters())
    return p.device, p.dtype


def cache_kwarg(model) -> str:
    """The keyword a model's forward and `generate` take a KV cache by: `cache` in newer transformers 5.x,
    `past_key_values` in older ones (the old name is deprecated where the new one exists)."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def returned_cache(output):
    """The KV cache a forward returned, under either name (see cache_kwarg)."""
    cache = getattr(output, "cache", None)
    return output.past_key_values if cache is None else cache


def cut_at_eos(ids: list[int], eos_id: int) -> list[int]:
    """The ids before the first eos (all of them when none)."""
    return ids[: ids.index(eos_id)] if eos_id in ids else ids


def padded_prompts(prompts: list[list[int]], gist_ids: list[int]) -> dict:
    """Left-padded prompt + gist rows (the gist ids last in every row, so at the same columns)."""
    k = len(gist_ids)
    for p in prompts:
        if k and list(p[-k:]) != list(gist_ids):
            raise ValueError("every prompt must end with the gist tokens")
    return pad_batch([{"input_ids": list(p)} for p in prompts], pad_id=0, left=True)
