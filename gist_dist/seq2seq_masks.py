"""The gist masks of encoder-decoder models (Mu et al. 2023, FLAN-T5): the encoder input is
prompt + k gist tokens + input, the decoder writes the answer.

- gist:        in the (bidirectional) encoder, prompt and gist tokens see only prompt and gist
               tokens (never the input, or the gist would depend on it); input tokens see only the
               gist and the input. The decoder's cross-attention reaches the gist and the input only.
- pos_control: gist tokens present, full bidirectional encoder, cross-attention to everything.
- neg_control: input tokens see only the input; cross-attention reaches only the input.
An example without gist tokens attends everywhere. Padding keys are blocked; a padded query sees
itself so no softmax row is empty. Same predicate style as masks.py: `allowed(b, q, k)`.
"""

from __future__ import annotations

import torch

from .masks import MASKS, gist_positions


def _gist_span(input_ids, attention_mask, gist_ids):
    """Per row: (first gist position or T, last gist position or -1), as [B, 1] tensors."""
    T = input_ids.shape[1]
    t = torch.arange(T, device=input_ids.device).expand_as(input_ids)
    is_gist = gist_positions(input_ids, gist_ids) & attention_mask.bool()
    first = torch.where(is_gist, t, T).amin(-1, keepdim=True)
    last = torch.where(is_gist, t, -1).amax(-1, keepdim=True)
    return t, first, last


def cross_keys(input_ids, attention_mask, gist_ids, mask: str) -> torch.Tensor:
    """Boolean [B, S]: the encoder positions the decoder may attend to (the same for every query)."""
    if mask not in MASKS:
        raise ValueError(f"unknown mask {mask!r}")
    t, first, last = _gist_span(input_ids, attention_mask, gist_ids)
    real, has_gist = attention_mask.bool(), last >= 0
    if mask == "pos_control":
        return real
    visible = t >= first if mask == "gist" else t > last
    return real & (visible | ~has_gist)


def encoder_mask_mod(input_ids, attention_mask, gist_ids, mask: str):
    """The encoder self-attention predicate `allowed(b, q, k)` for this batch."""
    t, first, last = _gist_span(input_ids, attention_mask, gist_ids)
    real, has_gist = attention_mask.bool(), (last >= 0).squeeze(-1)
    up_to_gist = t <= last  # prompt and gist tokens
    after_ok = cross_keys(input_ids, attention_mask, gist_ids, mask)  # keys an input token may see

    def allowed(b, q, k):
        ok = real[b, k] & real[b, q]
        if mask != "pos_control":
            rule = torch.where(up_to_gist[b, q], up_to_gist[b, k], after_ok[b, k])
            ok = ok & (~has_gist[b] | rule)
        return ok | (q == k)

    return allowed


def encoder_allowed(input_ids, attention_mask, gist_ids, mask: str) -> torch.Tensor:
    """Boolean [B, 1, S, S]: True where encoder query q may attend to key k."""
    B, S = input_ids.shape
    i = torch.arange(S, device=input_ids.device)
    b = torch.arange(B, device=input_ids.device)
    allowed = encoder_mask_mod(input_ids, attention_mask, gist_ids, mask)
    return allowed(b[:, None, None], i[None, :, None], i[None, None, :])[:, None]


def _additive(allowed: torch.Tensor, dtype) -> torch.Tensor:
    out = torch.zeros(allowed.shape, dtype=dtype, device=allowed.device)
    return out.masked_fill_(~allowed, torch.finfo(dtype).min)


def seq2seq_masks(input_ids, attention_mask, gist_ids, mask: str, dtype=torch.float32) -> dict:
    """Float masks for an HF encoder-decoder: `attention_mask` [B, 1, S, S] (encoder) and
    `encoder_attention_mask` [B, 1, 1, S] (cross-attention, broadcast over decoder queries),
    0 where allowed and dtype-min where blocked (safe for eager and sdpa)."""
    return {
        "attention_mask": _additive(encoder_allowed(input_ids, attention_mask, gist_ids, mask), dtype),
        "encoder_attention_mask": _additive(
            cross_keys(input_ids, attention_mask, gist_ids, mask)[:, None, None], dtype
        ),
    }
