"""Gist KV cache: generation from the kept gist entries equals generation over the full masked input."""

from __future__ import annotations

import pytest
import torch

from conftest import TINY
from gist_dist.config import load_config
from gist_dist.data import GistTemplate, load_records
from gist_dist.inference import GistKVCache, build_cache, generate_from_cache, generate_uncached
from gist_dist.model import load_model, load_tokenizer
from gist_dist.tokens import add_gist_tokens, init_gist_embeddings

NEW_TOKENS = 10


@pytest.fixture(scope="module")
def tiny():
    """The tiny random LLaMA (prompt-sensitive init) with 2 gist tokens, and 5 prompts of mixed lengths."""
    torch.manual_seed(0)
    cfg = load_config(TINY, ["num_gist=2"])
    tok = load_tokenizer(cfg.model)
    num_old = len(tok)
    gist_ids = add_gist_tokens(tok, cfg.num_gist)
    model = load_model(cfg.model, vocab_min=num_old)
    init_gist_embeddings(model, gist_ids, num_old, len(tok))
    template = GistTemplate(tok, gist_ids, max_length=1 << 20)
    pieces = [template.pieces(r) for r in load_records("generated:unseen", n=5)]
    prompts = [p + gist_ids for p, _, _ in pieces]
    tails = [t for _, t, _ in pieces]
    assert len({len(p) for p in prompts}) > 1 and len({len(t) for t in tails}) > 1  # mixed, so padding happens
    return model.eval(), tok, gist_ids, prompts, tails


@pytest.mark.parametrize("mask", ["gist", "pos_control", "neg_control"])
def test_cached_generation_equals_uncached(tiny, mask):
    model, tok, gist_ids, prompts, tails = tiny
    cache = build_cache(model, prompts, gist_ids, mask)
    cached = generate_from_cache(model, cache, tails, NEW_TOKENS, tok.eos_token_id, tok.pad_token_id)
    uncached = generate_uncached(model, prompts, tails, gist_ids, mask, NEW_TOKENS, tok.eos_token_id)
    assert cached == uncached
    assert all(len(a) > 0 for a in cached)
    kept = {
        "gist": [len(gist_ids)] * len(prompts),
        "pos_control": [len(p) for p in prompts],
        "neg_control": [0] * len(prompts),
    }[mask]
    assert cache.attention_mask.sum(-1).tolist() == kept


def test_gist_cache_is_small_and_carries_the_prompt(tiny):
    model, tok, gist_ids, prompts, tails = tiny
    cache = build_cache(model, prompts, gist_ids, "gist")
    k = len(gist_ids)
    assert cache.length == k
    per_token = (
        2
        * model.config.num_hidden_layers
        * model.config.num_key_value_heads
        * (model.config.hidden_size // model.config.num_attention_heads)
        * 4
    )
    assert cache.nbytes() == [k * per_token] * len(prompts)
    assert cache.full_prompt_nbytes() == [(len(p) - k) * per_token for p in prompts]
    # Same query after two different prompts: the answers differ only through the gist entries.
    swapped = GistKVCache.stack([cache.row(1), cache.row(0)])
    same_tail = [tails[0], tails[0]]
    a = generate_from_cache(model, cache.row(0), [tails[0]], NEW_TOKENS, tok.eos_token_id)
    b = generate_from_cache(model, swapped, same_tail, NEW_TOKENS, tok.eos_token_id)
    assert b[1] == a[0] and b[0] != a[0]


def test_saved_cache_answers_without_the_prompt(tiny, tmp_path):
    model, tok, gist_ids, prompts, tails = tiny
    cache = build_cache(model, prompts, gist_ids, "gist")
    expected = generate_from_cache(model, cache, tails, NEW_TOKENS, tok.eos_token_id, tok.pad_token_id)
    paths = []
    for i in range(len(prompts)):
        paths.append(tmp_path / f"prompt{i}.safetensors")
        cache.row(i).save(paths[i], meta={"prompt": i})
        kv = cache.row(i).nbytes()[0]
        assert kv <= paths[i].stat().st_size < kv + 2048  # the gist KV plus a small header
    # One prompt alone, then all of them re-batched in another order from disk.
    one = generate_from_cache(model, GistKVCache.load(paths[3]), [tails[3]], NEW_TOKENS, tok.eos_token_id)
    assert one == [expected[3]]
    order = [4, 2, 0, 3, 1]
    loaded = GistKVCache.stack([GistKVCache.load(paths[i]) for i in order])
    again = generate_from_cache(
        model, loaded, [tails[i] for i in order], NEW_TOKENS, tok.eos_token_id, tok.pad_token_id
    )
    assert again == [expected[i] for i in order]


def test_prompts_must_end_with_the_gist(tiny):
    model, _, gist_ids, prompts, _ = tiny
    with pytest.raises(ValueError):
        build_cache(model, [prompts[0][:-1]], gist_ids, "gist")


@pytest.mark.parametrize("mask", ["gist", "neg_control"])
def test_visible_prefix_is_kept_once_and_cached_equals_uncached(tiny, mask, tmp_path):
    """mask_prefix=visible: the template's fixed head ("Instruction:") stays visible after the gist; its
    keys/values are the same whatever the prompt, cached answers equal the uncached masked reference,
    and the bytes report counts the prefix once (shared_nbytes), not per prompt."""
    model, tok, gist_ids, prompts, tails = tiny
    n = len(GistTemplate(tok, gist_ids, max_length=1 << 20).fixed_head)
    assert n == 2 and all(p[:n] == prompts[0][:n] for p in prompts)
    cache = build_cache(model, prompts, gist_ids, mask, prefix=n)
    assert cache.shared == n
    for layer_keys, layer_values in zip(cache.keys, cache.values):
        for row in range(1, len(prompts)):  # rows are left-padded by different amounts: same entries anyway
            assert torch.allclose(layer_keys[row, :, :n], layer_keys[0, :, :n], atol=1e-6)
            assert torch.allclose(layer_values[row, :, :n], layer_values[0, :, :n], atol=1e-6)
    cached = generate_from_cache(model, cache, tails, NEW_TOKENS, tok.eos_token_id, tok.pad_token_id)
    uncached = generate_uncached(model, prompts, tails, gist_ids, mask, NEW_TOKENS, tok.eos_token_id, prefix=n)
    assert cached == uncached
    assert cached != generate_uncached(model, prompts, tails, gist_ids, mask, NEW_TOKENS, tok.eos_token_id)
    per_token = cache.bytes_per_token()
    kept = len(gist_ids) if mask == "gist" else 0
    assert cache.nbytes() == [kept * per_token] * len(prompts) and cache.shared_nbytes() == n * per_token
    assert cache.full_prompt_nbytes() == [(len(p) - len(gist_ids) - n) * per_token for p in prompts]
    cache.row(2).save(tmp_path / "row.safetensors")  # a saved row keeps its prefix and says so
    loaded = GistKVCache.load(tmp_path / "row.safetensors")
    assert loaded.shared == n
    assert generate_from_cache(model, loaded, [tails[2]], NEW_TOKENS, tok.eos_token_id) == [cached[2]]
