"""Packing: per-token losses and gradients packed equal unpacked (fp32, 1e-5), for the three masks
and distill (with and without layer offsets); the BlockMask's dense form equals the 4D mask, it skips
exactly the blocks the 4D mask blocks, flex forward (CPU) matches sdpa, and model.attention=auto picks
flex only on CUDA."""

import random

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from gist_dist.config import ConfigError, ModelConfig
from gist_dist.data import IGNORE, pad_batch
from gist_dist.data.packing import best_fit, join, pack
from gist_dist.masks import MASKS, allowed_attention, make_block_mask, mask_mod, model_inputs
from gist_dist.methods.base import segment_ids
from gist_dist.methods.distill import DistillLoss
from gist_dist.methods.finetune import labelled_rows, lm_head_rows
from gist_dist.model import load_model
from gist_dist.tokens import GistLayerOffsets
from gist_dist.trainer import attention_backend

V = 49160  # tiny shape with room for up to 8 gist ids at the top of the vocabulary
GIST = list(range(V - 8, V))


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return load_model(ModelConfig(name="configs/models/tiny.yaml"), vocab_min=V).eval()


def random_example(rng: random.Random, k: int, with_gist=True) -> dict:
    prompt = [rng.randrange(100, 2000) for _ in range(rng.randrange(1, 12))]
    tail = [rng.randrange(100, 2000) for _ in range(rng.randrange(1, 4))]
    answer = [rng.randrange(100, 2000) for _ in range(rng.randrange(1, 8))]
    head = prompt + (GIST[:k] if with_gist else []) + tail
    return {"input_ids": head + answer, "labels": [IGNORE] * len(head) + answer}


def batch_of(examples: list[dict]) -> dict:
    b = pad_batch(examples, 0)
    b["segments"] = segment_ids(examples, b["input_ids"].shape[1])
    return b


def token_losses(model, examples, mask, with_grad=False, prefix=0):
    """Per target token CE, in example order (rows keep their examples in order)."""
    b = batch_of(examples)
    hidden = model.get_decoder()(**model_inputs(b, GIST, mask, prefix=prefix), use_cache=False).last_hidden_state
    rows, targets = labelled_rows(hidden, b["labels"])
    return F.cross_entropy(lm_head_rows(model, rows).float(), targets, reduction="none")


@settings(max_examples=16, deadline=None)
@given(
    seed=st.integers(0, 10_000),
    n=st.integers(2, 9),
    k=st.integers(1, 3),
    capacity=st.integers(30, 80),
    mask=st.sampled_from(MASKS),
    prefix=st.sampled_from([0, 0, 1, 2]),
)
def test_packed_token_losses_and_gradients_equal_unpacked(tiny, seed, n, k, capacity, mask, prefix):
    rng = random.Random(seed)
    examples = [random_example(rng, k, with_gist=rng.random() > 0.1) for _ in range(n)]
    examples = [e for e in examples if len(e["input_ids"]) <= capacity] or examples[:1]
    capacity = max(capacity, max(len(e["input_ids"]) for e in examples))
    rows = best_fit([len(e["input_ids"]) for e in examples], capacity)
    assert sorted(i for r in rows for i in r) == list(range(len(examples)))
    assert all(sum(len(examples[i]["input_ids"]) for i in r) <= capacity for r in rows)
    order = [i for r in rows for i in sorted(r)]
    packed = [join([examples[i] for i in sorted(r)]) for r in rows]
    embedding = tiny.get_input_embeddings().weight
    losses, grads = [], []
    for batch in ([examples[i] for i in order], packed):
        tiny.zero_grad()
        with torch.enable_grad():
            per_token = token_losses(tiny, batch, mask, prefix=prefix)  # prefix: per example, not per row
            per_token.sum().backward()
        losses.append(per_token.detach())
        grads.append(embedding.grad.clone())
    torch.testing.assert_close(losses[1], losses[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-5, atol=1e-5 * float(grads[0].abs().max()))


@pytest.mark.parametrize("layer_offsets", [False, True])
def test_packed_distill_loss_and_gradient_equal_unpacked(tiny, layer_offsets):
    rng = random.Random(3)
    pairs = []
    for i in range(6):
        student = random_example(rng, 2)
        teacher = {
            "input_ids": [rng.randrange(100, 2000) for _ in range(rng.randrange(2, 9))] + student["input_ids"],
            "labels": None,
        }
        teacher["labels"] = [IGNORE] * (len(teacher["input_ids"]) - len(student["input_ids"])) + student["labels"]
        pairs.append({"teacher": teacher, "student": student, "key": str(i)})
    # deep gist tokens hook the decoder's layers for good, so they get a model of their own
    model = load_model(ModelConfig(name="configs/models/tiny.yaml"), vocab_min=V).eval() if layer_offsets else tiny
    init = model.get_input_embeddings().weight[:2].detach()
    module = DistillLoss(model, GIST[:2], init + 0.01, temperature=2.0, lm_weight=0.25)
    if layer_offsets:  # nonzero offsets, so that each layer's addition shows in the loss
        decoder = model.get_decoder()
        rows = 0.05 * torch.randn(len(decoder.layers) - 1, *init.shape, generator=torch.Generator().manual_seed(1))
        module.gist_rows.offsets = GistLayerOffsets(decoder, rows)
    params = list(module.gist_rows.parameters())
    assert len(params) == (len(model.get_decoder().layers) if layer_offsets else 1)  # rows + an offset per later layer
    out = []
    for batch in (
        pairs,
        pack(
            pairs,
            60,
            lambda e: max(len(e["teacher"]["input_ids"]), len(e["student"]["input_ids"])),
            lambda ps: {"teacher": join([p["teacher"] for p in ps]), "student": join([p["student"] for p in ps])},
        ),
    ):
        t, s = batch_of([e["teacher"] for e in batch]), batch_of([e["student"] for e in batch])
        for p in params:
            p.grad = None
        with torch.enable_grad():
            loss = module(
                teacher=model_inputs(t, GIST[:2], "pos_control"),
                student=model_inputs(s, GIST[:2], "gist"),
                labels_t=t["labels"],
                labels_s=s["labels"],
            )
            loss.backward()
        out.append((float(loss), [p.grad.clone() for p in params]))
    assert len(batch) < len(pairs)  # something was packed together
    assert abs(out[0][0] - out[1][0]) <= 1e-5 * abs(out[0][0])
    for unpacked, packed in zip(out[0][1], out[1][1]):
        assert unpacked.abs().max() > 0  # every offset reaches the loss
        torch.testing.assert_close(packed, unpacked, rtol=1e-5, atol=1e-5 * float(unpacked.abs().max()))


@pytest.mark.slow  # compiles flex_attention
@pytest.mark.parametrize("mask", MASKS)
def test_block_mask_dense_form_equals_the_4d_mask_and_flex_matches_sdpa(tiny, mask):
    from torch.nn.attention.flex_attention import create_mask

    rng = random.Random(11)
    examples = [random_example(rng, 2) for _ in range(40)]
    rows = [join([examples[i] for i in sorted(r)]) for r in best_fit([len(e["input_ids"]) for e in examples], 200)]
    b = batch_of(rows[:3])
    B, T = b["input_ids"].shape
    dense = allowed_attention(b["input_ids"], b["attention_mask"], GIST, mask, b["segments"])
    rendered = create_mask(mask_mod(b["input_ids"], b["segments"], GIST, mask), B, 1, T, T, device="cpu")
    assert torch.equal(rendered, dense)
    flex_model = load_model(
        ModelConfig(name="configs/models/tiny.yaml", attn_implementation="flex_attention"), vocab_min=V
    ).eval()
    with torch.no_grad():
        want = tiny(**model_inputs(b, GIST, mask)).logits
        got = flex_model(**model_inputs(b, GIST, mask, attention="flex")).logits
    real = b["attention_mask"].bool()  # padded queries' outputs are ignored (and differ by design)
    torch.testing.assert_close(got[real], want[real], rtol=1e-5, atol=1e-5)


def test_block_mask_skips_exactly_the_blocks_the_4d_mask_blocks():
    """At 128 x 128 blocks, a block is skipped iff no query-key pair in it may attend: other examples
    of the row, and for gist / neg_control also the prompt behind every later query (long answers
    here, so whole query blocks lie after the gist). Sparsity from the definition, per mask."""
    rng = random.Random(5)
    examples = [random_example(rng, 1) for _ in range(12)]
    for e in examples:
        e["input_ids"] = [rng.randrange(100, 2000) for _ in range(300)] + e["input_ids"] + [7] * 300
        e["labels"] = [IGNORE] * 300 + e["labels"] + [7] * 300
    rows = [join([examples[i] for i in sorted(r)]) for r in best_fit([len(e["input_ids"]) for e in examples], 2048)]
    b = batch_of(rows[:2])
    pad = -b["input_ids"].shape[1] % 128  # whole blocks; padding keys and queries attend nowhere
    ids = F.pad(b["input_ids"], (0, pad))
    segments = F.pad(b["segments"], (0, pad), value=-1)
    skipped = {}
    for mask in MASKS:
        blocks = make_block_mask(ids, None, GIST, mask, segments).to_dense()[:, 0].bool()  # [B, T/128, T/128]
        dense = allowed_attention(ids, None, GIST, mask, segments)[:, 0]
        assert torch.equal(blocks, dense.unflatten(1, (-1, 128)).unflatten(3, (-1, 128)).any(4).any(2)), mask
        skipped[mask] = (~blocks).sum().item()
    assert skipped["pos_control"] > blocks.numel() / 2  # causal + other examples already
    assert skipped["gist"] > skipped["pos_control"] and skipped["neg_control"] >= skipped["gist"]


def test_attention_backend_picks_flex_only_on_cuda(monkeypatch):
    assert attention_backend("auto") == "dense" and attention_backend("dense") == "dense"
    with pytest.raises(ConfigError, match="only on CUDA"):
        attention_backend("flex")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # what CUDA answers, stood in for
    assert attention_backend("auto") == "flex" and attention_backend("flex") == "flex"
    assert attention_backend("auto", flex_ok=False) == "dense"  # a method that needs the dense mask


def test_best_fit_refuses_an_example_longer_than_a_row():
    with pytest.raises(ValueError, match="more than a row"):
        best_fit([3, 9], 8)
