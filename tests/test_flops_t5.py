"""Encoder-decoder (T5) FLOPs: analytic vs FlopCounterMode per strategy (the gist strategy through
inference.seq2seq's own request path), cache bytes, parameter counts, the CLI."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import gist_dist
from gist_dist.analysis import flops
from gist_dist.inference.decoding import cache_kwarg, returned_cache

LENGTHS = [(5, 3), (26, 11), (40, 1)]  # (instruction tokens, input tokens after the gist)


@pytest.mark.parametrize("model, meta", [("t5-tiny", False), ("t5-tiny", True), ("flan-t5-xxl", True)])
def test_analytic_flops_match_counter_within_2_percent(model, meta):
    check = flops.check_against_counter(model, LENGTHS, num_gist=2, meta=meta)
    assert check["strategies"] == list(flops.SEQ2SEQ_STRATEGIES)
    for strategy in flops.SEQ2SEQ_STRATEGIES:
        assert check[strategy]["measured"] > 0
        assert abs(check[strategy]["rel_error"]) < 0.02, (strategy, check[strategy])
    # the gist cache skips re-encoding the prompt; no prompt at all is the floor
    assert check["no_prompt"]["measured"] < check["gist"]["measured"] < check["none"]["measured"]


@pytest.mark.parametrize("model, meta", [("t5-tiny", False), ("flan-t5-xxl", True)])
def test_parameter_count_matches_the_built_model(model, meta):
    net = flops.load_eager(model, meta=meta)
    shape = flops.shape_of(model)
    assert shape == flops.shape_of(model, net.config)  # the YAML read alone == the HF config
    assert not shape.tied and net.lm_head.weight is not net.shared.weight  # T5 v1.1: its own head
    assert shape.params() == sum(p.numel() for p in net.parameters())


def test_next_token_flops_match_counter():
    """One further decoder step: self-attention over the past, cross keys/values reused from the cache."""
    from torch.utils.flop_counter import FlopCounterMode

    net = flops.load_eager("flan-t5-xxl", meta=True)
    shape = flops.shape_of("flan-t5-xxl", net.config)
    seen = 9
    states = torch.zeros(1, seen, shape.hidden, device="meta")
    start = torch.zeros(1, 1, dtype=torch.long, device="meta")
    with torch.no_grad():
        first = net(encoder_outputs=(states,), decoder_input_ids=start, use_cache=True)
        with FlopCounterMode(display=False) as counter:
            net(
                encoder_outputs=(states,),
                decoder_input_ids=start,
                use_cache=True,
                **{cache_kwarg(net): returned_cache(first)},
            )
    measured = counter.get_total_flops()
    assert abs(shape.next_token_flops(0, 0, seen) / measured - 1) < 0.02


def test_cache_bytes_are_what_the_inference_cache_holds():
    """kv_bytes_per_token is what inference.seq2seq keeps per gist position of a real built cache."""
    from gist_dist.inference.seq2seq import build_seq2seq_cache

    net = flops.load_eager("t5-tiny")
    gist = [net.config.vocab_size - 2, net.config.vocab_size - 1]
    cache = build_seq2seq_cache(net, [list(range(30, 47)) + gist], gist, "gist")
    assert cache.nbytes() == [len(gist) * flops.shape_of("t5-tiny").kv_bytes_per_token("fp32")]


def test_cli_table_and_json_for_flan_t5_xxl():
    args = ["flops", "--model", "flan-t5-xxl", "--num-gist", "1", "--prompt-tokens", "26", "--tail-tokens", "5"]
    table = gist_dist(args, timeout=600).stdout
    assert all(s in table for s in flops.SEQ2SEQ_STRATEGIES) and "encoder-decoder" in table
    result = json.loads(gist_dist(args + ["--json"], timeout=600).stdout)
    shape = flops.shape_of("flan-t5-xxl")
    assert result["params"] == shape.params()
    g = result["gflops_per_example"]
    assert g["none"] * 1e9 == pytest.approx(
        flops.encoder_flops(shape, 26 + 1 + 5) + flops.decoder_flops(shape, 26 + 1 + 5)
    )
    assert g["gist"] * 1e9 == pytest.approx(flops.encoder_flops(shape, 5, 1) + flops.decoder_flops(shape, 1 + 5))
    assert result["gflops_build_cache"]["gist"] * 1e9 == pytest.approx(flops.encoder_flops(shape, 26 + 1))
    assert result["kv_bytes_per_prompt"] == {"none": 0, "gist": shape.kv_bytes_per_token("bf16"), "no_prompt": 0}
