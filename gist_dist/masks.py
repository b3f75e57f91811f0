"""The gist attention masks (Mu et al. 2023), as one rule rendered into the 4D float mask HF models take.

k distinct gist tokens <GIST_0> ... <GIST_{k-1}> follow the prompt:
- gist:        queries after the last gist token cannot see keys before the first gist token;
               queries up to the last gist token see everything up to the last gist (causally).
- pos_control: gist tokens present, plain causal attention (the ceiling).
- neg_control: queries after the last gist token see neither the prompt nor the gist (the floor).
Padding keys are blocked everywhere; a padded query row attends only to itself so softmax is
never over an empty row (its output is ignored). Model-agnostic, no distributed code.
"""
from __future__ import annotations

import torch

MASKS = ("gist", "pos_control", "neg_control")


def gist_positions(input_ids: torch.Tensor, gist_ids) -> torch.Tensor:
    ids = torch.as_tensor(list(gist_ids), device=input_ids.device)
    return torch.isin(input_ids, ids)


def allowed_attention(input_ids, attention_mask, gist_ids, mask: str) -> torch.Tensor:
    """Boolean [B, 1, T, T]: True where query t may attend to key s."""
    if mask not in MASKS:
        raise ValueError(f"unknown mask {mask!r}")
    B, T = input_ids.shape
    device = input_ids.device
    is_gist = gist_positions(input_ids, gist_ids)
    causal = torch.ones(T, T, dtype=torch.bool, device=device).tril()
    allowed = causal.expand(B, T, T).clone()
    has_gist = is_gist.any(-1)
    if mask != "pos_control":
        # up_to_last[b, t]: position t is at or before the last gist token.
        up_to_last = is_gist.flip(-1).cumsum(-1).flip(-1) >= 1
        from_first = is_gist.cumsum(-1) >= 1
        key_ok_after = from_first if mask == "gist" else ~up_to_last
        q_pre = up_to_last[:, :, None]
        rule = torch.where(q_pre, up_to_last[:, None, :], key_ok_after[:, None, :])
        rule = torch.where(has_gist[:, None, None], rule, torch.ones_like(rule))
        allowed &= rule
    if attention_mask is not None:
        allowed &= attention_mask.bool()[:, None, :]
    allowed |= torch.eye(T, dtype=torch.bool, device=device)
    return allowed[:, None]


def make_attention_mask(input_ids, attention_mask, gist_ids, mask: str, dtype=torch.float32):
    """Float 4D mask for HF models: 0 where allowed, dtype-min where blocked (safe for eager and sdpa)."""
    allowed = allowed_attention(input_ids, attention_mask, gist_ids, mask)
    out = torch.zeros(allowed.shape, dtype=dtype, device=input_ids.device)
    return out.masked_fill_(~allowed, torch.finfo(dtype).min)


def position_ids_from(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions that skip left padding, so RoPE sees 0.. for the first real token."""
    return (attention_mask.long().cumsum(-1) - 1).clamp_min(0)


def model_inputs(batch: dict, gist_ids, mask: str, dtype=torch.float32) -> dict:
    """2D batch -> kwargs for an HF causal LM: 4D mask (padding folded in, built on the batch's
    device) + positions."""
    return {
        "input_ids": batch["input_ids"],
        "attention_mask": make_attention_mask(batch["input_ids"], batch["attention_mask"], gist_ids, mask, dtype),
        "position_ids": position_ids_from(batch["attention_mask"]),
    }
