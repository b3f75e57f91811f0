"""The gist method itself: gist tokens, their embeddings, and the attention masks.

Model-agnostic and free of distributed code (ZeRO-3 gathering is passed in as a context).

Masks follow Mu et al. (2023), "Learning to Compress Prompts with Gist Tokens", with k distinct
gist tokens <GIST_0> ... <GIST_{k-1}> placed after the prompt:
- gist:        queries after the last gist token cannot see keys before the first gist token;
               queries up to the last gist token see everything up to the last gist (causally).
- pos_control: gist tokens present, plain causal attention (the ceiling).
- neg_control: queries after the last gist token see neither the prompt nor the gist (the floor).
Padding keys are blocked everywhere; a padded query row attends only to itself so softmax is
never over an empty row (its output is ignored).
"""
from __future__ import annotations

import contextlib

import torch

GIST_MODES = ("gist", "pos_control", "neg_control")


def gist_token_strings(num_gist: int) -> list[str]:
    return [f"<GIST_{i}>" for i in range(num_gist)]


def add_gist_tokens(tokenizer, num_gist: int) -> list[int]:
    """Register the gist tokens as special tokens; returns their ids (in order)."""
    tokens = gist_token_strings(num_gist)
    tokenizer.add_special_tokens({"additional_special_tokens": tokens}, replace_extra_special_tokens=False)
    ids = tokenizer.convert_tokens_to_ids(tokens)
    assert len(set(ids)) == num_gist and tokenizer.unk_token_id not in ids
    return ids


def init_gist_embeddings(model, gist_ids: list[int], num_old: int, new_size: int, gather=contextlib.nullcontext):
    """Resize embeddings to cover gist ids and set their rows to the mean of the old rows.

    `gather(params)` is a context that makes (partitioned) params whole and writable, e.g.
    deepspeed.zero.GatheredParameters(params, modifier_rank=0) under ZeRO-3.
    """
    model.resize_token_embeddings(new_size, mean_resizing=False)
    mats = [model.get_input_embeddings().weight]
    out = model.get_output_embeddings()
    if out is not None and out.weight is not mats[0]:
        mats.append(out.weight)
    with gather(mats), torch.no_grad():
        for w in mats:
            w[gist_ids] = w[:num_old].float().mean(0).to(w.dtype)


def gist_positions(input_ids: torch.Tensor, gist_ids) -> torch.Tensor:
    ids = torch.as_tensor(list(gist_ids), device=input_ids.device)
    return torch.isin(input_ids, ids)


def allowed_attention(input_ids, attention_mask, gist_ids, mode: str) -> torch.Tensor:
    """Boolean [B, 1, T, T]: True where query t may attend to key s."""
    if mode not in GIST_MODES:
        raise ValueError(f"unknown mask mode {mode!r}")
    B, T = input_ids.shape
    device = input_ids.device
    is_gist = gist_positions(input_ids, gist_ids)
    causal = torch.ones(T, T, dtype=torch.bool, device=device).tril()
    allowed = causal.expand(B, T, T).clone()
    has_gist = is_gist.any(-1)
    if mode != "pos_control":
        # up_to_last[b, t]: position t is at or before the last gist token.
        up_to_last = is_gist.flip(-1).cumsum(-1).flip(-1) >= 1
        from_first = is_gist.cumsum(-1) >= 1
        key_ok_after = from_first if mode == "gist" else ~up_to_last
        q_pre = up_to_last[:, :, None]
        rule = torch.where(q_pre, up_to_last[:, None, :], key_ok_after[:, None, :])
        rule = torch.where(has_gist[:, None, None], rule, torch.ones_like(rule))
        allowed &= rule
    if attention_mask is not None:
        allowed &= attention_mask.bool()[:, None, :]
    allowed |= torch.eye(T, dtype=torch.bool, device=device)
    return allowed[:, None]


def make_attention_mask(input_ids, attention_mask, gist_ids, mode: str, dtype=torch.float32):
    """Float 4D mask for HF models: 0 where allowed, dtype-min where blocked (safe for eager and sdpa)."""
    allowed = allowed_attention(input_ids, attention_mask, gist_ids, mode)
    mask = torch.zeros(allowed.shape, dtype=dtype, device=input_ids.device)
    return mask.masked_fill_(~allowed, torch.finfo(dtype).min)


def position_ids_from(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions that skip left padding, so RoPE sees 0.. for the first real token."""
    return (attention_mask.long().cumsum(-1) - 1).clamp_min(0)
