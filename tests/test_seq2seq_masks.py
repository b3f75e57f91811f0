"""Encoder-decoder gist masks against the paper's definition, one (query, key) pair at a time,
and the HF T5 forward taking them (4D encoder mask, broadcast cross-attention mask)."""

import random

import pytest
import torch
from test_gist_mask import GIST, random_batch
from transformers import T5ForConditionalGeneration

from gist_dist.model import config_from_shape
from gist_dist.seq2seq_masks import cross_keys, encoder_allowed, seq2seq_masks


def reference(ids, att, gist_ids, mask):
    """(encoder [B, 1, S, S], cross [B, S]) straight from the definition."""
    B, S = ids.shape
    enc = torch.zeros(B, 1, S, S, dtype=torch.bool)
    cross = torch.zeros(B, S, dtype=torch.bool)
    for b in range(B):
        g = [t for t in range(S) if att[b, t] and int(ids[b, t]) in gist_ids]

        def group(t, g=g):  # "head": prompt and gist tokens; "tail": the input after the last gist
            return "all" if not g else ("head" if t <= g[-1] else "tail")

        def tail_sees(k, g=g):  # what an input token (and the decoder) may see
            if not g or mask == "pos_control":
                return True
            return k >= g[0] if mask == "gist" else k > g[-1]

        for k in range(S):
            cross[b, k] = bool(att[b, k]) and tail_sees(k)
        for q in range(S):
            for k in range(S):
                if q == k:
                    ok = True
                elif not att[b, k] or not att[b, q]:
                    ok = False
                elif not g or mask == "pos_control":
                    ok = True
                elif group(q) == "head":
                    ok = group(k) == "head"  # never the input, or the gist would depend on it
                else:
                    ok = tail_sees(k)
                enc[b, 0, q, k] = ok
    return enc, cross


@pytest.mark.parametrize("mask", ["gist", "pos_control", "neg_control"])
@pytest.mark.parametrize("left_pad", [False, True])
@pytest.mark.parametrize("k", [1, 3])
def test_seq2seq_masks_match_definition(mask, left_pad, k):
    rng = random.Random(f"s2s{mask}{left_pad}{k}")
    for _ in range(5):
        ids, att = random_batch(rng, k=k, left_pad=left_pad)
        enc, cross = reference(ids, att, GIST[:k], mask)
        assert torch.equal(encoder_allowed(ids, att, GIST[:k], mask), enc)
        assert torch.equal(cross_keys(ids, att, GIST[:k], mask), cross)


def test_t5_forward_honours_the_masks():
    """Through HF's T5: blocked encoder keys and blocked cross-attention keys change nothing."""
    torch.manual_seed(0)
    model = T5ForConditionalGeneration(config_from_shape("configs/models/t5-tiny.yaml")).eval()
    ids, att = random_batch(random.Random(0), B=4, T=12, k=2)
    ids[-1, 3:5] = torch.tensor(GIST[:2])  # every row has a gist here
    decoder = torch.randint(0, 500, (4, 5))

    def logits(x):
        m = seq2seq_masks(x, att, GIST[:2], "gist")
        enc = model.encoder(input_ids=x, attention_mask=m["attention_mask"])
        return model(encoder_outputs=enc, attention_mask=m["encoder_attention_mask"], decoder_input_ids=decoder).logits

    changed = ids.clone()
    for b in range(4):  # new prompt tokens before the first gist
        first = int(torch.isin(ids[b], torch.tensor(GIST)).nonzero()[0])
        changed[b, :first] = torch.randint(0, 500, (first,))
    with torch.no_grad():
        a, b_ = logits(ids), logits(changed)
    # the prompt changed, so the gist's states did too: the decoder sees the difference...
    assert not torch.allclose(a, b_, atol=1e-4)
    # ...but only through the gist: with the prompt held, changing padding keys changes nothing
    padded = ids.masked_fill(att == 0, 7)
    with torch.no_grad():
        assert torch.allclose(logits(padded), a, atol=1e-5)


def test_t5_gist_states_do_not_depend_on_the_input():
    """Encoder states of prompt and gist are the same whatever input follows the gist."""
    torch.manual_seed(1)
    model = T5ForConditionalGeneration(config_from_shape("configs/models/t5-tiny.yaml")).eval()
    ids = torch.randint(0, 500, (1, 12))
    ids[0, 4:6] = torch.tensor(GIST[:2])
    att = torch.ones_like(ids)
    other = ids.clone()
    other[0, 6:] = torch.randint(0, 500, (6,))

    def states(x):
        m = seq2seq_masks(x, att, GIST[:2], "gist")
        return model.encoder(input_ids=x, attention_mask=m["attention_mask"]).last_hidden_state

    with torch.no_grad():
        a, b = states(ids), states(other)
    assert torch.allclose(a[:, :6], b[:, :6], atol=1e-6)
    assert not torch.allclose(a[:, 6:], b[:, 6:], atol=1e-4)
