"""The gist masks against their definition, and the claim they exist for: after the gist, the
prompt can only reach later tokens through the gist tokens' keys/values."""

import random

import pytest
import torch
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM

from gist_dist.inference.decoding import cache_kwarg, returned_cache
from gist_dist.masks import allowed_attention, make_attention_mask, position_ids_from

GIST = [1000, 1001, 1002]


def reference_allowed(ids, att, gist_ids, mask, prefix=0):
    """Straight from the definition, one (query, key) pair at a time; `prefix`: the first real
    tokens of the row stay visible to every query (mask_prefix=visible)."""
    B, T = ids.shape
    out = torch.zeros(B, 1, T, T, dtype=torch.bool)
    for b in range(B):
        g = [t for t in range(T) if int(ids[b, t]) in gist_ids]
        real = [t for t in range(T) if att[b, t]]
        for q in range(T):
            for k in range(T):
                if q == k:
                    ok = True  # every row attends to itself (padded rows: only that)
                elif k > q or not att[b, k] or not att[b, q]:
                    ok = False
                elif not g or mask == "pos_control" or q <= g[-1] or k in real[:prefix]:
                    ok = True
                elif mask == "gist":
                    ok = k >= g[0]  # after the gist: nothing before the first gist token
                else:  # neg_control: after the gist: neither prompt nor gist
                    ok = k > g[-1]
                out[b, 0, q, k] = ok
    return out


def random_batch(rng, B=5, T=14, k=2, left_pad=False):
    ids = torch.randint(0, 500, (B, T))
    att = torch.ones(B, T, dtype=torch.long)
    for b in range(B):
        n = rng.randint(k + 3, T)
        pad = T - n
        start = pad if left_pad else 0
        if left_pad:
            att[b, :pad] = 0
        else:
            att[b, n:] = 0
        if b != B - 1:  # last row has no gist at all: plain causal
            pos = start + rng.randint(1, n - k - 1)
            ids[b, pos : pos + k] = torch.tensor(GIST[:k])
    return ids, att


@pytest.mark.parametrize("mask", ["gist", "pos_control", "neg_control"])
@pytest.mark.parametrize("left_pad", [False, True])
@pytest.mark.parametrize("k", [1, 3])
@pytest.mark.parametrize("prefix", [0, 1, 2])
def test_masks_match_definition(mask, left_pad, k, prefix):
    rng = random.Random(f"{mask}{left_pad}{k}{prefix}")
    for _ in range(5):
        ids, att = random_batch(rng, k=k, left_pad=left_pad)
        got = allowed_attention(ids, att, GIST[:k], mask, prefix=prefix)
        want = reference_allowed(ids, att, GIST[:k], mask, prefix)
        # padded query rows are never read; compare real rows exactly
        real = att.bool()[:, None, :, None].expand_as(got)
        assert torch.equal(got[real], want[real])


def test_float_mask_values():
    ids, att = random_batch(random.Random(0))
    m = make_attention_mask(ids, att, GIST[:2], "gist", torch.float32)
    allowed = allowed_attention(ids, att, GIST[:2], "gist")
    assert m.dtype == torch.float32 and m.shape == allowed.shape
    assert torch.all(m[allowed] == 0) and torch.all(m[~allowed] == torch.finfo(torch.float32).min)


def tiny_llama(attn):
    torch.manual_seed(0)
    cfg = LlamaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=1100,
        initializer_range=0.15,
    )
    return LlamaForCausalLM._from_config(cfg, attn_implementation=attn).eval()


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_prompt_reaches_later_tokens_only_through_gist_kv(attn):
    """Run prompt+gist, drop the prompt's entries from the cache, continue with the right
    positions: the continuation's logits equal the full gist-masked run. So changing the prompt
    while holding the gist KV fixed changes nothing after the gist."""
    model = tiny_llama(attn)
    k = 2
    prompt, post = torch.randint(0, 1000, (1, 7)), torch.randint(0, 1000, (1, 6))
    ids = torch.cat([prompt, torch.tensor([GIST[:k]]), post], 1)
    att = torch.ones_like(ids)
    with torch.no_grad():
        full = model(
            ids, attention_mask=make_attention_mask(ids, att, GIST[:k], "gist"), position_ids=position_ids_from(att)
        ).logits
        head = ids[:, : 7 + k]
        cache = returned_cache(model(head, use_cache=True))
        gist_only = DynamicCache()
        for layer, entry in enumerate(cache.layers):
            gist_only.update(entry.keys[:, :, 7:].clone(), entry.values[:, :, 7:].clone(), layer)
        T = ids.shape[1]
        cont = model(
            post,
            **{cache_kwarg(model): gist_only},
            position_ids=torch.arange(7 + k, T)[None],
            attention_mask=torch.zeros(1, 1, post.shape[1], k + post.shape[1]).masked_fill_(
                ~torch.ones(post.shape[1], k + post.shape[1], dtype=torch.bool).tril(k), torch.finfo(torch.float32).min
            ),
        ).logits
    assert torch.allclose(cont, full[:, 7 + k :], atol=1e-5), (cont - full[:, 7 + k :]).abs().max()


def test_controls_bound_the_gist():
    """pos_control lets the prompt reach later tokens directly; neg_control blocks the gist too."""
    model = tiny_llama("sdpa")
    k = 1
    prompt_a, prompt_b = torch.randint(0, 1000, (1, 6)), torch.randint(0, 1000, (1, 6))
    post = torch.randint(0, 1000, (1, 5))

    def post_logits(prompt, mask, gist_embed_scale=1.0):
        ids = torch.cat([prompt, torch.tensor([GIST[:k]]), post], 1)
        att = torch.ones_like(ids)
        emb = model.get_input_embeddings()(ids)
        emb[:, 6] *= gist_embed_scale
        with torch.no_grad():
            return model(
                inputs_embeds=emb,
                attention_mask=make_attention_mask(ids, att, GIST[:k], mask),
                position_ids=position_ids_from(att),
            ).logits[:, 6 + k :]

    assert not torch.allclose(post_logits(prompt_a, "pos_control"), post_logits(prompt_b, "pos_control"))
    assert not torch.allclose(post_logits(prompt_a, "gist"), post_logits(prompt_b, "gist"))
    assert torch.allclose(post_logits(prompt_a, "neg_control"), post_logits(prompt_b, "neg_control"), atol=1e-6)
    assert torch.allclose(post_logits(prompt_a, "neg_control"), post_logits(prompt_a, "neg_control", 3.0), atol=1e-6)
