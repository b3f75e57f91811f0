"""Decoding helpers shared by the causal and the seq2seq decoders."""

from __future__ import annotations

import torch

from ..data import pad_batch


def device_dtype(model) -> tuple[torch.device, torch.dtype]:
    """Where the model's weights live and in which dtype (device "meta" for weightless FLOP counts)."""
    p = next(model.parameters())
    return p.device, p.dtype


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
