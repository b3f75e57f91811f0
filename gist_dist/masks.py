"""The gist attention masks (Mu et al. 2023): one rule, rendered as a dense 4D float mask (CPU,
sdpa/eager) or a FlexAttention BlockMask (CUDA), both from the same `mask_mod` predicate.

k distinct gist tokens <GIST_0> ... <GIST_{k-1}> follow the prompt of each example:
- gist:        queries after the last gist token cannot see keys before the first gist token;
               queries up to the last gist token see everything up to the last gist (causally).
- pos_control: gist tokens present, plain causal attention (the ceiling).
- neg_control: queries after the last gist token see neither the prompt nor the gist (the floor).
With `prefix` = n > 0 (config mask_prefix=visible) the first n tokens of every example, template
text identical for every example (BOS, "Instruction:", a chat header), stay visible to every later
query of that example under gist and neg_control too: small LMs use the first positions as an
attention sink, and those keys/values depend on no prompt (causal: they see only each other).
A row may hold several examples (packing): `segments` gives each token its example (-1 = padding);
a token attends only within its own example, where the rule is exactly that example's alone, and
positions restart at 0 per example. Padding keys are blocked everywhere; a padded query attends only
to itself so softmax is never over an empty row (its output is ignored). No distributed code.
"""

from __future__ import annotations

import torch

MASKS = ("gist", "pos_control", "neg_control")


def gist_positions(input_ids: torch.Tensor, gist_ids) -> torch.Tensor:
    ids = torch.as_tensor(list(gist_ids), device=input_ids.device)
    return torch.isin(input_ids, ids)


def segments_from(attention_mask: torch.Tensor) -> torch.Tensor:
    """One example per row: segment 0 on real tokens, -1 on padding (left or right)."""
    return torch.where(attention_mask.bool(), 0, -1)


def _per_segment(segments: torch.Tensor, values: torch.Tensor, fill: int, reduce: str) -> torch.Tensor:
    """For every token, `reduce` (amax / amin) of `values` over the tokens of its segment."""
    B, T = segments.shape
    S = T + 1  # a row holds at most T examples; the last slot collects padding (no device sync to size it)
    index = torch.where(segments >= 0, segments, S - 1).long()
    table = torch.full((B, S), fill, dtype=values.dtype, device=values.device)
    table = table.scatter_reduce(1, index, values, reduce, include_self=True)
    return table.gather(1, index)


def mask_mod(input_ids, segments, gist_ids, mask: str, prefix: int = 0):
    """The predicate `allowed(b, h, q, k)` (FlexAttention's mask_mod signature) for this batch."""
    if mask not in MASKS:
        raise ValueError(f"unknown mask {mask!r}")
    B, T = input_ids.shape
    t = torch.arange(T, device=input_ids.device).expand(B, T)
    is_gist = gist_positions(input_ids, gist_ids)
    last = _per_segment(segments, torch.where(is_gist, t, -1), -1, "amax")  # last gist of the token's example
    first = _per_segment(segments, torch.where(is_gist, t, T), T, "amin")
    has_gist, up_to_last, from_first = last >= 0, t <= last, t >= first
    after_ok = from_first if mask == "gist" else ~up_to_last  # keys a post-gist query may see
    if prefix:
        after_ok = after_ok | (positions_in_segments(segments) < prefix)

    def allowed(b, h, q, k):
        ok = (segments[b, q] == segments[b, k]) & (segments[b, k] >= 0) & (k <= q)
        if mask != "pos_control":
            rule = torch.where(up_to_last[b, q], up_to_last[b, k], after_ok[b, k])
            ok = ok & (~has_gist[b, q] | rule)
        return ok | (q == k)

    return allowed


def allowed_attention(input_ids, attention_mask, gist_ids, mask: str, segments=None, prefix: int = 0) -> torch.Tensor:
    """Boolean [B, 1, T, T]: True where query t may attend to key s (the dense rendering)."""
    segments = segments_from(attention_mask) if segments is None else segments
    B, T = input_ids.shape
    i = torch.arange(T, device=input_ids.device)
    b = torch.arange(B, device=input_ids.device)
    allowed = mask_mod(input_ids, segments, gist_ids, mask, prefix)
    return allowed(b[:, None, None], None, i[None, :, None], i[None, None, :])[:, None]


def make_attention_mask(
    input_ids, attention_mask, gist_ids, mask: str, dtype=torch.float32, segments=None, prefix: int = 0
):
    """Float 4D mask for HF models: 0 where allowed, dtype-min where blocked (safe for eager and sdpa)."""
    allowed = allowed_attention(input_ids, attention_mask, gist_ids, mask, segments, prefix)
    out = torch.zeros(allowed.shape, dtype=dtype, device=input_ids.device)
    return out.masked_fill_(~allowed, torch.finfo(dtype).min)


def make_block_mask(input_ids, attention_mask, gist_ids, mask: str, segments=None, prefix: int = 0):
    """FlexAttention BlockMask of the same predicate: fully masked blocks (the prompt for every
    post-gist query, other examples of a packed row) are skipped by the kernel."""
    from torch.nn.attention.flex_attention import create_block_mask

    segments = segments_from(attention_mask) if segments is None else segments
    B, T = input_ids.shape
    return create_block_mask(
        mask_mod(input_ids, segments, gist_ids, mask, prefix), B, None, T, T, device=input_ids.device
    )


def position_ids_from(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions that skip left padding, so RoPE sees 0.. for the first real token."""
    return (attention_mask.long().cumsum(-1) - 1).clamp_min(0)


def positions_in_segments(segments: torch.Tensor) -> torch.Tensor:
    """Positions restarting at 0 for every example of a (packed) row; 0 on padding."""
    B, T = segments.shape
    t = torch.arange(T, device=segments.device).expand(B, T)
    start = _per_segment(segments, t, T, "amin")
    return torch.where(segments >= 0, t - start, 0)


def model_inputs(
    batch: dict, gist_ids, mask: str, dtype=torch.float32, attention: str = "dense", prefix: int = 0
) -> dict:
    """2D batch (+ "segments" for packed rows) -> kwargs for an HF causal LM: the mask (dense 4D
    with padding folded in, or a BlockMask for attention="flex"), built on the batch's device, and
    positions restarting per example. `prefix`: leading tokens per example kept visible (see above)."""
    segments = batch.get("segments")
    if segments is None:
        segments = segments_from(batch["attention_mask"])
    render = make_block_mask if attention == "flex" else make_attention_mask
    kwargs = {} if attention == "flex" else {"dtype": dtype}
    return {
        "input_ids": batch["input_ids"],
        "attention_mask": render(
            batch["input_ids"], batch["attention_mask"], gist_ids, mask, segments=segments, prefix=prefix, **kwargs
        ),
        "position_ids": positions_in_segments(segments),
    }
